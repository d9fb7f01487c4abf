"""Our model vs transformers' MllamaForConditionalGeneration on CPU, same weights.

One medium random-weight config (text dim 512, 8 trunk + 2 cross-attention layers, 8 / 4
heads, Llama 3 vocabulary; ViT width 256, 8 + 2 global layers, 112 px tiles, patch 14),
one 2x2-tile image, a 64-token prompt, 64 greedy tokens, float32. The weights are saved
once in HF format (safetensors) and loaded by both implementations:

  * ours: ``llama_vision.checkpoint.load_model(dir)`` (``--ours-loader package``), or a
    model built on the meta device with the memory-mapped tensors assigned
    (``--ours-loader mmap``; ``auto`` = package when it can read the dir), then
    ``Generator(model)``;
  * transformers: ``MllamaForConditionalGeneration.from_pretrained(dir, attn_implementation="sdpa")``.

Measured, alternating the two implementations run by run (other load on the machine then
hits both alike; ratios are what to read), median over ``--runs``:

  * time to first token: image encode + prefill + the first greedy pick;
  * decode tokens/s: the remaining ``--new-tokens - 1`` tokens over the time from the
    first token to the last (timestamps from a per-token callback / streamer);
  * peak RSS: each implementation loads and generates once in its own child process
    (VmHWM of that process), so the two do not share a high-water mark.

The generated tokens must be identical. transformers 5.23's vision encoder takes the
intermediate features from layer outputs instead of layer inputs (Meta's reference and
ours); as in tests/test_hf_equivalence.py it is patched to Meta's taps. The prompt starts
with the image token: for text before the first image transformers follows its own
cross-attention rule, not Meta's (a pinned divergence), and tokens could not match.

    .venv/bin/python benchmarks/cpu_vs_hf.py --runs 5 [--ours-loader mmap] [--threads 2] [--out results.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARAMS = dict(
    dim=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=4,
    vocab_size=128256,
    multiple_of=256,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
    max_seq_len=512,
    vision_chunk_size=112,
    vision_max_num_chunks=4,
    vision_num_cross_attention_layers=2,
    vision_width=256,
    vision_layers=8,
    vision_heads=8,
    vision_global_layers=2,
    vision_patch_size=14,
    vision_intermediate_layers=[3, 5, 7],
)
PROMPT_LEN = 64
RATIO = (2, 2)  # one image, 2x2 tiles
IMAGE_TOKEN = PARAMS["vocab_size"]  # row 0 of the learnable table


# --- the shared checkpoint ------------------------------------------------------------
def checkpoint_dir(root: Path) -> Path:
    """HF-format random weights, written once per config (keyed by a hash of PARAMS)."""
    key = hashlib.sha1(json.dumps(PARAMS, sort_keys=True).encode()).hexdigest()[:10]
    path = root / f"cpu_vs_hf-{key}"
    if not (path / "config.json").is_file():
        _write_checkpoint(path)
    return path


@torch.no_grad()
def _write_checkpoint(path: Path) -> None:
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    import llama_vision
    from llama_vision.checkpoint import hf_config_from_args, meta_to_hf

    ours = llama_vision.build_model(PARAMS, seed=0)
    # init_weights leaves the tanh gates at 0 (a fresh adapter is a no-op): open them so the
    # image actually changes the tokens and the equality check covers cross-attention.
    for name, p in ours.named_parameters():
        if "gate" in name.rsplit(".", 1)[-1]:
            p.fill_(0.5)
    config = MllamaConfig(**hf_config_from_args(ours.args))
    with torch.device("meta"):
        hf = MllamaForConditionalGeneration(config)
    hf.load_state_dict(meta_to_hf(ours.state_dict(), ours.args), strict=True, assign=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".partial-"))
    hf.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(path)  # atomic: a half-written checkpoint is never picked up


# --- inputs ------------------------------------------------------------------------------
def make_inputs(seed: int = 0):
    """(prompt ids, images [1, 1, 4, 3, S, S], aspect ratios [1, 1, 2])."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 128000, (PROMPT_LEN - 1,), generator=g).tolist()
    prompt = [IMAGE_TOKEN] + text
    s, t = PARAMS["vision_chunk_size"], PARAMS["vision_max_num_chunks"]
    images = torch.zeros(1, 1, t, 3, s, s)
    n = RATIO[0] * RATIO[1]
    images[0, 0, :n] = torch.randn(n, 3, s, s, generator=g)
    return prompt, images, torch.tensor([[list(RATIO)]])


