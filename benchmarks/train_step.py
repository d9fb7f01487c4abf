#!/usr/bin/env python
"""Throughput and MFU of one image_pretrain optimizer step (GPU benchmark; not run in CI).

Shape: an 8B Llama 3.1 trunk (frozen, bf16) + ViT-H/14 at 336 px tiles + 8 gated
cross-attention layers (trained, fp32 master weights under bf16 autocast), 4-tile images,
512-token captions. FLOPs are the whole model's matmuls for the step, counted by
llama_vision.training.flops.step_flops (the trainer's count): the decoder per text token,
the image encoder per patch token (every tile slot, both local and global layers), the
cross-attention K/V per vision token, attention included, backward only where the loss's
gradient flows (activation gradients through the frozen trunk, weight gradients of the
trainable groups). "flops" in the output is the per-component breakdown.

  python benchmarks/train_step.py --batch 4 --steps 10            # one H100
  python benchmarks/train_step.py --tiny --steps 2                # CPU smoke run of the script
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_vision  # noqa: E402
from llama_vision.training.flops import StepShape, mfu, step_flops, trainable_from_model  # noqa: E402
from llama_vision.training.losses import lm_loss_sum  # noqa: E402
from llama_vision.training.metrics import peak_flops_for_device  # noqa: E402

# The one tiny config, with a fixed vocabulary (no tokenizer here).
TINY = {**yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml").read_text()), "vocab_size": 512}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/model/llama3_1_8b_vision_336.yaml")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (checks the script, no figures)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--out", help="write results JSON here")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    params = TINY if a.tiny else a.config
    model = llama_vision.build_model(params, device=device)
    llama_vision.set_trainable(model, decoder=False, vision=True, adapters=True)
    if device == "cuda":  # frozen trunk in bf16; trainable weights stay fp32 (master weights)
        for name, prm in model.named_parameters():
            if not prm.requires_grad:
                prm.data = prm.data.to(torch.bfloat16)
    model.text_model.checkpoint_activations = a.activation_checkpointing
    model.train()
    args = model.args
    s = args.vision_chunk_size
    seq = min(a.seq, args.max_seq_len)
    images = torch.randn(a.batch, 1, args.vision_max_num_chunks, 3, s, s, device=device)
    ar = torch.tensor([[[2, 2]]] * a.batch, device=device)
    tokens = torch.randint(0, args.vocab_size, (a.batch, seq), device=device)
    tokens[:, 0] = args.image_token_id
    labels = tokens.roll(-1, 1)
    labels[:, -1] = -100
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, fused=device == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for step in range(a.steps + 2):
        t0 = time.perf_counter()
        with autocast:
            loss = lm_loss_sum(model(tokens, images, ar), labels) / (labels != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    n_all = sum(q.numel() for q in model.parameters())
    n_train = sum(q.numel() for q in model.parameters() if q.requires_grad)
    text_tokens = a.batch * seq
    # Every row: seq real tokens and one image of vision_max_num_chunks tile slots.
    shape = StepShape(text_lengths=(seq,) * a.batch, image_tiles=((args.vision_max_num_chunks,),) * a.batch)
    count = step_flops(args, shape, trainable_from_model(model))
    flops = count.total
    peak = peak_flops_for_device() if device == "cuda" else None
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "params_total": n_all, "params_trainable": n_train, "batch": a.batch, "seq": seq,
        "step_s": step_s, "tokens_per_s": text_tokens / step_s, "images_per_s": a.batch / step_s,
        "mfu": mfu(flops, step_s, tp=1, peak_flops_per_gpu=peak) if peak else None,
        "flops_per_step": flops, "tflops_per_s": flops / step_s / 1e12, "flops": count.breakdown(),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
