"""Evaluation-harness tasks inside training: every ``eval_harness.every`` steps the model in
training answers the configured tasks (llama_vision/eval) and each task's score is logged
as ``eval/<task>`` in that step's metrics row; predictions and results.json go to
``output_dir/eval/step_<N>/``.

Every rank runs every sample, in the same batches: under FSDP and tensor parallelism each
forward is a collective, so the ranks must run the same forwards (greedy decoding of the
same inputs keeps them in step). Keep ``limit`` small: this is a progress signal, the full
benchmark is ``tools/eval.py`` on a saved checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from llama_vision.eval.runner import Shard, evaluate
from llama_vision.eval.tasks import TaskConfig, load_tasks
from llama_vision.generation import Generator

from .train_config import HarnessConfig


def harness_tasks(cfg: HarnessConfig) -> list[TaskConfig]:
    """The configured tasks, loaded now so that a bad task fails at start-up."""
    if not cfg.tasks or cfg.every <= 0:
        return []
    return load_tasks(cfg.tasks, cfg.task_dir, cfg.overrides, cfg.limit)


def run_harness(model, tokenizer, tasks: list[TaskConfig], cfg: HarnessConfig, out_dir: Path, step: int, rank: int,
                autocast: Callable) -> dict[str, float]:
    """Score ``model`` (restored to training mode after) -> {"eval/<task>": score}."""
    was_training = model.training
    model.eval()
    try:
        gen = Generator(model, tokenizer, streaming_layout=False)
        shard = Shard(rank=0, size=1, writer=rank == 0, merger=rank == 0)
        with autocast():
            results = evaluate(gen, tasks, cfg.data_root, out_dir / "eval" / f"step_{step}", batch_size=cfg.batch_size,
                               run_info={"step": step}, shard=shard, log=lambda *_: None)
    finally:
        model.train(was_training)
    return {f"eval/{name}": r["score"] for name, r in results["tasks"].items()}