def hf_inputs(prompt, images):
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    from llama_vision.checkpoint.hf import supported_aspect_ratios

    t = PARAMS["vision_max_num_chunks"]
    n = RATIO[0] * RATIO[1]
    mask = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(prompt, IMAGE_TOKEN)], num_tiles=[[n]], max_num_tiles=t, length=len(prompt)
    )
    ar_mask = torch.zeros(1, 1, t, dtype=torch.long)
    ar_mask[0, 0, :n] = 1
    return dict(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        pixel_values=images,
        aspect_ratio_ids=torch.tensor([[supported_aspect_ratios(t).index(RATIO) + 1]]),
        aspect_ratio_mask=ar_mask,
        cross_attention_mask=torch.from_numpy(mask),
    )


# --- the two implementations ---------------------------------------------------------------
class Ours:
    name = "ours"

    def __init__(self, ckpt: Path, loader: str = "auto"):
        self.model, self.loader = load_ours(ckpt, loader)
        from llama_vision.generation import Generator

        self.gen = Generator(self.model.eval())

    def generate(self, prompt, images, ar, new_tokens: int) -> tuple[list[int], list[float]]:
        stamps: list[float] = []
        out = self.gen.generate_from_tensors(
            [prompt], images=images, aspect_ratios=ar, max_new_tokens=new_tokens, stop_tokens=[],
            on_token=lambda row, tok: stamps.append(time.perf_counter()),
        )
        return out[0], stamps


def load_ours(ckpt: Path, loader: str = "auto"):
    """(model, loader used). "package": llama_vision.checkpoint.load_model; "mmap": the
    benchmark's own loader; "auto": the package's, falling back to mmap when it is missing
    or cannot read this dir."""
    import llama_vision.checkpoint as ck

    if loader in ("auto", "package") and hasattr(ck, "load_model"):
        try:
            return ck.load_model(ckpt), "package"
        except Exception as e:  # noqa: BLE001 -- reported, then the fallback runs
            if loader == "package":
                raise
            print(f"note: llama_vision.checkpoint.load_model failed ({type(e).__name__}: {e}); using the mmap loader", file=sys.stderr)
    elif loader == "package":
        raise RuntimeError("llama_vision.checkpoint has no load_model")
    return load_mmap(ckpt), "mmap"


def load_mmap(ckpt: Path):
    """Build on the meta device (no allocation, no random init) and assign the
    memory-mapped safetensors tensors: each weight exists once, as file pages that are
    read when first used."""
    from safetensors.torch import load_file

    import llama_vision.checkpoint as ck
    from llama_vision.model import build_model

    config = json.loads((ckpt / "config.json").read_text())
    model = build_model(ck.params_from_hf_config(config), device="meta")
    sd = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        sd.update({_runtime_key(k): v for k, v in load_file(f).items()})
    # Every tensor the model holds is in the state dict (the RoPE table is no buffer:
    # computed on the first forward), so assigning them is the whole materialisation.
    model.load_state_dict(ck.hf_to_meta(sd, model.args), strict=True, assign=True)
    return model


# save_pretrained writes Mllama's original key layout; hf_to_meta reads the in-memory one.
_SAVED_TO_RUNTIME = (
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^(vision_model|multi_modal_projector)\."), r"model.\1."),
)


def _runtime_key(key: str) -> str:
    for pattern, repl in _SAVED_TO_RUNTIME:
        key = pattern.sub(repl, key)
    return key


