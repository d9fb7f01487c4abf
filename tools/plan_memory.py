#!/usr/bin/env python
"""Memory per GPU of a training config, from the meta-device model (nothing allocated):
weights (frozen / trainable), gradients, AdamW state, FSDP all-gather buffers, estimated
activations, the total, and whether it fits the card.

    tools/plan_memory.py --config configs/train/image_sft.yaml model=configs/model/llama3_2_90b_vision.yaml tp=8 --gpus 8 --gpu-memory-gib 80
    tools/plan_memory.py --table          # the README's "Memory per GPU" table

Any config key can be overridden as key=value (as tools/train.py takes them). The method
and its assumptions: llama_vision/training/memory_plan.py and activation_memory.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision.config import ConfigError, load_config  # noqa: E402
from llama_vision.training.memory_plan import GIB, format_plan, plan_memory, readme_table  # noqa: E402
from llama_vision.training.train_config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--config", help="training config YAML (configs/train/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. tp=8 micro_batch_size=2")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job: tp x data-parallel ranks (default 8)")
    p.add_argument("--gpu-memory-gib", type=float, default=80 * 10**9 / GIB,
                   help="memory of one GPU in GiB (default 74.5 = an 80 GB H100)")
    p.add_argument("--reserve-gib", type=float, default=2.0,
                   help="kept free for the CUDA context, NCCL / cuBLAS workspaces and fragmentation (default 2)")
    p.add_argument("--images-per-sample", type=int, default=1, help="images each sample attends to (default 1)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="plan a GPU run (bf16 frozen weights and autocast under dtype bf16) or a CPU run (float32)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--table", action="store_true", help="print the README table (11B / 90B, TP 1/2/8, fsdp / zero1)")
    args = p.parse_intermixed_args(argv)
    if not args.table and not args.config:
        p.error("--config is required (or --table)")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"unexpected argument(s) {bad}: overrides are key=value")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.table:
            print(readme_table(ROOT))
            return 0
        cfg = load_config(TrainConfig, args.config, args.overrides)
        plan = plan_memory(cfg, args.gpus, int(args.gpu_memory_gib * GIB), device=args.device,
                           images_per_sample=args.images_per_sample, reserve_bytes=int(args.reserve_gib * GIB))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"plan_memory: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**dataclasses.asdict(plan), "weights": plan.weights, "total": plan.total, "fits": plan.fits}, indent=1))
    else:
        print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
