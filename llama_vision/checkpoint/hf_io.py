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

Tile-position tables: HF keeps one row per aspect-ratio id. Rows that are the per-ratio
form of a grid (every checkpoint converted from Meta's) load into Meta's "grid" layout,
bitwise as before; rows no grid can hold (a transformers fine-tune) load into
`tile_embedding_layout="per_aspect_ratio"`, with a warning saying so (`grid_mismatch`,
`load_hf_as_meta`), and export back unchanged.

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

from .hf import (
    hf_config_from_args,
    hf_to_meta,
    meta_to_hf,
    params_from_hf_config,
    precompute_by_aspect_ratio,
    supported_aspect_ratios,
    table_from_aspect_ratios,
)
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


def load_hf_as_meta(path: str | Path, tile_embedding_layout: str | None = None) -> tuple[dict, dict[str, Tensor]]:
    """(Meta params, full Meta state dict) of an HF Mllama dir. Only the rotate-half
    un-permutation of q/k and the tile tables materialise; the rest stays memory-mapped.

    tile_embedding_layout: how to hold the per-aspect-ratio tile tables (the ModelArgs
    key). None: "grid" (Meta's) when the rows are the per-ratio form of a grid -- every
    checkpoint converted from Meta's -- else "per_aspect_ratio" (`tile_layout_for`).
    Holding rows no grid can hold warns once, saying which layout is used and why ("grid"
    forced on them: that outputs will differ). The params carry the key only when it is
    "per_aspect_ratio"."""
    path = Path(path)
    hf_state, config = load_hf_state_dict(path)
    params = params_from_hf_dir_config(config, path / CONFIG_FILE)
    args = ModelArgs.from_params(dict(params))
    mismatch = grid_mismatch(hf_state, args)
    layout = tile_embedding_layout or tile_layout_for(mismatch)
    _warn_about_tile_layout(mismatch, layout, path)
    params = _with_layout(params, layout)
    args = ModelArgs.from_params(dict(params))
    try:
        state = hf_to_meta(hf_state, args)
    except KeyError as e:
        raise CheckpointMismatchError(f"{path}: {e.args[0] if e.args else e}") from e
    return params, state


def hf_dir_params(path: str | Path) -> dict:
    """Meta params of an HF Mllama dir: config.json's, plus the tile-embedding layout its
    weights need (read from the three tile tables only; see `load_hf_as_meta`, which
    warns when loading them)."""
    path = Path(path)
    params = params_from_hf_dir_config(read_hf_config(path), path / CONFIG_FILE)
    args = ModelArgs.from_params(dict(params))
    tables = _read_hf_tensors(path, list(_TILE_TABLES))
    return _with_layout(params, tile_layout_for(grid_mismatch(tables, args)))


def _with_layout(params: dict, layout: str) -> dict:
    params = {k: v for k, v in params.items() if k != "tile_embedding_layout"}
    return params if layout == "grid" else {**params, "tile_embedding_layout": layout}


def _read_hf_tensors(path: Path, keys: list[str]) -> dict[str, Tensor]:
    """Only `keys` (transformers 5 in-memory names) of an HF dir's weight files."""
    from safetensors import SafetensorError, safe_open

    want = set(keys)
    out: dict[str, Tensor] = {}
    for f in safetensors_files(path):
        try:
            with safe_open(f, framework="pt") as handle:
                for file_key in handle.keys():
                    key = next(iter(file_to_memory_names({file_key: None})))
                    if key in want:
                        out[key] = handle.get_tensor(file_key)
        except (SafetensorError, OSError) as e:
            raise CheckpointFormatError(f"{f} is not a readable safetensors file: {e}") from e
    missing = sorted(want - set(out))
    if missing:
        raise CheckpointMismatchError(f"{path}: HF checkpoint is missing {missing}")
    return out


_TILE_TABLES = {
    "model.vision_model.gated_positional_embedding.tile_embedding.weight": "vision_model.vision_encoder.gated_positional_embedding",
    "model.vision_model.pre_tile_positional_embedding.embedding.weight": "vision_model.vision_encoder.pre_tile_pos_embed.embedding",
    "model.vision_model.post_tile_positional_embedding.embedding.weight": "vision_model.vision_encoder.post_tile_pos_embed.embedding",
}


def grid_mismatch(hf_state: Mapping[str, Tensor], args: ModelArgs) -> dict[str, float]:
    """HF tile table -> max |row value - what Meta's grid gives back| for each table a grid
    cannot hold bitwise (empty: all three can). HF keeps one row of T tile slots per
    aspect ratio; Meta one value per grid cell, shared by every ratio that reaches it, and
    zeros in a ratio's empty tile slots and for absent images (row 0)."""
    t, w = args.vision_max_num_chunks, args.vision_width
    n_rows = len(supported_aspect_ratios(t)) + 1
    out = {}
    for hf_key in _TILE_TABLES:
        pre = hf_state.get(hf_key)
        if pre is None or pre.dim() != 2 or pre.shape[0] != n_rows or pre.shape[1] % (t * w):
            continue  # missing or misshapen: the conversion names it
        rows = pre.view(n_rows, t, -1, w)
        back = precompute_by_aspect_ratio(table_from_aspect_ratios(pre, t, rows.shape[2], w)).view_as(rows)
        if not torch.equal(back, rows):
            out[hf_key] = float((back.float() - rows.float()).abs().max())
    return out


def tile_layout_for(mismatch: Mapping[str, float]) -> str:
    """The layout that holds an HF checkpoint's tile tables exactly, from `grid_mismatch`:
    "grid" when every table is the per-ratio form of a grid (the checkpoint loads and
    exports bitwise in Meta's layout), else "per_aspect_ratio" -- transformers' own
    layout, e.g. a checkpoint fine-tuned with transformers, whose rows for aspect ratios
    sharing a tile disagree."""
    return "per_aspect_ratio" if mismatch else "grid"


def _warn_about_tile_layout(mismatch: Mapping[str, float], layout: str, source) -> None:
    if not mismatch:
        return
    if layout == "grid":  # forced on rows a grid cannot hold
        for hf_key, worst in mismatch.items():
            warnings.warn(
                f"{source}: {hf_key} gives different values to the same tile for different aspect ratios "
                f"(max difference {worst:.3g}); tile_embedding_layout='grid' (Meta's) keeps one value per tile, so "
                f"outputs will differ from this HF checkpoint's for some aspect ratios",
                stacklevel=4,
            )
        return
    detail = ", ".join(f"{k} (max difference {d:.3g})" for k, d in mismatch.items())
    warnings.warn(
        f"{source}: the per-aspect-ratio tile embeddings do not fit Meta's one-value-per-tile grid "
        f"(rows of aspect ratios sharing a tile disagree, or empty tile slots / the absent-image row 0 are "
        f"non-zero): {detail}; holding them with tile_embedding_layout='per_aspect_ratio' (transformers' layout: "
        f"outputs match this checkpoint for every aspect ratio). A Meta-format save of it keeps per-ratio tables "
        f"that only this library loads; params_overrides={{'tile_embedding_layout': 'grid'}} forces Meta's layout "
        f"(lossy)",
        stacklevel=4,
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
    return write_hf_dir(tensors, out_dir, hf_config_from_args(args), max_shard_bytes)


def write_hf_dir(tensors: Mapping[str, Tensor], out_dir: str | Path, config: dict,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """A transformers checkpoint dir: `tensors` (file key names, ready to save) in one
    model.safetensors or shards of at most `max_shard_bytes` with their index, and
    config.json (its `dtype` set from the tensors); every file written atomically, stale
    shards removed, config.json last (a dir without it is not a checkpoint yet)."""
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
    config = dict(config)
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