class Theirs:
    name = "transformers"

    def __init__(self, ckpt: Path, loader: str = "auto"):  # noqa: ARG002 -- one loader
        from transformers import MllamaForConditionalGeneration

        patch_vision_taps()
        self.model = MllamaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="sdpa", dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(self, prompt, images, ar, new_tokens: int) -> tuple[list[int], list[float]]:
        stamps: list[float] = []

        class Stamp:  # a streamer: put() gets the prompt once, then every new token
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        out = self.model.generate(
            **hf_inputs(prompt, images), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            streamer=Stamp(), pad_token_id=0,
        )
        return out[0, len(prompt):].tolist(), stamps[1:]


def patch_vision_taps() -> None:
    """Meta's intermediate-feature taps for transformers' vision encoder (see the tests)."""
    from transformers.modeling_outputs import BaseModelOutput
    from transformers.models.mllama import modeling_mllama

    def forward(self, hidden_states, attention_mask=None):
        states = ()
        for layer in self.layers:
            states += (hidden_states,)
            hidden_states = layer(hidden_states=hidden_states, attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states + (hidden_states,))

    modeling_mllama.MllamaVisionEncoder.forward = forward


IMPLS = {"ours": Ours, "transformers": Theirs}


def timed_run(impl, prompt, images, ar, new_tokens: int) -> dict:
    start = time.perf_counter()
    tokens, stamps = impl.generate(prompt, images, ar, new_tokens)
    end = time.perf_counter()
    assert len(stamps) == new_tokens, (impl.name, len(stamps))
    return {
        "tokens": tokens,
        "ttft_s": stamps[0] - start,
        "decode_tok_s": (new_tokens - 1) / (stamps[-1] - stamps[0]),
        "total_s": end - start,
    }


# --- peak memory, one child process per implementation ---------------------------------------
def child_main(impl_name: str, ckpt: Path, new_tokens: int, threads: int, loader: str) -> None:
    torch.set_num_threads(threads)
    base = peak_rss_mib()
    impl = IMPLS[impl_name](ckpt, loader)
    loaded = peak_rss_mib()
    prompt, images, ar = make_inputs()
    tokens, _ = impl.generate(prompt, images, ar, new_tokens)
    print(json.dumps({"imports_mib": base, "after_load_mib": loaded, "peak_mib": peak_rss_mib(), "tokens": tokens,
                      "loader": getattr(impl, "loader", "from_pretrained")}))


