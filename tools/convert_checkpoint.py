#!/usr/bin/env python
"""Convert Llama 3.2 Vision checkpoints between Meta's layout and Hugging Face's.

  python tools/convert_checkpoint.py --from meta --to hf --input Llama3.2-11B-Vision/ --output hf-11b/
  python tools/convert_checkpoint.py --from hf --to meta --input hf-11b/ --output meta-11b/ --num-shards 2 --dtype bf16
  python tools/convert_checkpoint.py --from meta --to meta --input a/ --output b/ --num-shards 8   # re-shard
  python tools/convert_checkpoint.py --from meta --to hf --input base/ --lora runs/x/final --output merged-hf/
      # base + the LoRA adaptors of a LoRA run (lora.safetensors + lora_config.json), merged

Meta: params.json + consolidated.NN.pth (one file per model-parallel rank);
HF: config.json + safetensors (sharded with an index above --max-shard-gb).
tokenizer.model is copied when present. All logic lives in llama_vision.checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama_vision.checkpoint import checkpoint_format, convert_checkpoint, export_merged  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src_format", choices=["meta", "hf"], required=True, help="input format")
    p.add_argument("--to", dest="dst_format", choices=["meta", "hf"], required=True, help="output format")
    p.add_argument("--input", required=True, help="input checkpoint dir")
    p.add_argument("--output", required=True, help="output dir (created; files in it are replaced)")
    p.add_argument("--num-shards", type=int, default=1, help="Meta output: number of consolidated.NN.pth files (model-parallel ranks)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: keep)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="HF output: max size of one safetensors file")
    p.add_argument("--lora", help="a LoRA dir (lora.safetensors + lora_config.json): merge its adaptors into --input "
                                  "(the base; its lora_config's init_text_from trunk is swapped in first)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    found = checkpoint_format(a.input)
    if found != a.src_format:
        raise SystemExit(f"--from {a.src_format}, but {a.input} is a {found} checkpoint")
    if a.num_shards < 1:
        raise SystemExit("--num-shards must be >= 1")
    if a.lora:
        out = export_merged(a.lora, a.output, base=a.input, to=a.dst_format, num_shards=a.num_shards,
                            dtype=DTYPES[a.dtype] if a.dtype else None, max_shard_bytes=int(a.max_shard_gb * 1024**3))
        print(f"wrote {a.dst_format} checkpoint (base + merged LoRA) to {out}")
        return 0
    out = convert_checkpoint(
        a.input,
        a.output,
        a.dst_format,
        num_shards=a.num_shards,
        dtype=DTYPES[a.dtype] if a.dtype else None,
        max_shard_bytes=int(a.max_shard_gb * 1024**3),
    )
    print(f"wrote {a.dst_format} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
