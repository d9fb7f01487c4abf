#!/usr/bin/env python
"""Real-token throughput of forward + backward with sequence packing vs padding (CPU).

Data: the CPU demo's shapes-world captions (one image per sample, 1-4 tiles of 112 px,
captions of 1-3 shapes), generated into ``--workdir`` with the demo's word-level
tokenizer. Model (random init, fp32): ``--stage image`` is the demo's stage 1
(configs/train/demo_image.yaml: the configs/model/demo.yaml trunk frozen, ViT + gated
cross-attention trained); ``--stage text`` its stage 0 (configs/train/demo_text.yaml: the
same captions without their images, the decoder trained). Each mode reads the SAME first ``--samples`` samples in stream order (no shuffle)
through the real loader (`training.data.build_loader`) and runs the stage objective's
forward + backward (no optimizer step) on every micro-batch, the modes' micro-batches
interleaved (see `time_interleaved`):

* ``padded``: ``micro_batch_size`` samples per micro-batch, padded to the longest;
* ``budget``: ``data.max_tokens_per_batch`` (unpacked rows x longest <= budget);
* ``packed``: ``data.packing`` with ``micro_batch_size = budget // max_seq_len`` rows.

tokens/s counts REAL tokens (every sample's tokens, image placeholders included; padding
excluded) over the forward + backward time; padding fraction = padded slots / all slots
of the decoder. Per mode: the median and the best tokens/s over ``--repeats`` passes, and
the median over passes of its tokens/s over the first mode's in the same pass (the modes
of a pass ran interleaved, under the same load from other processes).

  .venv/bin/python benchmarks/packing_throughput.py --stage image --samples 192 --repeats 3
  .venv/bin/python benchmarks/packing_throughput.py --stage text --samples 192 --repeats 3

The model is built as the trainer builds it (`training.build.build_training_model`, the
stage objective from `training.objectives.build_objective`); the trainer's optimizer and
collectives are not part of the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare_data(workdir: Path, n: int) -> dict:
    """Shapes-world training shards + the demo's word-level tokenizer (reused if present)."""
    from llama_vision.data.synthetic.shapes import generate_shapes_world, iter_shard_samples
    from llama_vision.tokenizer import train_sentencepiece

    info = generate_shapes_world(workdir / "data", n_train_images=n, n_test_images=0, n_train_videos=0,
                                 n_test_videos=0, seed=0, shard_size=512, progress=False)
    tok = workdir / "data" / "tokenizer.model"
    if not tok.exists() or not info["reused"]:
        captions = [s["caption"] for shard in info["image_shards"] for s in iter_shard_samples(shard)]
        train_sentencepiece(captions, tok, vocab_size=400, model_type="word")
    return {"shards": info["image_shards"], "tokenizer": str(tok)}


STAGES = {
    # Stage 1 of the demo: captions with their images; ViT + adapters train, trunk frozen.
    "image": {"config": "configs/train/demo_image.yaml", "overrides": {}},
    # Stage 0 of the demo: the caption language alone (text_only); the decoder trains.
    "text": {"config": "configs/train/demo_text.yaml", "overrides": {"data.kind": "caption_wds", "data.text_only": "true"}},
}


