#!/usr/bin/env python
"""Answer a prompt about one or more images with a Meta or HF Llama 3.2 Vision checkpoint.

  python tools/infer_image.py --ckpt DIR --image photo.jpg --prompt "What is in this image?"
  torchrun --nproc_per_node 2 tools/infer_image.py --ckpt DIR --image a.jpg --image b.jpg --prompt ...
  python tools/infer_image.py --ckpt DIR --image photo.jpg --interactive
  python tools/infer_image.py --ckpt DIR --jsonl requests.jsonl --output answers.jsonl
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision import inference as inf  # noqa: E402
from llama_vision.data.image import ImageLoadError, ImageProcessor, load_image  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir (Meta: params.json + consolidated.*.pth; or HF)")
    p.add_argument("--lora", help="a LoRA dir (lora.safetensors + lora_config.json) or PEFT adapter dir, run unmerged")
    p.add_argument("--image", action="append", default=[], help="image path (repeat for several images)")
    p.add_argument("--prompt", default="", help="the question / instruction")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--interactive", action="store_true", help="multi-turn chat about the images")
    mode.add_argument("--jsonl", help='batch mode: lines of {"image": path | "images": [...], "prompt": ...}')
    p.add_argument("--output", help="answers JSONL for --jsonl (default: <jsonl>.answers.jsonl)")
    p.add_argument("--raw", action="store_true", help="base model: no chat template, just <|image|><|begin_of_text|>prompt")
    inf.add_common_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.image or args.jsonl):
        print("error: give --image PATH (and --prompt or --interactive) or --jsonl FILE", file=sys.stderr)
        return 2
    try:
        images = [load_image(p) for p in args.image]
    except ImageLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = inf.setup(args.ckpt, args.tokenizer, args.device, args.dtype, lora=args.lora)
    sampling = inf.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    a = gen.model.args
    processor = ImageProcessor(tile_size=a.vision_chunk_size, max_num_tiles=a.vision_max_num_chunks)
    say = print if inf.is_main() else (lambda *_: None)
    if args.jsonl:
        def handle(req):
            paths = req.get("images") or ([req["image"]] if req.get("image") else [])
            return inf.answer_images(gen, [load_image(p) for p in paths], req.get("prompt", ""), sampling, args.raw)

        out = args.output or f"{args.jsonl}.answers.jsonl"
        ok = inf.run_jsonl(inf.read_jsonl(args.jsonl), handle, out)
        say(f"answered {ok} request(s) -> {out}")
        return 0
    say(inf.describe_images(images, processor))
    if args.interactive:
        say("chat about the image(s); /exit to quit")
        inf.chat_loop(gen, images, sampling)
        return 0
    say(f"prompt: {args.prompt}")
    say(f"answer: {inf.answer_images(gen, images, args.prompt, sampling, args.raw)}")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        inf.teardown()
    sys.exit(code)
