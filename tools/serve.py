#!/usr/bin/env python
"""Serve a checkpoint over an OpenAI-compatible HTTP API, continuously batched.

  python tools/serve.py --ckpt DIR [--host 127.0.0.1] [--port 8000] [--max-batch 16]
  torchrun --nproc_per_node 2 tools/serve.py --ckpt DIR      # tensor parallel: rank 0 serves
  python tools/serve.py --ckpt DIR --lora pirate=runs/a/final --lora legal=peft-adapter/   # + LoRA adaptors

Then POST /v1/chat/completions (the OpenAI Chat Completions schema, `stream: true` for
server-sent events), GET /v1/models, /health, /metrics, and a chat page at GET /.
See docs/serving.md.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision import inference as inf  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir (Meta: params.json + consolidated.*.pth; or HF)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: CKPT/tokenizer.model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the URL is printed)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adaptor (our LoRA dir or a PEFT adapter dir) as model NAME, beside the base "
                        "(repeat for several; requests choose by the `model` field)")
    p.add_argument("--model-name", help="the model id of /v1/models and responses (default: the checkpoint folder's name)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV-cache slots)")
    p.add_argument("--max-seq-len", type=int, help="context per request, prompt + answer (default and cap: the model's)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before new ones get 429")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-videos", type=int, default=2, help="videos per request (a LLaVA checkpoint's projector video path)")
    p.add_argument("--max-image-pixels", type=int, default=64_000_000, help="width x height per image (over: 413)")
    p.add_argument("--image-cache", type=int, default=64, help="images whose cross-attention K/V is kept (0: off)")
    p.add_argument("--request-timeout", type=float, help="seconds a request may take from arrival to its last token")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit in MiB (over: 413)")
    p.add_argument("--default-max-tokens", type=int, help="max_tokens of requests that give none (default: what the context leaves)")
    p.add_argument("--allow-local-files", action="store_true", help="accept file:// image URLs (paths on the server's disk)")
    p.add_argument("--dtype", default="bf16", choices=sorted(inf.DTYPES))
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the local GPU, else cpu)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level")
    return p.parse_args(argv)


def parse_adaptors(specs: list[str]) -> dict[str, str]:
    """["name=dir", ...] -> {name: dir} (a repeated name is an error)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora {spec!r}: expected NAME=DIR")
        if name in out:
            raise SystemExit(f"--lora: the name {name!r} is given twice")
        out[name] = path
    return out


def serve(args, engine) -> None:
    """Rank 0: the HTTP server, until SIGINT / SIGTERM."""
    import socket

    import uvicorn

    from llama_vision.serving.http import build_app

    name = args.model_name or Path(args.ckpt).resolve().name
    app = build_app(engine, name, max_body_bytes=int(args.max_body_mb * (1 << 20)), allow_local_files=args.allow_local_files,
                    default_max_tokens=args.default_max_tokens)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5, access_log=args.log_level in ("info", "debug"))
    server = uvicorn.Server(config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {name} on http://{host}:{port}/  (OpenAI API: http://{host}:{port}/v1, chat page: http://{host}:{port}/)", flush=True)
    server.run(sockets=[sock])


def main(argv=None) -> int:
    args = parse_args(argv)
    gen = inf.setup(args.ckpt, args.tokenizer, args.device, args.dtype)
    from llama_vision.serving.engine import Engine
    from llama_vision.serving.lora_bank import LoraBank

    bank = LoraBank.attach(gen.model, parse_adaptors(args.lora)) if args.lora else None
    engine = Engine(gen.model, gen.tokenizer, max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_queue=args.max_queue,
                    image_cache_size=args.image_cache, max_images=args.max_images, max_videos=args.max_videos,
                    max_image_pixels=args.max_image_pixels,
                    request_timeout_s=args.request_timeout, lora_bank=bank)
    try:
        if inf.is_main():
            engine.start()
            serve(args, engine)
        else:
            # Ctrl-C (and torchrun's SIGTERM) reach every rank: the followers leave when rank 0's
            # engine shuts down and broadcasts so (a follower that died first would leave rank 0
            # blocked in a collective). torchrun SIGKILLs whatever is left after its grace period.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            engine.follow()
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        inf.teardown()
    sys.exit(code)
