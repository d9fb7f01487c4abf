#!/usr/bin/env python
"""Train a stage: `torchrun --nproc_per_node 8 tools/train.py --config configs/train/<stage>.yaml
key=value ... [--resume] [--profile N]` (any config field can be overridden, e.g. max_steps=100
optim.lr=1e-4; --profile N records N steps with torch.profiler after one warm-up step: the
config key profile_steps).

A curriculum (a YAML file with a top-level `stages:` list, e.g.
configs/train/onevision_curriculum.yaml) trains its stages in order in one launch, each from
the previous stage's final/: `tools/train.py --config CURRICULUM.yaml [STAGE.key=value ...]
[overrides.key=value ...] [output_dir=DIR] [--resume] [--stages a,b]`. STAGE.key=value sets a
key of one stage, overrides.key=value of every stage. A stage already done (its final/ and a
matching done-stamp) is skipped; --resume continues a stage stopped midway from its latest
checkpoint; --stages runs only the named stages. See llama_vision/training/curriculum.py."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision.config import ConfigError, format_config_help, load_config, parse_cli  # noqa: E402
from llama_vision.training.curriculum import is_curriculum_file, load_curriculum, run_curriculum  # noqa: E402
from llama_vision.training.train_config import TrainConfig  # noqa: E402
from llama_vision.training.trainer import train  # noqa: E402


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"{__doc__.strip()}\n\n{format_config_help(TrainConfig)}")
        return
    config_path, overrides, flags = parse_cli(profile_flag_to_override(stages_flag_value(argv)))
    if config_path is not None and is_curriculum_file(config_path):
        stages = flags.get("stages")
        if stages is True or stages == "":
            raise ConfigError("--stages needs stage names, e.g. --stages stage1,stage1_5")
        only = None if stages is None else [s.strip() for s in stages.split(",") if s.strip()]
        run_curriculum(load_curriculum(config_path, overrides), resume=bool(flags.get("resume")), only=only)
        return
    if "stages" in flags:
        raise ConfigError("--stages is for a curriculum config (a file with a top-level `stages:` list)")
    cfg = load_config(TrainConfig, config_path, overrides)
    train(cfg, resume=bool(flags.get("resume")))


def stages_flag_value(argv: list[str]) -> list[str]:
    """`--stages a,b` -> `--stages=a,b` (parse_cli reads a flag's value after `=` only)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--stages" and i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
            out.append(f"--stages={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


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
