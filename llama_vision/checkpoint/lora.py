"""LoRA adaptors on disk: `lora.safetensors` + `lora_config.json` (llama_vision.model.lora).

    lora.safetensors    every adaptor's A and B, whole (the TP=1 tensors, whatever TP wrote
                        them), float32, under the model's keys
                        (`text_model.layers.0.attention.wq.adaptor.A.weight`, ...)
    lora_config.json    {"format", "rank", "alpha", "dropout", "targets" (the patterns asked
                        for), "modules" (the adapted linears), "base_checkpoint",
                        "init_text_from", "also_trained", ...}

`base_checkpoint` (and `init_text_from`, a trunk swapped in after it) name the weights
the adaptors were trained on: `load_lora(load_base(dir), dir)` rebuilds the LoRA model,
`export_merged` writes base + merged LoRA as a Meta or HF checkpoint through the usual
savers. A run that also trained whole groups (`also_trained`, e.g. the adapters and ViT of
image_sft_lora.yaml) changed weights the base does not hold: its `final/` (written with the
LoRA merged) is the trained model, the adaptors alone are not.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

import model_parallel as mp
from llama_vision.model.lora import apply_lora, has_lora, lora_modules, lora_state_dict, merged_state_dict
from llama_vision.utils.io import atomic_save_safetensors, atomic_write_text

__all__ = ["LORA_CONFIG", "LORA_FILE", "export_merged", "load_base", "load_lora", "read_lora_config", "save_lora"]

LORA_FILE = "lora.safetensors"
LORA_CONFIG = "lora_config.json"
FORMAT = "llama_vision-lora/1"


def _settings(model: nn.Module) -> dict:
    hosts = lora_modules(model)
    if not hosts:
        raise ValueError("the model has no LoRA adaptors")
    first = next(iter(hosts.values())).adaptor
    drop = getattr(first.dropout, "p", 0.0)
    return {"rank": first.rank, "alpha": first.alpha, "dropout": float(drop), "modules": list(hosts)}


def save_lora(
    model: nn.Module,
    out_dir: str | Path,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    targets: list[str] | None = None,
    base_checkpoint: str | Path | None = None,
    init_text_from: str | Path | None = None,
    extra: Mapping | None = None,
    write: bool = True,
) -> Path:
    """Write `model`'s adaptors to out_dir/lora.safetensors + lora_config.json. Collective
    over the TP group (each rank's shards are gathered to TP rank 0, which writes when
    `write`). state: the model's rank-local tensors when its state_dict() does not hold them
    whole (FSDP: `model_parallel.full_state_dict`; {} on ranks that keep none)."""
    out = Path(out_dir)
    local = {k: v.detach().to("cpu", torch.float32) for k, v in lora_state_dict(model, state).items()}
    shards = mp.all_gather_object(local, "tp")
    if not (write and mp.tp_rank() == 0 and shards[0]):
        return out
    full = mp.merge_shards(shards, mp.shard_plan(model, "runtime"))
    settings = _settings(model)
    config = {
        "format": FORMAT,
        **{k: settings[k] for k in ("rank", "alpha", "dropout")},
        "targets": list(targets) if targets is not None else settings["modules"],
        "modules": settings["modules"],
        "base_checkpoint": _path(base_checkpoint),
        "init_text_from": _path(init_text_from),
        **dict(extra or {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(full, out / LORA_FILE, metadata={"format": "pt"})
    atomic_write_text(out / LORA_CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def _path(p) -> str | None:
    return None if p is None else str(Path(p).resolve())


def read_lora_config(lora_dir: str | Path) -> dict:
    path = Path(lora_dir) / LORA_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a LoRA dir holds {LORA_FILE} + {LORA_CONFIG})")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown LoRA format {config.get('format')!r} (expected {FORMAT!r})")
    return config


@torch.no_grad()
def load_lora(model: nn.Module, lora_dir: str | Path) -> list[str]:
    """Put the adaptors of `lora_dir` onto `model` (a base model at any TP degree, each rank
    taking its slices): they are added first when the model has none (on the modules the
    config lists), else the model's must be those. Keys and shapes are strict. Returns the
    adapted modules' names."""
    from safetensors.torch import load_file

    lora_dir = Path(lora_dir)
    config = read_lora_config(lora_dir)
    modules = list(config["modules"])
    if not has_lora(model):
        apply_lora(model, modules, rank=config["rank"], alpha=config["alpha"], dropout=config["dropout"])
    elif list(lora_modules(model)) != modules:
        raise ValueError(f"{lora_dir}: the model's LoRA modules differ from the config's {modules[:4]}...")
    full = load_file(str(lora_dir / LORA_FILE))
    params = dict(model.named_parameters())
    want = set(lora_state_dict(model))
    missing, unexpected = sorted(want - set(full)), sorted(set(full) - want)
    if missing or unexpected:
        raise ValueError(f"{lora_dir / LORA_FILE}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    for key, t in mp.shard_state_dict(model, full).items():
        p = params[key]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{lora_dir / LORA_FILE}: {key} has shape {tuple(t.shape)} for this rank, the model {tuple(p.shape)}")
        p.copy_(t.to(p.dtype))
    for host in lora_modules(model).values():
        host.adaptor.merged = False
    return modules


def load_base(lora_dir: str | Path, base: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu"):
    """The base model the adaptors of `lora_dir` belong to: `base` (default: its
    base_checkpoint) with its init_text_from trunk swapped in, as the LoRA run built it."""
    from .load import load_model
    from .text_only import load_text_trunk_into

    config = read_lora_config(lora_dir)
    base = base or config.get("base_checkpoint")
    if not base:
        raise ValueError(f"{lora_dir}: no base_checkpoint recorded (the run started from random weights): pass base=")
    model = load_model(base, dtype=dtype, device=device)
    if config.get("init_text_from"):
        load_text_trunk_into(model, config["init_text_from"])
    return model


def export_merged(lora_dir: str | Path, out_dir: str | Path, *, base: str | Path | None = None, to: str = "meta",
                  num_shards: int = 1, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> Path:
    """base (+ init_text_from) + the adaptors of `lora_dir`, merged, written as a Meta
    ("meta": params.json + consolidated.NN.pth) or HF ("hf") checkpoint by the existing
    savers (single process, TP=1; the merge is computed in float32, `dtype` casts the
    output). tokenizer.model is copied from the LoRA dir or the base when present."""
    from .hf_io import DEFAULT_MAX_SHARD_BYTES, save_hf_checkpoint
    from .meta import save_meta_checkpoint

    if to not in ("meta", "hf"):
        raise ValueError(f"target format must be 'meta' or 'hf', got {to!r}")
    config = read_lora_config(lora_dir)
    if config.get("also_trained"):
        warnings.warn(f"{lora_dir}: the LoRA run also trained {config['also_trained']}, which the base lacks: "
                      "the export is base + LoRA only (the run's final/ holds the whole trained model)", stacklevel=2)
    model = load_base(lora_dir, base)
    load_lora(model, lora_dir)
    state = merged_state_dict(model)
    out = Path(out_dir)
    if to == "meta":
        save_meta_checkpoint(state, model.args, out, num_shards=num_shards, dtype=dtype)
    else:
        save_hf_checkpoint(state, out, args=model.args, dtype=dtype, max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    for src in (Path(lora_dir), Path(base or config["base_checkpoint"])):
        tok = src / "tokenizer.model"
        if tok.is_file():
            tmp = out / ".tokenizer.model.tmp"
            shutil.copyfile(tok, tmp)
            os.replace(tmp, out / "tokenizer.model")
            break
    return out
