#!/usr/bin/env python
"""Train a stage: `torchrun --nproc_per_node 8 tools/train.py --config configs/train/<stage>.yaml
key=value ... [--resume]` (any config field can be overridden, e.g. max_steps=100 optim.lr=1e-4)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision.config import format_config_help, load_config, parse_cli  # noqa: E402
from llama_vision.training.train_config import TrainConfig  # noqa: E402
from llama_vision.training.trainer import train  # noqa: E402


def main(argv=None) -> None:
    if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
        print(f"{__doc__.strip()}\n\n{format_config_help(TrainConfig)}")
        return
    config_path, overrides, flags = parse_cli(argv)
    cfg = load_config(TrainConfig, config_path, overrides)
    train(cfg, resume=bool(flags.get("resume")))


if __name__ == "__main__":
    main()
