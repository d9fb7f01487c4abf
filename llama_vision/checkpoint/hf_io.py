"""Hugging Face checkpoint dirs (config.json + safetensors), read and written.

Reading: `model.safetensors`, or `model-0000i-of-0000n.safetensors` + the
`model.safetensors.index.json` weight map. safetensors only -- pickle-based
`pytorch_model*.bin` files are refused (loading them could run code). Tensors come back
memory-mapped: pages are read when a tensor is used, so slicing one rank's part of a
large checkpoint reads little more than that part.

Key names: transformers >= 5 names the modules `model.language_model.*`,
`model.vision_model.*`, `model.multi_modal_projector.*`, `lm_head.*` in memory (what
`hf.meta_to_hf` produces) but reads and writes files with the names the Hub checkpoints
use (`language_model.model.*`, `language_model.lm_head.*`, `vision_model.*`,
`multi_modal_projector.*`). Both are accepted here; files are written with the Hub names,
so transformers 4.x and 5.x both read them.

Writing: config.json from `hf_config_from_args`, safetensors split into files of at most
`max_shard_bytes` (+ the index when there is more than one), each written atomically;
an existing config.json is removed first and rewritten LAST, so a dir with a config.json is
complete.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

import model_parallel as mp
from llama_vision.model.args import ModelArgs
from llama_vision.utils.io import CheckpointFormatError, atomic_save_safetensors, atomic_write_text

from .hf import hf_config_from_args, hf_to_meta, meta_to_hf, params_from_hf_config, precompute_by_aspect_ratio, supported_aspect_ratios
from .meta import CheckpointMismatchError, args_from_params, tensors_for_saving

Tensor = torch.Tensor
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


# (file prefix, in-memory prefix), most specific first.
_FILE_TO_MEMORY = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_model.", "model.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def file_to_memory_names(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hub file names -> transformers 5 in-memory names (keys already in memory form pass)."""
    out = {}
    for key, t in sd.items():
        for src, dst in _FILE_TO_MEMORY:
            if key.startswith(src):
                key = dst + key[len(src) :]
                break
        if key in out:
            raise CheckpointFormatError(f"{key} appears under both naming schemes")
        out[key] = t
    return out


