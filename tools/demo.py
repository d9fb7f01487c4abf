#!/usr/bin/env python
"""The CPU demo: a tiny Llama-3.2-Vision-style model learns the synthetic "shapes world"
end to end on a laptop CPU, in three stages, and is evaluated on held-out data.

  python tools/demo.py --workdir demo_out            # full demo (~10 min on 2 cores)
  python tools/demo.py --workdir /tmp/d --quick      # smoke test (CI; accuracy not expected)

Steps: 1) generate the shapes world + a word-level tokenizer in WORKDIR/data (reused on a
rerun); 2) stage 0: text-only decoder pretraining on the captions (configs/train/demo_text.yaml);
3) stage 1: image adapters + ViT, decoder frozen (demo_image.yaml); 4) stage 2: video adapters
only (demo_video.yaml); 5) held-out evaluation -> WORKDIR/metrics.json (caption accuracy,
video direction accuracy, the same with every cross-attention gate forced to 0, and whether
the decoder stayed bitwise unchanged); 6) tools/infer_image.py / infer_video.py on samples.
A finished stage (same overrides) is reused on a rerun; delete WORKDIR/stageN to retrain it.

  python tools/demo.py --workdir demo_out --fusion projector   # the image stage LLaVA's way
  python tools/demo.py --workdir demo_out --fusion both        # both arms + a side-by-side table
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.shapes_demo.pipeline import DemoOptions, run_demo  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="output folder: data/, stage0-2/, metrics.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every training stage (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny data and a few steps per stage (a smoke test; accuracy targets not expected)")
    p.add_argument("--skip-video", action="store_true", help="stop after the image stage (no video stage / video metrics)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count (e.g. 2 for better accuracy, 0.5 for speed)")
    p.add_argument("--fusion", choices=["cross_attention", "projector", "both"], default="cross_attention",
                   help="how images reach the frozen decoder: Meta's gated cross-attention (default), LLaVA's projector "
                        "(early fusion), or both arms on the same trunk and data (metrics.json: fusion_comparison)")
    args = p.parse_args(argv)
    if args.steps_scale <= 0:
        p.error("--steps-scale must be positive")
    opts = DemoOptions(workdir=args.workdir, seed=args.seed, quick=args.quick, skip_video=args.skip_video, steps_scale=args.steps_scale,
                       fusion=args.fusion)
    run_demo(opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
