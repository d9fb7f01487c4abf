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


def frozen_trunk_in_bf16(model) -> None:
    """The GPU precision of the stage: frozen weights stored in bf16, trainable ones float32
    (master weights under bf16 autocast)."""
    for prm in model.parameters():
        prm.data = prm.data.to(torch.float32 if prm.requires_grad else torch.bfloat16)


def measure_step(model, batch: int, seq: int, steps: int) -> dict:
    """Median time of an optimizer step of `model` (trainability and dtypes as set) on a
    `batch` of `seq`-token rows with one image of every tile slot each, after 2 warm-up
    steps; its tokens/s, images/s, model FLOPs (the trainer's count) and MFU."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    model.train()
    args = model.args
    s = args.vision_chunk_size
    seq = min(seq, args.max_seq_len)
    images = torch.randn(batch, 1, args.vision_max_num_chunks, 3, s, s, device=device)
    ar = torch.tensor([[[2, 2]]] * batch, device=device)
    tokens = torch.randint(0, args.vocab_size, (batch, seq), device=device)
    tokens[:, 0] = args.image_token_id
    labels = tokens.roll(-1, 1)
    labels[:, -1] = -100
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        with autocast:
            loss = lm_loss_sum(model(tokens, images, ar), labels) / (labels != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    # Every row: seq real tokens and one image of vision_max_num_chunks tile slots.
    shape = StepShape(text_lengths=(seq,) * batch, image_tiles=((args.vision_max_num_chunks,),) * batch)
    count = step_flops(args, shape, trainable_from_model(model))
    flops = count.total
    peak = peak_flops_for_device() if cuda else None
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "params_total": sum(q.numel() for q in model.parameters()),
        "params_trainable": sum(q.numel() for q in model.parameters() if q.requires_grad),
        "batch": batch, "seq": seq,
        "step_s": step_s, "tokens_per_s": batch * seq / step_s, "images_per_s": batch / step_s,
        "mfu": mfu(flops, step_s, tp=1, peak_flops_per_gpu=peak) if peak else None,
        "flops_per_step": flops, "tflops_per_s": flops / step_s / 1e12, "flops": count.breakdown(),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
    }


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
    model = llama_vision.build_model(TINY if a.tiny else a.config, device=device)
    llama_vision.set_trainable(model, decoder=False, vision=True, adapters=True)
    if device == "cuda":
        frozen_trunk_in_bf16(model)
    model.text_model.checkpoint_activations = a.activation_checkpointing
    result = measure_step(model, a.batch, a.seq, a.steps)
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
