#!/usr/bin/env python
"""Train a stage: `torchrun --nproc_per_node 8 tools/train.py --config configs/train/<stage>.yaml
key=value ... [--resume] [--profile N]` (any config field can be overridden, e.g. max_steps=100
optim.lr=1e-4; --profile N records N steps with torch.profiler after one warm-up step: the
config key profile_steps)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision.config import ConfigError, format_config_help, load_config, parse_cli  # noqa: E402
from llama_vision.training.train_config import TrainConfig  # noqa: E402
from llama_vision.training.trainer import train  # noqa: E402


def main(argv=None) -> None:
    if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
        print(f"{__doc__.strip()}\n\n{format_config_help(TrainConfig)}")
        return
    config_path, overrides, flags = parse_cli(profile_flag_to_override(sys.argv[1:] if argv is None else argv))
    cfg = load_config(TrainConfig, config_path, overrides)
    train(cfg, resume=bool(flags.get("resume")))


def profile_flag_to_override(argv: list[str]) -> list[str]:
    """`--profile N` / `--profile=N` -> the override `profile_steps=N` (placed where the flag
    was, so a later profile_steps=... still wins); everything else unchanged."""
    out, i = [], 0
    while i < len(argv):
        item = argv[i]
        if item == "--profile" or item.startswith("--profile="):
            value = item.partition("=")[2] if "=" in item else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in item else 2
            if not value.isdigit():
                raise ConfigError(f"--profile needs a number of steps (e.g. --profile 5), got {value!r}")
            out.append(f"profile_steps={value}")
            continue
        out.append(item)
        i += 1
    return out


if __name__ == "__main__":
    main()
