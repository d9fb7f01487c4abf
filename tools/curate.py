#!/usr/bin/env python
"""Curate image-text or video-text pairs on Ray Data (see docs/curation.md):

    tools/curate.py --config configs/curate/image.yaml --input 'shards/{000000..000999}.tar' \\
        --output curated/ [--stages caption_rules,phash_dedup] [--ray-address auto] [key=value ...]

--input      brace/glob pattern(s) of WebDataset / img2dataset tars, JSONL manifests or
             parquet files (repeatable)
--output     output folder: shards/*.tar (WebDataset, what tools/train.py reads),
             samples/*.parquet (every sample's decision), report.json, plots/*.png;
             rerunning into the same folder resumes (finished input shards are skipped)
--stages     run only these stages of the YAML (in YAML order)
--ray-address  a Ray cluster (``auto``: the one ``ray start`` made here); default: a local Ray
key=value    config overrides: ``seed=1``, ``clip.weights=PATH``, ``clip_score.threshold=0.3``
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision.config import ConfigError  # noqa: E402
from llama_vision.curation import load_curation_config, run_curation, select_stages  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    head, _, details = __doc__.strip().partition("\n\n")
    parser = argparse.ArgumentParser(description=head, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="curation YAML (configs/curate/*.yaml)")
    parser.add_argument("--input", required=True, action="append", help="input shard pattern (repeatable)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--stages", default=None, help="comma-separated subset of the YAML's stages")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (auto, or host:port)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_curation_config(args.config, args.overrides)
        cfg = select_stages(cfg, [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None)
        report = run_curation(cfg, args.input, args.output, ray_address=args.ray_address,
                              progress=not args.no_progress)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {s["name"]: f"{s['kept']}/{s['input']} kept" for s in report["stages"]}
    print(json.dumps({"output": report["output"], "skipped": report["read"]["skipped"], "stages": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