def mode_overrides(mode: str, a: argparse.Namespace) -> dict:
    if mode == "padded":
        return {"micro_batch_size": a.micro_batch_size}
    if mode == "budget":
        return {"data.max_tokens_per_batch": a.budget}
    if mode == "packed":
        return {"data.packing": "true", "micro_batch_size": max(1, a.budget // a.max_seq_len)}
    raise ValueError(mode)


class Mode:
    """One batching mode: its model (same seed: the same weights in every mode), the
    stage objective and the micro-batches holding the first `samples` samples."""

    def __init__(self, mode: str, a: argparse.Namespace, data: dict, out: Path):
        import torch

        from contextlib import nullcontext

        from llama_vision.config import load_config
        from llama_vision.tokenizer import load_tokenizer
        from llama_vision.training.build import build_training_model
        from llama_vision.training.data import build_loader
        from llama_vision.training.objectives import build_objective
        from llama_vision.training.train_config import TrainConfig

        stage = STAGES[a.stage]
        over = {
            **stage["overrides"], "init_from": "null", "tokenizer": data["tokenizer"], "output_dir": str(out / mode),
            "save_final": "false", "tensorboard": "false", "data.paths": json.dumps(data["shards"]),
            "data.shuffle": "false", "data.max_seq_len": a.max_seq_len, "max_steps": 1, **mode_overrides(mode, a),
        }
        cfg = load_config(TrainConfig, ROOT / stage["config"], [f"{k}={v}" for k, v in over.items()])
        tokenizer = load_tokenizer(cfg.tokenizer)
        torch.manual_seed(0)
        self.name = mode
        self.model = build_training_model(cfg, tokenizer)
        self.objective = build_objective(cfg, self.model, nullcontext)  # the stage's loss (fp32 on the CPU)
        self.batches, seen = [], 0
        for batch in build_loader(cfg, tokenizer, self.model.args, 0, 1, loop=False):
            if seen >= a.samples:  # the first --samples samples of the stream, whole micro-batches
                break
            self.batches.append(batch)
            seen += len(batch.keys)
        self.samples = seen
        self.model.train()
        self.step(self.batches[0])  # first-call costs (RoPE table, allocator) out of the timing

    def step(self, batch) -> float:
        """Forward + backward of one micro-batch (the trainer's normalisation); seconds."""
        t0 = time.perf_counter()
        (self.objective.loss_sum(batch) / max(batch.num_targets, 1)).backward()
        seconds = time.perf_counter() - t0
        self.model.zero_grad(set_to_none=True)
        return seconds

    def shape(self) -> dict:
        from llama_vision.training.flops import step_flops, step_shape_from_batch, trainable_from_model

        b = self.batches
        real, padded = sum(x.real_tokens for x in b), sum(x.padded_tokens for x in b)
        shapes = [s for x in b for s in step_shape_from_batch(x)]
        return {
            "mode": self.name, "samples": self.samples, "micro_batches": len(b), "rows": sum(len(x) for x in b),
            "real_tokens": real, "padded_tokens": padded, "padding_fraction": 1 - real / padded,
            "images": sum(int(x.num_images.sum()) for x in b),
            # Image slots through the encoder: packed rows encode their images only
            # (VisionLanguageModel.prepare_media(present_only=True)), padded ones every slot.
            "image_slots": sum((int(x.num_images.sum()) if x.packed else x.images.shape[0] * x.images.shape[1])
                               for x in b if x.images is not None),
            "model_flops": step_flops(self.model.args, shapes, trainable_from_model(self.model)).total,
        }


def time_interleaved(modes: list[Mode], rotate: int) -> dict[str, float]:
    """Seconds per mode for one pass over its micro-batches, the modes' micro-batches
    interleaved (one of each in turn, the order rotated per repeat) so that load from
    other processes falls on every mode alike."""
    seconds = {m.name: 0.0 for m in modes}
    order = modes[rotate % len(modes):] + modes[: rotate % len(modes)]
    for i in range(max(len(m.batches) for m in modes)):
        for m in order:
            if i < len(m.batches):
                seconds[m.name] += m.step(m.batches[i])
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llama_vision_packing_bench"))
    ap.add_argument("--samples", type=int, default=192, help="samples per mode (whole micro-batches)")
    ap.add_argument("--max-seq-len", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=16, help="padded mode: samples per micro-batch")
    ap.add_argument("--budget", type=int, default=448, help="budget mode: padded tokens; packed: budget // max_seq_len rows")
    ap.add_argument("--stage", choices=sorted(STAGES), default="image",
                    help="image: demo stage 1 (captions + images); text: demo stage 0 (the captions alone)")
    ap.add_argument("--modes", default="padded,budget,packed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/packing_throughput_<stage>.json")
    a = ap.parse_args()
    a.out = a.out or ROOT / f"benchmarks/results/packing_throughput_{a.stage}.json"

    import torch

    torch.set_num_threads(a.threads)
    data = prepare_data(a.workdir, max(a.samples + 64, 256))
    modes = [Mode(m, a, data, a.workdir / "runs") for m in a.modes.split(",")]
    shapes = {m.name: m.shape() for m in modes}
    seconds: dict[str, list[float]] = {m.name: [] for m in modes}
    for r in range(a.repeats):
        for name, t in time_interleaved(modes, r).items():
            seconds[name].append(t)
        print(f"repeat {r}: " + ", ".join(f"{n} {shapes[n]['real_tokens'] / t[-1]:.0f}" for n, t in seconds.items())
              + " tokens/s", flush=True)
    summary = []
    rates = {m.name: [shapes[m.name]["real_tokens"] / t for t in seconds[m.name]] for m in modes}
    first = modes[0].name
    for m in modes:
        r = rates[m.name]
        summary.append({**shapes[m.name], "seconds_median": statistics.median(seconds[m.name]),
                        "tokens_per_s_median": statistics.median(r), "tokens_per_s_best": max(r), "tokens_per_s_all": r,
                        # Within one repeat the modes ran interleaved, under the same load.
                        f"speedup_vs_{first}_median": statistics.median(x / y for x, y in zip(r, rates[first]))})
    modes = [m.name for m in modes]
    print(f"\n{'mode':8} {'micro-batches':>13} {'rows':>5} {'real tok':>9} {'padded tok':>10} {'padding':>8} "
          f"{'img slots':>9} {'tok/s median':>12} {'tok/s best':>10} {'vs ' + modes[0] + ' (median of repeats)':>28}")
    for s in summary:
        print(f"{s['mode']:8} {s['micro_batches']:>13} {s['rows']:>5} {s['real_tokens']:>9} {s['padded_tokens']:>10} "
              f"{s['padding_fraction']:>8.1%} {s['image_slots']:>9} {s['tokens_per_s_median']:>12.0f} "
              f"{s['tokens_per_s_best']:>10.0f} {s[f'speedup_vs_{modes[0]}_median']:>27.2f}x")
    result = {
        "config": {"stage": a.stage, "train_config": STAGES[a.stage]["config"], "init_from": None, "samples": a.samples,
                   "max_seq_len": a.max_seq_len, "micro_batch_size": a.micro_batch_size, "budget": a.budget,
                   "repeats": a.repeats, "threads": a.threads, "command": " ".join(sys.argv)},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                "load_avg": os.getloadavg(), "date": datetime.now().strftime("%Y-%m-%d %H:%M")},
        "results": summary,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
