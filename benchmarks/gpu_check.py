"""The one prepared GPU check (an H200 session has minutes, machine start included):
five stages, each under its own time cap, each written to --out as soon as it finishes (a
cut run still reports what it measured).

1. numerics: a small random model on the device in float32 (TF32 off) against the same
   weights on the CPU (max |logit| difference), and in bf16 (top-1 agreement with float32),
   on ragged rows holding 0, 1 and 2 images;
2. kernels: GQA attention folded (`attention.grouped_query_sdpa`, no K/V copies) against
   repeating K/V to every query head, on the cross-attention shape (T = 6404 media tokens at
   560 px): equality and time; on CUDA also SDPA forced to its flash and memory-efficient
   kernels against a float32 reference;
3. decode: the 11B shape in bf16 with random weights drawn on the GPU, greedy, batch 1 and
   16: tokens/s, weight bandwidth as a fraction of --peak-tbps, time to first token for one
   4-tile 560 px image (benchmarks/gpu_decode.py's measurement);
4. train step: one image_pretrain step of the 8B-trunk + ViT-H/14 336 px shape (frozen trunk
   in bf16, autocast): step time, MFU from the shared FLOP count, peak memory;
5. compile: a tiny model's greedy tokens compiled (CUDA graphs on GPU) == eager.

`--tiny` runs every stage on the CPU with tiny shapes and reports real numbers (CI runs it).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json [--tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_decode import TINY, decode_weight_bytes, make_inputs, random_model, timed_generate  # noqa: E402
from train_step import frozen_trunk_in_bf16, measure_step  # noqa: E402

from llama_vision.generation import Generator  # noqa: E402
from llama_vision.model import attention as A  # noqa: E402

MODEL_11B = ROOT / "configs/model/llama3_2_11b_vision.yaml"
MODEL_8B_336 = ROOT / "configs/model/llama3_1_8b_vision_336.yaml"
SMALL = ROOT / "configs/model/demo.yaml"


class StageTimeout(Exception):
    pass


@contextmanager
def time_cap(seconds: float):
    """Raise StageTimeout in the stage once `seconds` have passed (main thread, POSIX)."""
    def expire(signum, frame):
        raise StageTimeout(f"stage exceeded its {seconds:.0f} s cap")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 5) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- 1. numerics -----------------------------------------------------------------------
def numerics(ctx) -> dict:
    params = dict(TINY) if ctx.tiny else {**yaml.safe_load(SMALL.read_text()), "vocab_size": 4096}
    torch.manual_seed(0)
    cpu = random_model(params, torch.device("cpu"), torch.float32).eval()
    a = cpu.args
    g = torch.Generator().manual_seed(1)
    s, t = a.vision_chunk_size, a.vision_max_num_chunks
    img = a.image_token_id
    rows = [torch.randint(0, a.vocab_size, (n,), generator=g).tolist() for n in (9, 14, 6)]
    rows[1][0] = img  # row 0: no image, row 1: one, row 2: two
    rows[2][0] = rows[2][3] = img
    images = torch.randn(3, 2, t, 3, s, s, generator=g)
    ratios = torch.tensor([[[1, 1], [1, 1]], [[1, 2], [1, 1]], [[2, 1], [1, 2]]])
    tokens = torch.tensor([r + [0] * (14 - len(r)) for r in rows])
    with torch.no_grad():
        want = cpu(tokens, images, ratios)
    dev = ctx.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    on_dev = random_model(params, torch.device("cpu"), torch.float32)
    on_dev.load_state_dict(cpu.state_dict())
    on_dev = on_dev.to(dev).eval()
    with torch.no_grad():
        got = on_dev(tokens.to(dev), images.to(dev), ratios.to(dev)).float().cpu()
        bf16 = on_dev.to(torch.bfloat16)(tokens.to(dev), images.to(dev, torch.bfloat16), ratios.to(dev)).float().cpu()
    real = torch.zeros_like(tokens, dtype=torch.bool)
    for i, r in enumerate(rows):
        real[i, : len(r)] = True
    agree = (bf16.argmax(-1) == want.argmax(-1))[real].float().mean().item()
    diff = (got - want).abs()[real].max().item()
    return {"fp32_max_abs_logit_diff": diff, "fp32_ok": diff <= 1e-3, "bf16_top1_agreement": agree,
            "bf16_ok": agree >= 0.98, "rows_images": [0, 1, 2]}


# --- 2. kernels ------------------------------------------------------------------------
def kernels(ctx) -> dict:
    dev = ctx.device
    dtype = torch.float32 if ctx.tiny else torch.bfloat16
    b, hq, hkv, d, t = (1, 4, 2, 16, 100) if ctx.tiny else (1, 32, 8, 128, 6404)
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {"shape": {"B": b, "Hq": hq, "Hkv": hkv, "D": d, "T": t}, "dtype": str(dtype)}
    for s in (1, 64):  # a decode step, a prefill chunk
        q = torch.randn(b, hq, s, d, generator=g).to(dev, dtype)
        k = torch.randn(b, hkv, t, d, generator=g).to(dev, dtype)
        v = torch.randn(b, hkv, t, d, generator=g).to(dev, dtype)
        mask = (torch.rand(b, 1, s, t, generator=g) > 0.1).to(dev)
        mask[..., 0] = True
        rep = hq // hkv

        def repeated():
            return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)

        def folded():
            return A.grouped_query_sdpa(q, k, v, mask)

        diff = (repeated().float() - folded().float()).abs().max().item()
        row = {"max_abs_diff": diff, "repeated_ms": timed(repeated, dev) * 1e3, "folded_ms": timed(folded, dev) * 1e3}
        if dev.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1))
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("memory_efficient", SDPBackend.EFFICIENT_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        got = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
                    row[f"{name}_max_abs_diff"] = (got.float() - ref).abs().max().item()
                    row[f"{name}_ok"] = row[f"{name}_max_abs_diff"] <= 2e-2
                except RuntimeError as e:  # the kernel refused these shapes
                    row[f"{name}_error"] = str(e)[:200]
        out[f"S={s}"] = row
    return out


# --- 3. decode -------------------------------------------------------------------------
def decode(ctx) -> dict:
    dev = ctx.device
    dtype = torch.float32 if ctx.tiny else torch.bfloat16
    model = random_model(dict(TINY) if ctx.tiny else MODEL_11B, dev, dtype)
    gen = Generator(model)
    weight_bytes = decode_weight_bytes(model)
    new_tokens = 16 if ctx.tiny else 64
    rows = []
    for batch in (1, 16):
        prompts, images, ratios = make_inputs(model, batch, 32)
        images = images.to(dev, dtype)
        timed_generate(gen, prompts, images, ratios, new_tokens)  # warm-up
        r = timed_generate(gen, prompts, images, ratios, new_tokens)
        rows.append({"batch": batch, "ttft_ms": r["ttft_s"] * 1e3, "decode_tok_s_per_row": r["tok_s_per_row"],
                     "decode_tok_s_batch": r["tok_s_batch"], "weight_bw_fraction": weight_bytes / r["step_s"] / (ctx.peak_tbps * 1e12)})
    del model, gen
    return {"model": "tiny" if ctx.tiny else "11B", "decode_weight_gb": weight_bytes / 1e9, "rows": rows,
            "target": "batch 1 >= 75% of the HBM bound, TTFT <= 150 ms"}


# --- 4. one image_pretrain step ----------------------------------------------------------
def train_step(ctx) -> dict:
    dev = ctx.device
    model = random_model(dict(TINY) if ctx.tiny else MODEL_8B_336, dev, torch.float32 if ctx.tiny else torch.bfloat16)
    import llama_vision

    llama_vision.set_trainable(model, decoder=False, vision=True, adapters=True)
    if dev.type == "cuda":
        frozen_trunk_in_bf16(model)
    model.text_model.checkpoint_activations = not ctx.tiny
    batch, seq = (2, 64) if ctx.tiny else (4, 512)
    r = measure_step(model, batch, seq, steps=3)
    return {"model": "tiny" if ctx.tiny else "8B trunk + ViT-H/14 336 px", "batch": r["batch"], "seq": r["seq"],
            "step_s": r["step_s"], "tflops_per_s": r["tflops_per_s"], "mfu": r["mfu"],
            "peak_memory_gib": r["peak_memory_gb"] * 1e9 / 2**30 if r["peak_memory_gb"] is not None else None,
            "target": "MFU >= 40%"}


# --- 5. compiled decode --------------------------------------------------------------------
def compiled(ctx) -> dict:
    dev = ctx.device
    model = random_model(dict(TINY), dev, torch.float32).eval()
    prompts, images, ratios = make_inputs(model, 2, 12)
    images = images.to(dev)
    eager = Generator(model).generate_from_tensors(prompts, images=images, aspect_ratios=ratios, max_new_tokens=8, stop_tokens=[])
    t0 = time.perf_counter()
    fast = Generator(model, compile=True).generate_from_tensors(prompts, images=images, aspect_ratios=ratios, max_new_tokens=8, stop_tokens=[])
    return {"tokens_equal": fast == eager, "compile_and_run_s": time.perf_counter() - t0}


STAGES = {"numerics": numerics, "kernels": kernels, "decode": decode, "train_step": train_step, "compile": compiled}


def write(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON report, rewritten after every stage")
    p.add_argument("--tiny", action="store_true", help="every stage on the CPU with tiny shapes")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--cap-s", type=float, default=60.0, help="time cap per stage (seconds)")
    p.add_argument("--peak-tbps", type=float, default=4.8, help="HBM bandwidth of the card (H200: 4.8)")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA device: run with --tiny on the CPU")
    args.device = torch.device("cpu" if args.tiny else "cuda")
    report = {"env": {"device": torch.cuda.get_device_name() if args.device.type == "cuda" else platform.processor() or "cpu",
                      "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                      "date": time.strftime("%Y-%m-%d %H:%M"), "tiny": args.tiny}, "stages": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write(args.out, report)
    failed = 0
    for name in args.stages:
        t0 = time.perf_counter()
        try:
            with time_cap(args.cap_s):
                result = STAGES[name](args)
            result["status"] = "ok"
        except (StageTimeout, RuntimeError, AssertionError) as e:  # report it, go on to the next stage
            result, failed = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}, failed + 1
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["stages"][name] = result
        write(args.out, report)
        print(f"{name}: {result['status']} in {result['seconds']} s", flush=True)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