def peak_rss_mib() -> float:
    """This process's peak resident set (MiB). VmHWM belongs to the current address space,
    which exec replaces; ru_maxrss would carry over the parent's peak across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_rss(impl_name: str, ckpt: Path, new_tokens: int, threads: int, loader: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl_name, "--ckpt", str(ckpt), "--new-tokens", str(new_tokens),
           "--threads", str(threads), "--ours-loader", loader]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- driver --------------------------------------------------------------------------------
TARGETS = {"prefill_speedup": (">=", 1.2), "decode_speedup": (">=", 1.5), "peak_rss_ratio": ("<=", 0.8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per implementation (median reported; >= 3)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu_vs_hf.json")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "llama_vision_bench",
                    help="where the HF checkpoint is written once")
    ap.add_argument("--ours-loader", choices=("auto", "package", "mmap"), default="auto",
                    help="package: llama_vision.checkpoint.load_model; mmap: meta-device model + assigned "
                         "memory-mapped tensors; auto: package, else mmap")
    ap.add_argument("--child", choices=sorted(IMPLS), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, args.ckpt, args.new_tokens, args.threads, args.ours_loader)
    if args.runs < 3:
        ap.error("--runs must be >= 3")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode speed is measured after the first token)")
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dir(args.cache)
    load_before = os.getloadavg()

    # Peak memory first, in fresh processes, before this one has loaded anything big.
    memory = {name: peak_rss(name, ckpt, args.new_tokens, args.threads, args.ours_loader) for name in IMPLS}
    impls = {name: cls(ckpt, args.ours_loader) for name, cls in IMPLS.items()}
    prompt, images, ar = make_inputs()
    for impl in impls.values():  # warm-up: allocator, lazy imports, first touch of the weights
        impl.generate(prompt, images, ar, 8)
    runs: dict[str, list[dict]] = {name: [] for name in IMPLS}
    order = list(IMPLS)
    for r in range(args.runs):
        for name in order if r % 2 == 0 else order[::-1]:
            res = timed_run(impls[name], prompt, images, ar, args.new_tokens)
            runs[name].append(res)
            print(f"run {r} {name:>12}: ttft {res['ttft_s'] * 1e3:7.1f} ms  decode {res['decode_tok_s']:6.1f} tok/s", flush=True)

    reference = runs["transformers"][0]["tokens"]
    for name, rs in runs.items():
        for res in rs:
            assert res["tokens"] == reference, f"{name} generated different tokens"
        assert memory[name]["tokens"] == reference, f"{name} (memory child) generated different tokens"

    summary = {}
    for name in IMPLS:
        summary[name] = {
            "ttft_ms": statistics.median(r["ttft_s"] for r in runs[name]) * 1e3,
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs[name]),
            "total_s": statistics.median(r["total_s"] for r in runs[name]),
            # Best run: other load only ever adds time, so this estimates a quiet machine.
            "ttft_ms_best": min(r["ttft_s"] for r in runs[name]) * 1e3,
            "decode_tok_s_best": max(r["decode_tok_s"] for r in runs[name]),
            "peak_rss_mib": memory[name]["peak_mib"],
            "rss_after_imports_mib": memory[name]["imports_mib"],
            "rss_after_load_mib": memory[name]["after_load_mib"],
        }
    ours, theirs = summary["ours"], summary["transformers"]
    ratios = {
        "prefill_speedup": theirs["ttft_ms"] / ours["ttft_ms"],
        "decode_speedup": ours["decode_tok_s"] / theirs["decode_tok_s"],
        "peak_rss_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
        "prefill_speedup_best": theirs["ttft_ms_best"] / ours["ttft_ms_best"],
        "decode_speedup_best": ours["decode_tok_s_best"] / theirs["decode_tok_s_best"],
        # The same without the torch runtime both processes carry (identical imports).
        "peak_rss_above_imports_ratio": (ours["peak_rss_mib"] - ours["rss_after_imports_mib"])
        / (theirs["peak_rss_mib"] - theirs["rss_after_imports_mib"]),
    }
    met = {k: (ratios[k] >= b if op == ">=" else ratios[k] <= b) for k, (op, b) in TARGETS.items()}

    print(f"\n{'':26}{'ours':>10}{'transformers':>14}   ratio (target)")
    for label, key, target in (("time to first token, ms", "ttft_ms", "prefill_speedup"),
                               ("decode, tokens/s", "decode_tok_s", "decode_speedup"),
                               ("peak RSS, MiB", "peak_rss_mib", "peak_rss_ratio")):
        op, bound = TARGETS[target]
        print(f"{label:26}{ours[key]:10.1f}{theirs[key]:14.1f}   {target} {ratios[target]:.2f} "
              f"({op} {bound}: {'met' if met[target] else 'NOT met'})")
    print(f"best runs: prefill speedup {ratios['prefill_speedup_best']:.2f}, decode speedup {ratios['decode_speedup_best']:.2f}")
    print(f"peak RSS above the post-import baseline: ours/theirs {ratios['peak_rss_above_imports_ratio']:.2f}")
    print(f"tokens identical over {args.new_tokens} new tokens: yes; ours loaded by: {impls['ours'].loader}")

    result = {
        "config": {**PARAMS, "prompt_len": PROMPT_LEN, "image_tiles": list(RATIO), "new_tokens": args.new_tokens,
                   "threads": args.threads, "runs": args.runs, "dtype": "float32", "ours_loader": impls["ours"].loader},
        "env": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
                "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "summary": summary,
        "ratios": ratios,
        "targets": {k: f"{op} {b}" for k, (op, b) in TARGETS.items()},
        "targets_met": met,
        "runs": {name: [{k: v for k, v in res.items() if k != "tokens"} for res in rs] for name, rs in runs.items()},
        "memory": {name: {k: v for k, v in m.items() if k != "tokens"} for name, m in memory.items()},
        "tokens": reference,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
