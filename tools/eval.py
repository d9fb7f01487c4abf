#!/usr/bin/env python
"""Score a checkpoint on evaluation tasks (configs/eval/<task>.yaml), from local data.

  python tools/eval.py --ckpt DIR --tasks vqav2,docvqa,chartqa --data-root ROOT --output-dir OUT
  torchrun --nproc_per_node 8 tools/eval.py --ckpt DIR --tasks mmmu ...          # 8 data-parallel shards
  torchrun --nproc_per_node 8 tools/eval.py --ckpt DIR --tp 8 --tasks mmmu ...   # one 8-way TP model
  python tools/eval.py ... vqav2.max_new_tokens=10 chat=false                     # task config overrides

Overrides are key=value (every task) or TASK.key=value (one task), parsed like training
config overrides. A rerun with the same --output-dir resumes: finished samples are kept.
Outputs: OUT/<task>/predictions.jsonl, OUT/results.json, OUT/results.md (llama_vision/eval/runner.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision import inference as inf  # noqa: E402
from llama_vision.config import ConfigError  # noqa: E402
from llama_vision.eval.runner import evaluate  # noqa: E402
from llama_vision.eval.tasks import load_tasks  # noqa: E402

TASK_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint dir (Meta: params.json + consolidated.*.pth; or HF)")
    p.add_argument("--lora", help="a LoRA dir (lora.safetensors + lora_config.json) or PEFT adapter dir, run unmerged")
    p.add_argument("--tasks", help="comma-separated task names (in --task-dir) or YAML paths")
    p.add_argument("--data-root", help="folder the tasks' data paths are relative to")
    p.add_argument("--output-dir", help="predictions, results.json, results.md (a rerun resumes)")
    p.add_argument("--task-dir", default=str(TASK_DIR), help=f"where task names are looked up (default {TASK_DIR})")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree under torchrun; the rest of the world shards the data (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="samples generated together per process")
    p.add_argument("--limit", type=int, help="only the first N samples of every task")
    p.add_argument("--tokenizer", help="tokenizer.model (default: CKPT/tokenizer.model)")
    p.add_argument("--dtype", default="bf16", choices=sorted(inf.DTYPES))
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the local GPU, else cpu)")
    p.add_argument("--list-tasks", action="store_true", help="print the tasks in --task-dir and exit")
    p.add_argument("overrides", nargs="*", help="key=value or TASK.key=value task config overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_tasks:
        for path in sorted(Path(args.task_dir).glob("*.yaml")):
            print(path.stem)
        return 0
    missing = [f for f in ("ckpt", "tasks", "data_root", "output_dir") if getattr(args, f) is None]
    if missing:
        print("error: give " + ", ".join("--" + m.replace("_", "-") for m in missing), file=sys.stderr)
        return 2
    try:
        tasks = load_tasks([t for t in args.tasks.split(",") if t], args.task_dir, args.overrides, args.limit)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = inf.setup(args.ckpt, args.tokenizer, args.device, args.dtype, tp=args.tp, lora=args.lora)
    gen.model.eval()
    run_info = {"ckpt": str(Path(args.ckpt).resolve()), "dtype": args.dtype, "tp": args.tp, "model": dataclasses.asdict(gen.model.args)}
    try:
        evaluate(gen, tasks, args.data_root, args.output_dir, batch_size=args.batch_size, run_info=run_info)
    finally:
        inf.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
