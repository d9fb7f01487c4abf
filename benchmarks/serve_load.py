"""Serving load: the continuous-batching Engine vs sequential Generator calls (CPU).

The medium random-weight config of benchmarks/cpu_vs_hf.py (text dim 512, 8 + 2 layers,
Llama 3 vocabulary; ViT width 256, 112 px tiles; float32), loaded from the same cached HF
checkpoint by the same loader (`cpu_vs_hf.checkpoint_dir` + `cpu_vs_hf.load_ours`). The
workload: ``--requests`` prompts of ``--prompt-len`` tokens, every other one starting with
one image (a distinct PIL noise PNG per request: ``--image-size`` px -> 2x2 tiles of 112,
so every image goes through the vision encoder once), each asked for exactly
``--new-tokens`` greedy tokens (stop tokens disabled, so random weights do not stop early).

* **sequential**: ``Generator(model).generate([ids], [[image]], max_new_tokens=N,
  stop_tokens=[])`` for one request after the other (on the CPU, Generator re-lays out the
  widening decoder projections for one-row decoding: ``generation.use_streaming_layout``);
* **engine, concurrency c** (c in ``--concurrency``): a fresh ``serving.Engine``
  (``max_batch = max(c)``), c client threads that each submit the next request as soon as
  their previous one has finished, through the in-process API (``Engine.submit`` ->
  token stream).

The engine runs per ``--layouts``: ``native`` -- the model as loaded (a second instance,
never given to a Generator); ``streaming`` -- the baseline's model after Generator re-laid
it out, which is what ``tools/serve.py`` serves (it builds its Engine from
``inference.setup()``'s Generator.model); ``packed-vocab`` (opt-in experiment, see
`pack_vocab_projection`) -- a native instance whose vocabulary projection runs on a weight
prepacked for oneDNN, to measure a proposed change (engine.py and the model are untouched).

Reported per run: output tokens/s (all requests' tokens over the wall time from the first
submit to the last token), request latency p50/p99 (submit -> last token; a sequential
request's latency is its own call), TTFT p50 (submit -> first token), the mean decode batch
size (``Engine.metrics()["batch_size_trace"]``), the speedup over sequential tokens/s, and
the greedy tokens' agreement with the sequential Generator's (exact requests; tokens up to
the first difference -- batch composition changes float32 sums by ~1e-6 and random weights
have small margins, so this is reported, not asserted). A profile of each engine run splits
the engine thread's time: admission (image encode, prefill), decode steps (text forward,
vocabulary projection, MediaState rebuild, sampling + bookkeeping) and the rest (planning,
waiting), and gives the median decode-step time per batch size.

    .venv/bin/python benchmarks/serve_load.py [--requests 32] [--new-tokens 64] [--out FILE]   # ~6.5 min on 2 cores
    .venv/bin/python benchmarks/serve_load.py --quick --out /tmp/serve_load.json   # tiny model, seconds
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cpu_vs_hf  # noqa: E402  -- the medium config and its checkpoint

# A tiny config for --quick (the script's plumbing in seconds; its numbers mean nothing).
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, norm_eps=1e-5,
            rope_theta=500000.0, use_scaled_rope=True, max_seq_len=256, vision_chunk_size=28, vision_max_num_chunks=4,
            vision_num_cross_attention_layers=1, vision_width=32, vision_layers=2, vision_heads=4,
            vision_global_layers=1, vision_patch_size=14, vision_intermediate_layers=[1])
TARGET_SPEEDUP = 3.0  # engine tokens/s at the highest concurrency over sequential (issue #18)


# --- models, tokenizer, workload ---------------------------------------------------------------
def build_models(quick: bool, cache: Path):
    """(params, baseline model, a loader of further instances). Every instance has the same
    weights: the baseline's Generator re-lays its own model out in place."""
    if quick:
        import llama_vision

        base = llama_vision.build_model(TINY, seed=0)
        with torch.no_grad():  # open the tanh gates (as cpu_vs_hf does): the image matters
            for name, p in base.named_parameters():
                if "gate" in name.rsplit(".", 1)[-1]:
                    p.fill_(0.5)
        pristine = copy.deepcopy(base)
        return TINY, base.eval(), lambda: copy.deepcopy(pristine).eval()
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = cpu_vs_hf.checkpoint_dir(cache)
    return cpu_vs_hf.PARAMS, cpu_vs_hf.load_ours(ckpt)[0].eval(), lambda: cpu_vs_hf.load_ours(ckpt)[0].eval()


