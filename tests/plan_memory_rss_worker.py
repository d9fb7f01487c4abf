"""Measured in a fresh process for tests/test_plan_memory.py: the resident-memory increase
of building a training config's model (trainer's build, precision, AdamW groups) and
running two optimizer steps of `grad_accum_steps` micro-batches on synthetic batches of
the planner's shape. From the second step on, the weights, the gradients (accumulated
over the micro-batches), AdamW's state and a micro-batch's activations are alive
together: the peak the planner's total describes.

usage: python plan_memory_rss_worker.py CONFIG_YAML '["key=value", ...]'
prints one JSON line: {"baseline": bytes, "peak": bytes, "delta": bytes}
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision.config import load_config  # noqa: E402
from llama_vision.training.build import build_training_model, load_model_params  # noqa: E402
from llama_vision.training.losses import lm_loss_sum  # noqa: E402
from llama_vision.training.optim import stage_param_groups  # noqa: E402
from llama_vision.training.precision import apply_precision, resolve_precision  # noqa: E402
from llama_vision.training.profiling import peak_memory_bytes, reset_peak_memory  # noqa: E402
from llama_vision.training.train_config import TrainConfig  # noqa: E402


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def batch(args, rows: int, seq: int, tiles: int, g: torch.Generator):
    """Rows of random ids with one image placeholder first, one image of `tiles` tiles each."""
    tokens = torch.randint(0, args.vocab_size, (rows, seq), generator=g)
    tokens[:, 0] = args.image_token_id
    labels = torch.randint(0, args.vocab_size, (rows, seq), generator=g)
    size = args.vision_chunk_size
    images = torch.randn(rows, 1, tiles, 3, size, size, generator=g)
    aspect = torch.tensor([[[1, tiles]]] * rows)
    return tokens, labels, images, aspect


def train_steps(cfg: TrainConfig, steps: int) -> None:
    params = load_model_params(cfg.model)
    model = build_training_model(cfg, SimpleNamespace(n_words=params["vocab_size"]))
    model = apply_precision(model, resolve_precision(cfg, "cpu"))
    model.train()
    o = cfg.optim
    optimizer = torch.optim.AdamW(stage_param_groups(model.named_parameters(), o.lr, o.weight_decay), lr=o.lr)
    args = model.args
    tiles = cfg.data.max_num_tiles or args.vision_max_num_chunks
    seq = min(cfg.data.max_seq_len, args.max_seq_len)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for _ in range(cfg.grad_accum_steps):
            tokens, labels, images, aspect = batch(args, cfg.micro_batch_size, seq, tiles, g)
            (lm_loss_sum(model(tokens, images, aspect), labels) / labels.numel()).backward()
            del tokens, labels, images, aspect
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    config, overrides = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    cfg = load_config(TrainConfig, config, overrides)
    # Warm-up on the tiny model first: thread pools, kernels and allocator arenas that any
    # first step sets up once are then part of the baseline, not of the measured delta.
    _warm_up()
    gc.collect()
    baseline = current_rss()
    if not reset_peak_memory(torch.device("cpu")):
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs)")
    train_steps(cfg, steps=2)
    peak = peak_memory_bytes(torch.device("cpu"))
    print(json.dumps({"baseline": baseline, "peak": peak, "delta": peak - baseline}))


def _warm_up() -> None:
    import yaml

    import llama_vision

    tiny = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml").read_text())
    model = llama_vision.build_model({**tiny, "vocab_size": 512})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens, labels, images, aspect = batch(model.args, 1, 16, 2, torch.Generator().manual_seed(1))
    lm_loss_sum(model(tokens, images, aspect), labels).backward()
    optimizer.step()


if __name__ == "__main__":
    main()
