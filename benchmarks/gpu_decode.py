"""GPU decode throughput of the 11B shape: tokens/s, achieved memory bandwidth, TTFT.

The Llama 3.2 11B Vision shape (configs/model/llama3_2_11b_vision.yaml) in bf16 with random
weights written directly on the GPU (nothing is downloaded or built on the host), one
4-tile 560 px image per row at the start of a random prompt, greedy decoding through
`llama_vision.Generator` with stop tokens disabled, at each `--batch` size:

  * time to first token: image encode + cross-attention K/V + prefill + first pick;
  * decode tokens/s per row and for the batch, from the time between the first and the
    last token (medians over `--runs`);
  * achieved bandwidth: the bytes of weights one decode step must read (the trunk, the
    cross-attention q/o/FFN -- their K/V are cached per prompt -- the norms and the
    vocabulary projection) divided by the step time, as a fraction of `--peak-tbps`
    (3.35 TB/s: H100 SXM HBM3). KV-cache bytes read per step are reported beside it.

`--compile` runs the decode step through torch.compile with CUDA graphs
(`Generator(model, compile=True)`); the compiling warm-up is not timed.
`--tiny` swaps in a tiny config (on the CPU when there is no GPU) to exercise the script;
its numbers mean nothing.

    .venv/bin/python benchmarks/gpu_decode.py --batch 1 16 --runs 3 [--compile]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_vision.generation import Generator  # noqa: E402
from llama_vision.model import build_model  # noqa: E402

MODEL_11B = ROOT / "configs/model/llama3_2_11b_vision.yaml"
# The one tiny config, with a fixed vocabulary and room for a 512-token decode.
TINY = {**yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text()), "vocab_size": 512, "max_seq_len": 512}


@torch.no_grad()
def random_model(params, device: torch.device, dtype: torch.dtype):
    """Random weights allocated and drawn on `device` (the 11B model never touches the host):
    N(0, 0.02) matrices, unit norms, zero biases, tanh gates at 0.5 so the image matters."""
    model = build_model(params, device="meta", dtype=dtype)
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "gate" in leaf:
            p.fill_(0.5)
        elif leaf == "bias":
            p.zero_()
        elif "norm" in name or ".ln_" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    return model.eval()


def decode_weight_bytes(model) -> int:
    """Bytes of parameters one decode step reads: the text decoder without the token tables
    (a step looks up B rows) and without the cross-attention K/V projections (their
    outputs are cached once per prompt)."""
    text = model.text_model
    skip = {id(text.tok_embeddings.weight), id(text.learnable_embedding.weight)}
    for sched in text.adapter_schedules.values():
        for block in getattr(text, sched.attr):
            skip |= {id(block.attention.wk.weight), id(block.attention.wv.weight), id(block.attention.k_norm.weight)}
    return sum(p.numel() * p.element_size() for p in text.parameters() if id(p) not in skip)


def kv_bytes_per_step(model, batch: int, context: int, media_tokens: int) -> int:
    """Self-attention cache read at `context` keys plus the cached cross-attention K/V."""
    a = model.args
    per_token = 2 * a.n_kv_heads * a.head_dim * model.text_model.output.weight.element_size()
    return batch * per_token * (a.n_layers * context + len(a.fusion_schedule) * media_tokens)


def make_inputs(model, batch: int, prompt_len: int, seed: int = 0):
    a = model.args
    g = torch.Generator().manual_seed(seed)
    image_token = a.image_token_id
    prompts = [[image_token] + torch.randint(0, min(a.vocab_size, 128000), (prompt_len - 1,), generator=g).tolist()
               for _ in range(batch)]
    s, t = a.vision_chunk_size, a.vision_max_num_chunks
    images = torch.randn(batch, 1, t, 3, s, s, generator=g)
    ratios = torch.tensor([[[2, 2]]] * batch)  # 4 tiles each
    return prompts, images, ratios


def timed_generate(gen: Generator, prompts, images, ratios, new_tokens: int) -> dict:
    b = len(prompts)
    stamps: list[list[float]] = [[] for _ in range(b)]
    sync = torch.cuda.synchronize if gen.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    # on_token runs after the step's tokens reached the host, i.e. after the GPU finished it.
    out = gen.generate_from_tensors(prompts, images=images, aspect_ratios=ratios, max_new_tokens=new_tokens,
                                    stop_tokens=[], on_token=lambda row, tok: stamps[row].append(time.perf_counter()))
    assert all(len(o) == new_tokens for o in out)
    first, last = stamps[0][0], stamps[0][-1]
    step_s = (last - first) / (new_tokens - 1)
    return {"ttft_s": first - start, "step_s": step_s, "tok_s_per_row": 1 / step_s, "tok_s_batch": b / step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt, the image token first")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    ap.add_argument("--peak-tbps", type=float, default=3.35, help="memory bandwidth to compare with (H100 SXM: 3.35)")
    ap.add_argument("--tiny", action="store_true", help="tiny config, to exercise the script (CPU when no GPU)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_decode.json")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2")

    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    elif args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        sys.exit("gpu_decode.py needs a CUDA GPU (use --tiny to exercise it on the CPU)")
    model = random_model(dict(TINY) if args.tiny else MODEL_11B, device, dtype)
    gen = Generator(model, compile=args.compile)
    weight_bytes = decode_weight_bytes(model)
    media_tokens = model.args.vision_max_num_chunks * model.args.vision_tokens_per_tile
    print(f"model: {'tiny' if args.tiny else '11B'} on {device} ({dtype}), {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
          f"decode reads {weight_bytes / 1e9:.2f} GB of weights per step", flush=True)

    results = []
    for b in args.batch:
        prompts, images, ratios = make_inputs(model, b, args.prompt_len)
        images = images.to(device, dtype)
        timed_generate(gen, prompts, images, ratios, args.new_tokens)  # warm-up (and compile)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs = [timed_generate(gen, prompts, images, ratios, args.new_tokens) for _ in range(args.runs)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        context = args.prompt_len + args.new_tokens // 2  # mean keys attended over the decode
        row = {
            "batch": b,
            "ttft_ms": med["ttft_s"] * 1e3,
            "decode_tok_s_per_row": med["tok_s_per_row"],
            "decode_tok_s_batch": med["tok_s_batch"],
            "step_ms": med["step_s"] * 1e3,
            "weight_tbps": weight_bytes / med["step_s"] / 1e12,
            "weight_bw_fraction": weight_bytes / med["step_s"] / (args.peak_tbps * 1e12),
            "kv_gb_per_step": kv_bytes_per_step(model, b, context, media_tokens) / 1e9,
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "runs": runs,
        }
        results.append(row)
        print(f"batch {b:3d}: ttft {row['ttft_ms']:8.1f} ms   decode {row['decode_tok_s_per_row']:7.1f} tok/s/row "
              f"{row['decode_tok_s_batch']:8.1f} tok/s total   step {row['step_ms']:6.2f} ms   weights "
              f"{row['weight_tbps']:.2f} TB/s = {row['weight_bw_fraction']:.0%} of {args.peak_tbps} TB/s "
              f"(+ {row['kv_gb_per_step']:.3f} GB KV/step)", flush=True)

    result = {
        "config": {"model": "tiny" if args.tiny else str(MODEL_11B.relative_to(ROOT)), "dtype": str(dtype),
                   "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": args.runs,
                   "compile": args.compile, "image": f"1 image x 4 tiles x {model.args.vision_chunk_size} px per row"},
        "env": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M"),
                "peak_tbps": args.peak_tbps},
        "decode_weight_bytes": weight_bytes,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