def pack_vocab_projection(model) -> None:
    """EXPERIMENT (``--layouts packed-vocab``), not what the package does: the vocabulary
    projection through oneDNN with its weight reordered once into oneDNN's blocked layout
    (what inductor's CPU weight prepacking uses). MKL's GEMM for a few rows x 128256 outputs
    packs the 262 MB weight again on every call; the prepacked weight is read as it is.
    Same values, another summation order (logits within ~4e-6 of the eager ones)."""
    out = model.text_model.output
    weight = out.weight.detach().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
    bias, n_out = out.bias, weight.shape[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], n_out)

    out.forward = forward


def stub_tokenizer(params: dict):
    """What Engine reads from a tokenizer when requests name their stop tokens (ids in, ids
    out; no text): the image placeholder id and default stop tokens."""
    from llama_vision.generation import LLAMA3_STOP_TOKENS

    return SimpleNamespace(image_token_id=params["vocab_size"],
                           stop_tokens=[t for t in LLAMA3_STOP_TOKENS if t < params["vocab_size"]])


def noise_png(size: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_workload(params: dict, n: int, prompt_len: int, image_size: int, seed: int = 0) -> list[dict]:
    """n requests of prompt_len tokens; even ones start with one image (its placeholder
    counts towards the length), odd ones are text only."""
    g = torch.Generator().manual_seed(seed)
    image_token = params["vocab_size"]
    text_vocab = min(params["vocab_size"], 128000)  # ordinary tokens, no special ones
    out = []
    for i in range(n):
        with_image = i % 2 == 0
        text = torch.randint(0, text_vocab, (prompt_len - int(with_image),), generator=g).tolist()
        out.append({"ids": ([image_token] if with_image else []) + text,
                    "images": [noise_png(image_size, seed * 100003 + i)] if with_image else []})
    return out


# --- statistics -------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(latency: list[float], ttft: list[float], tokens: int, wall: float) -> dict:
    return {"requests": len(latency), "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99)}


def agreement(got: list[list[int]], want: list[list[int]]) -> dict:
    """Exact requests, and the fraction of tokens before each request's first difference."""
    exact = sum(a == b for a, b in zip(got, want))
    prefix = 0
    for a, b in zip(got, want):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix += k
    total = sum(len(b) for b in want)
    return {"exact_requests": exact, "requests": len(want), "match_rate": exact / len(want),
            "tokens_before_first_difference": prefix / total if total else 1.0}


# --- sequential baseline --------------------------------------------------------------------------
def warmup_workload(model, workload: list[dict], image_size: int) -> list[dict]:
    """Two requests like the measured ones (one with an image, one without), other images."""
    return make_workload({"vocab_size": model.args.vocab_size}, 2, len(workload[0]["ids"]), image_size, seed=99)


def run_sequential(model, workload: list[dict], new_tokens: int, image_size: int) -> tuple[dict, list[list[int]]]:
    from llama_vision.data.image_io import load_image
    from llama_vision.generation import Generator

    gen = Generator(model)  # CPU: applies the streaming layout to `model` in place
    for w in warmup_workload(model, workload, image_size):
        gen.generate([w["ids"]], [[load_image(d) for d in w["images"]]], max_new_tokens=4, stop_tokens=[])
    latency, ttft, outputs = [], [], []
    start = time.perf_counter()
    for w in workload:
        t0 = time.perf_counter()
        first: list[float] = []
        # The image is decoded inside the timed call, as the engine decodes its bytes.
        images = [[load_image(d) for d in w["images"]]]
        out = gen.generate([w["ids"]], images, max_new_tokens=new_tokens, stop_tokens=[],
                           on_token=lambda row, tok: first or first.append(time.perf_counter()))[0]
        t1 = time.perf_counter()
        latency.append(t1 - t0)
        ttft.append(first[0] - t0)
        outputs.append(out)
    wall = time.perf_counter() - start
    res = summarise(latency, ttft, sum(map(len, outputs)), wall)
    res["mean_decode_batch"] = 1.0
    return res, outputs


# --- engine ------------------------------------------------------------------------------------
class EngineProfile:
    """Wall time of the engine thread's parts, by wrapping the engine's methods on the
    instance (engine.py is not modified). Everything runs on the one scheduler thread."""

    def __init__(self, engine):
        import llama_vision.serving.engine as engine_mod

        self.t = {k: 0.0 for k in ("admit", "image_encode", "prefill_media", "decode_step", "decode_forward",
                                   "decode_logits", "decode_media_rebuild", "decode_sample")}
        self.steps: dict[int, list[float]] = {}
        self.in_admit = False
        self.in_decode = False
        self._engine_mod = engine_mod
        self._orig_batch_media = engine_mod.batch_media
        e, text = engine, engine.model.text_model
        self._restore = []

        def wrap(obj, name, key, flag=None, per_step=False):
            orig = getattr(obj, name)

            def timed(*a, **kw):
                if flag:
                    setattr(self, flag, True)
                n = len(e._slots)
                t0 = time.perf_counter()
                try:
                    return orig(*a, **kw)
                finally:
                    dt = time.perf_counter() - t0
                    if key is not None:
                        self.t[key] += dt
                    if per_step:
                        self.steps.setdefault(n, []).append(dt)
                    if flag:
                        setattr(self, flag, False)

            setattr(obj, name, timed)
            self._restore.append((obj, name))
            return timed

        wrap(e, "_admit", "admit", flag="in_admit")
        wrap(e.images, "get", "image_encode")
        wrap(e, "_decode_step", "decode_step", flag="in_decode", per_step=True)
        orig_sample = e._sample  # only the decode's sampling is counted (prefill picks one token)

        def sample(logits, slots):
            t0 = time.perf_counter()
            try:
                return orig_sample(logits, slots)
            finally:
                if self.in_decode:
                    self.t["decode_sample"] += time.perf_counter() - t0

        e._sample = sample
        self._restore.append((e, "_sample"))
        orig_logits = text.logits

        def logits(*a, **kw):
            t0 = time.perf_counter()
            try:
                return orig_logits(*a, **kw)
            finally:
                if self.in_decode:
                    self.t["decode_logits"] += time.perf_counter() - t0

        text.logits = logits
        self._restore.append((text, "logits"))

        def batch_media(*a, **kw):
            t0 = time.perf_counter()
            try:
                return self._orig_batch_media(*a, **kw)
            finally:
                self.t["decode_media_rebuild" if self.in_decode else "prefill_media"] += time.perf_counter() - t0

        engine_mod.batch_media = batch_media
        self._fwd_t0 = 0.0

        def pre(module, args, kwargs):
            if self.in_decode:
                self._fwd_t0 = time.perf_counter()

        def post(module, args, kwargs, output):
            if self.in_decode:
                self.t["decode_forward"] += time.perf_counter() - self._fwd_t0

        self._hooks = [text.register_forward_pre_hook(pre, with_kwargs=True),
                       text.register_forward_hook(post, with_kwargs=True)]

    def reset(self) -> None:
        for k in self.t:
            self.t[k] = 0.0
        self.steps.clear()

    def close(self) -> None:
        self._engine_mod.batch_media = self._orig_batch_media
        for h in self._hooks:
            h.remove()
        for obj, name in self._restore:
            try:
                delattr(obj, name)  # the instance attribute shadowing the class's method
            except AttributeError:
                pass

    def report(self, wall: float) -> dict:
        t = dict(self.t)
        t["decode_other"] = t["decode_step"] - t["decode_forward"] - t["decode_logits"] - t["decode_media_rebuild"] - t["decode_sample"]
        t["admit_prefill_and_rest"] = t["admit"] - t["image_encode"]
        t["scheduler_other"] = wall - t["admit"] - t["decode_step"]  # planning, waiting for clients
        steps = {str(b): {"steps": len(v), "median_ms": statistics.median(v) * 1e3} for b, v in sorted(self.steps.items())}
        return {"seconds": t, "fraction_of_wall": {k: v / wall for k, v in t.items()}, "decode_step_by_batch": steps}


def run_engine(model, tokenizer, workload: list[dict], new_tokens: int, concurrency: int, max_batch: int,
               max_seq_len: int, image_size: int) -> tuple[dict, list[list[int]]]:
    from llama_vision.serving.engine import Engine, GenerationRequest, SamplingParams

    engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
    prof = EngineProfile(engine)
    engine.start()
    try:
        params = SamplingParams(max_tokens=new_tokens, stop_token_ids=[])
        for w in warmup_workload(model, workload, image_size):  # allocator, first touch; its images are not the measured ones
            list(engine.submit(GenerationRequest(w["ids"], w["images"], SamplingParams(max_tokens=4, stop_token_ids=[]))))
        while engine.metrics()["active_slots"] or prof.in_decode or prof.in_admit:
            time.sleep(0.01)  # the warm-up's last step returns after its final event
        time.sleep(0.05)
        steps0 = engine.metrics()["decode_steps_total"]
        prof.reset()
        outputs: list[list[int] | None] = [None] * len(workload)
        latency = [0.0] * len(workload)
        ttft = [0.0] * len(workload)
        errors: list[str] = []
        nxt = iter(range(len(workload)))
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                w = workload[i]
                t0 = time.perf_counter()
                first = None
                toks = []
                for ev in engine.submit(GenerationRequest(w["ids"], w["images"], params)):
                    if ev.token_id is not None:
                        if first is None:
                            first = time.perf_counter()
                        toks.append(ev.token_id)
                    elif ev.finish_reason != "length":
                        errors.append(f"request {i}: {ev.finish_reason} {ev.error}")
                t1 = time.perf_counter()
                outputs[i], latency[i], ttft[i] = toks, t1 - t0, (first or t1) - t0

        threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(concurrency)]
        start = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - start
        if errors:
            raise RuntimeError("; ".join(errors[:5]))
        m = engine.metrics()
        steps = m["decode_steps_total"] - steps0
        trace = m["batch_size_trace"][-steps:] if steps else []  # the trace keeps the last 4096 steps
        res = summarise(latency, ttft, sum(map(len, outputs)), wall)
        res["concurrency"] = concurrency
        res["decode_steps"] = steps
        res["mean_decode_batch"] = statistics.fmean(trace) if trace else 0.0
        res["profile"] = prof.report(wall)
        return res, outputs
    finally:
        engine.shutdown()
        prof.close()


# --- driver ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224, help="noise images, square px (224: 2x2 tiles of 112)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--layouts", nargs="+", choices=("native", "streaming", "packed-vocab"), default=["native", "streaming"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model and workload (seconds): exercises the script only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_load.json")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "llama_vision_bench",
                    help="where cpu_vs_hf's HF checkpoint is written once")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.prompt_len, args.new_tokens, args.image_size = min(args.requests, 6), 12, 6, 56
        args.concurrency = [c for c in args.concurrency if c <= 4] or [1]
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    params, base_model, another_model = build_models(args.quick, args.cache)
    tokenizer = stub_tokenizer(params)
    workload = make_workload(params, args.requests, args.prompt_len, args.image_size)
    max_batch = max(args.concurrency)
    max_seq_len = args.prompt_len + args.new_tokens
    print(f"{args.requests} requests ({sum(bool(w['images']) for w in workload)} with an image), "
          f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens each; {args.threads} threads", flush=True)

    engine_runs: dict[str, dict[str, dict]] = {}
    outputs: dict[str, dict[str, list]] = {}

    def engine_phase(layout: str, model) -> None:
        engine_runs[layout], outputs[layout] = {}, {}
        for c in args.concurrency:
            load0 = os.getloadavg()[0]
            res, out = run_engine(model, tokenizer, workload, args.new_tokens, c, max_batch, max_seq_len, args.image_size)
            res["loadavg_1min_before_after"] = [load0, os.getloadavg()[0]]
            engine_runs[layout][str(c)], outputs[layout][str(c)] = res, out
            print(f"engine[{layout}] c={c:>2}: {res['tokens_per_s']:7.1f} tok/s  latency p50 {res['latency_p50_s']:6.2f} s "
                  f"p99 {res['latency_p99_s']:6.2f} s  ttft p50 {res['ttft_p50_s']:6.2f} s  "
                  f"mean batch {res['mean_decode_batch']:5.2f}  ({res['wall_s']:.1f} s)", flush=True)

    # The native-layout engines first, each on its own instance (never seen by a Generator);
    # then the baseline, whose Generator re-lays its model out; then the engine on that model.
    for layout in ("native", "packed-vocab"):
        if layout in args.layouts:
            model = another_model()
            if layout == "packed-vocab":
                pack_vocab_projection(model)
            engine_phase(layout, model)
            del model
    load0 = os.getloadavg()[0]
    seq, seq_out = run_sequential(base_model, workload, args.new_tokens, args.image_size)
    seq["loadavg_1min_before_after"] = [load0, os.getloadavg()[0]]
    print(f"sequential     : {seq['tokens_per_s']:7.1f} tok/s  latency p50 {seq['latency_p50_s']:6.2f} s "
          f"p99 {seq['latency_p99_s']:6.2f} s  ttft p50 {seq['ttft_p50_s']:6.2f} s  ({seq['wall_s']:.1f} s)", flush=True)
    if "streaming" in args.layouts:
        engine_phase("streaming", base_model)

    top = str(max(args.concurrency))
    for layout, runs in engine_runs.items():
        for c, res in runs.items():
            res["speedup_vs_sequential"] = res["tokens_per_s"] / seq["tokens_per_s"]
            res["agreement_with_sequential"] = agreement(outputs[layout][c], seq_out)
    target = {layout: {"concurrency": int(top), "speedup": runs[top]["speedup_vs_sequential"],
                       "target": TARGET_SPEEDUP, "met": runs[top]["speedup_vs_sequential"] >= TARGET_SPEEDUP}
              for layout, runs in engine_runs.items()}

    print(f"\n{'run':<22}{'tok/s':>8}{'p50 s':>8}{'p99 s':>8}{'TTFT p50':>10}{'batch':>7}{'speedup':>9}{'exact':>8}")
    print(f"{'sequential Generator':<22}{seq['tokens_per_s']:8.1f}{seq['latency_p50_s']:8.2f}{seq['latency_p99_s']:8.2f}"
          f"{seq['ttft_p50_s']:10.3f}{1.0:7.2f}{1.0:9.2f}{'-':>8}")
    for layout, runs in engine_runs.items():
        for c, r in runs.items():
            a = r["agreement_with_sequential"]
            print(f"{f'engine {layout} c={c}':<22}{r['tokens_per_s']:8.1f}{r['latency_p50_s']:8.2f}{r['latency_p99_s']:8.2f}"
                  f"{r['ttft_p50_s']:10.3f}{r['mean_decode_batch']:7.2f}{r['speedup_vs_sequential']:9.2f}"
                  f"{a['exact_requests']:>5}/{a['requests']}")
    if args.quick:
        print("--quick: a tiny model and workload; these numbers mean nothing")
    for layout, t in target.items():
        print(f"target >= {TARGET_SPEEDUP}x at c={t['concurrency']} ({layout}): {t['speedup']:.2f}x "
              f"{'met' if t['met'] else 'NOT met'}")

    result = {
        "config": {"model": "tiny (--quick)" if args.quick else "cpu_vs_hf medium", "params": params,
                   "requests": args.requests, "with_image": sum(bool(w["images"]) for w in workload),
                   "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "image_size": args.image_size,
                   "concurrency": args.concurrency, "layouts": args.layouts, "max_batch": max_batch,
                   "max_seq_len": max_seq_len, "threads": args.threads, "dtype": "float32", "quick": args.quick},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                "total_s": time.perf_counter() - t_start, "command": " ".join([Path(sys.executable).name, *sys.argv])},
        "sequential": seq,
        "engine": engine_runs,
        "target": target,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['env']['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