def memory_to_file_names(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, t in sd.items():
        for src, dst in _FILE_TO_MEMORY:
            if key.startswith(dst):
                key = src + key[len(dst) :]
                break
        out[key] = t
    return out


def is_hf_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and any(path.glob("*.safetensors"))


def read_hf_config(path: str | Path) -> dict:
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found (a Hugging Face checkpoint dir holds config.json + *.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object")
    return cfg


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of an HF dir, from the index when there is one."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointFormatError(f"{index} is not a valid safetensors index: {e}") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists weight files that do not exist: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointFormatError(
            f"{path} holds only pickle-based weights (*.bin / *.pt); only safetensors are read "
            f"(re-save with save_pretrained(..., safe_serialization=True))"
        )
    raise FileNotFoundError(f"no *.safetensors weight files in {path}")


def load_hf_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(HF state dict with transformers 5 in-memory names, config.json dict). Tensors are
    memory-mapped from the files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = read_hf_config(path)
    state: dict[str, Tensor] = {}
    for f in safetensors_files(path):
        try:
            part = load_file(f)
        except (SafetensorError, OSError) as e:
            raise CheckpointFormatError(f"{f} is not a readable safetensors file: {e}") from e
        dup = sorted(set(part) & set(state))
        if dup:
            raise CheckpointFormatError(f"{f} repeats keys found in another weight file: {dup[:10]}")
        state.update(part)
    index = path / INDEX_FILE
    if index.is_file():
        listed = set(json.loads(index.read_text())["weight_map"])
        if listed != set(state):
            diff = sorted(listed ^ set(state))
            raise CheckpointFormatError(f"{index} does not match the weight files, e.g. {diff[:10]}")
    return file_to_memory_names(state), config


def params_from_hf_dir_config(config: dict, source) -> dict:
    """Meta params from an Mllama config.json, with errors naming the file."""
    if config.get("model_type") not in (None, "mllama"):
        raise ValueError(f"{source}: model_type {config.get('model_type')!r} is not an Mllama (vision) checkpoint")
    try:
        params = params_from_hf_config(config)
    except KeyError as e:
        raise ValueError(f"{source}: config.json lacks {e}") from e
    args_from_params(params, source)
    return params


def load_hf_as_meta(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(Meta params, full Meta state dict) of an HF Mllama dir. Only the rotate-half
    un-permutation of q/k and the tile tables materialise; the rest stays memory-mapped."""
    path = Path(path)
    hf_state, config = load_hf_state_dict(path)
    params = params_from_hf_dir_config(config, path / CONFIG_FILE)
    args = ModelArgs.from_params(dict(params))
    try:
        state = hf_to_meta(hf_state, args)
    except KeyError as e:
        raise CheckpointMismatchError(f"{path}: {e.args[0] if e.args else e}") from e
    _warn_if_tile_tables_diverge(hf_state, state, args, path)
    return params, state


_TILE_TABLES = {
    "model.vision_model.gated_positional_embedding.tile_embedding.weight": "vision_model.vision_encoder.gated_positional_embedding",
    "model.vision_model.pre_tile_positional_embedding.embedding.weight": "vision_model.vision_encoder.pre_tile_pos_embed.embedding",
    "model.vision_model.post_tile_positional_embedding.embedding.weight": "vision_model.vision_encoder.post_tile_pos_embed.embedding",
}


def _warn_if_tile_tables_diverge(hf_state: Mapping[str, Tensor], meta_state: Mapping[str, Tensor], args: ModelArgs, source) -> None:
    """HF keeps one tile-embedding row per aspect ratio, Meta one per grid cell shared by
    every ratio that reaches it. Checkpoints converted from Meta agree on the shared cells;
    one fine-tuned in HF's layout may not, and Meta's layout cannot hold that (the last
    ratio's value is kept). Say so instead of silently changing the model."""
    t = args.vision_max_num_chunks
    for hf_key, meta_key in _TILE_TABLES.items():
        theirs = hf_state[hf_key].view(-1, t, *meta_state[meta_key].shape[2:])
        ours = precompute_by_aspect_ratio(meta_state[meta_key]).view_as(theirs)
        worst = 0.0
        for i, (h, w) in enumerate(supported_aspect_ratios(t), 1):
            worst = max(worst, float((theirs[i, : h * w].float() - ours[i, : h * w].float()).abs().max()))
        if worst > 0:
            warnings.warn(
                f"{source}: {hf_key} gives different values to the same tile for different aspect ratios "
                f"(max difference {worst:.3g}); Meta's layout keeps one value per tile, so outputs will differ "
                f"from this HF checkpoint's for some aspect ratios",
                stacklevel=3,
            )


def save_hf_checkpoint(
    source: nn.Module | Mapping[str, Tensor],
    out_dir: str | Path,
    *,
    args: ModelArgs | Mapping | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a full (TP=1) model or Meta state dict as an HF MllamaForConditionalGeneration
    dir that `transformers` `from_pretrained` reads."""
    if isinstance(source, nn.Module):
        if mp.tp_size() > 1:
            raise ValueError("save_hf_checkpoint needs the full (TP=1) model; save Meta shards under TP and convert")
        args = args if args is not None else source.args
        state = source.state_dict()
    else:
        if args is None:
            raise ValueError("args are required when saving a state dict")
        state = dict(source)
    if not isinstance(args, ModelArgs):
        args = args_from_params(args)
    tensors = tensors_for_saving(memory_to_file_names(meta_to_hf(dict(state), args)), dtype)
    groups = _pack(tensors, max_shard_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)
    if len(groups) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        atomic_save_safetensors({k: tensors[k] for k in group}, out / name, metadata={"format": "pt"})
    for stale in out.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: name for name, group in zip(names, groups) for k in group},
        }
        atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
    else:
        (out / INDEX_FILE).unlink(missing_ok=True)
    config = hf_config_from_args(args)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _pack(tensors: Mapping[str, Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy, in key order: a file closes before it would exceed `max_bytes` (a single
    larger tensor gets a file of its own)."""
    if max_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_bytes}")
    groups: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups
