#!/usr/bin/env python
"""Convert LoRA adaptors between llama_vision's layout and PEFT's (transformers' Mllama).

  python tools/convert_lora.py --to peft --input runs/image_sft_lora/final --output peft-adapter/ \
      --base-model-name meta-llama/Llama-3.2-11B-Vision-Instruct
      # then: PeftModel.from_pretrained(MllamaForConditionalGeneration.from_pretrained(...), "peft-adapter")
  python tools/convert_lora.py --to llama_vision --input peft-adapter/ --base Llama3.2-11B-Vision/ --output lora/
      # then: load_lora(load_base("lora/"), "lora/"), or --lora lora/ in the inference tools

llama_vision: lora.safetensors + lora_config.json; PEFT: adapter_model.safetensors +
adapter_config.json. Groups a run trained whole (lora_config's also_trained) travel as
PEFT's modules_to_save. All logic lives in llama_vision.checkpoint.peft.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama_vision.checkpoint.peft import export_peft, peft_to_lora_dir  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=["peft", "llama_vision"], help="output layout")
    p.add_argument("--input", required=True, help="a LoRA dir (--to peft) or a PEFT adapter dir (--to llama_vision)")
    p.add_argument("--output", required=True, help="output dir (created; files in it are replaced)")
    p.add_argument("--base", help="--to llama_vision: the base checkpoint (Meta or HF) the adapter was trained on")
    p.add_argument("--checkpoint", help="--to peft: the run's trained model (default: --input when it is one, as final/ is)")
    p.add_argument("--base-model-name", help="--to peft: adapter_config's base_model_name_or_path (a hub id or path)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="--to peft: cast the adapter's tensors (default float32)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.to == "peft":
        out = export_peft(a.input, a.output, checkpoint=a.checkpoint, base_model_name_or_path=a.base_model_name,
                          dtype=DTYPES[a.dtype] if a.dtype else None)
    else:
        if not a.base:
            raise SystemExit("--to llama_vision needs --base (the checkpoint the PEFT adapter was trained on)")
        out = peft_to_lora_dir(a.input, a.output, a.base)
    print(f"wrote {a.to} LoRA adapter to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
