#!/usr/bin/env python
"""Answer a prompt about a video with a checkpoint that has video adapters.

  python tools/infer_video.py --ckpt DIR --video clip.mp4 --prompt "What happens?" [--num-frames 32]
  torchrun --nproc_per_node 2 tools/infer_video.py --ckpt DIR --video clip.mp4 --prompt ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision import inference as inf  # noqa: E402
from llama_vision.data.video import VideoLoadError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir with video adapters (params.json has 'video')")
    p.add_argument("--lora", help="a LoRA dir (lora.safetensors + lora_config.json) or PEFT adapter dir, run unmerged")
    p.add_argument("--video", required=True, help="video file (mp4, mkv, ... anything decord reads)")
    p.add_argument("--prompt", default="", help="the question / instruction")
    p.add_argument("--num-frames", type=int, help="frames sampled uniformly (default: the checkpoint's)")
    p.add_argument("--raw", action="store_true", help="base model: no chat template, just <|video|><|begin_of_text|>prompt")
    inf.add_common_args(p)
    args = p.parse_args(argv)
    if not Path(args.video).is_file():
        print(f"error: video file not found: {args.video}", file=sys.stderr)
        return 2
    gen = inf.setup(args.ckpt, args.tokenizer, args.device, args.dtype, lora=args.lora)
    sampling = inf.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    try:
        answer, summary = inf.answer_video(gen, args.video, args.prompt, sampling, args.raw, args.num_frames)
    except (VideoLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if inf.is_main():
        print(summary)
        print(f"prompt: {args.prompt}")
        print(f"answer: {answer}")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        inf.teardown()
    sys.exit(code)
