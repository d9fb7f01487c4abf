#!/usr/bin/env python
"""Contrastive (CLIP) pretraining of a LLaVA model's vision tower on image-caption pairs:
the tower beside a small text transformer, CLIP's symmetric InfoNCE over each batch. Writes
OUTPUT_DIR/tower.safetensors (load it into a LLaVA model with `init_vision_from`),
metrics.jsonl and loss.png.

    tools/pretrain_tower.py --config configs/train/demo_clip.yaml
    tools/pretrain_tower.py --config configs/train/demo_clip.yaml max_steps=200 output_dir=/tmp/tower

Any config key can be overridden as key=value (llama_vision/training/contrastive.py:
ContrastiveConfig).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision.config import ConfigError, load_config  # noqa: E402
from llama_vision.training.contrastive import ContrastiveConfig, pretrain_tower  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--config", required=True, help="contrastive pretraining YAML (configs/train/*clip*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=200")
    args = p.parse_args(argv)
    try:
        cfg = load_config(ContrastiveConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"pretrain_tower: {exc}", file=sys.stderr)
        return 2
    _, summary = pretrain_tower(cfg)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
