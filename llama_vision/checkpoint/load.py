"""Load a Meta or Hugging Face checkpoint dir into a model, at any tensor-parallel degree.

The model is built on the meta device (shapes only, no memory) at every TP degree
(model_parallel builds fairscale's parallel layers there without their constructors), then
this rank's tensors are read from the checkpoint files, which are memory-mapped
(`torch.load(mmap=True)` / safetensors): for a Meta checkpoint only the files holding this
rank's rows are opened and only this rank's part of them is read; an HF checkpoint's full
tensors are sliced. Each TP-split tensor is placed on the target device as soon as it is
sliced (`_placer`): on the CPU the mapped slice itself when it already has the model's
dtype and is contiguous, else one cast / contiguous copy; on another device one copy
there. So no rank ever holds a host copy of its shard (nor of the model) besides the file
pages being read; a resharded tensor (N files -> TP=M, concatenated on the host) is freed
before the next one is built.

The tensors are then ASSIGNED (`assign_strict`): a tensor that already has its
parameter's dtype, device and layout becomes the parameter itself -- on the CPU the weights
exist once, as private copy-on-write file pages read when first used -- and any other
(the replicated ones, left for the load hooks) is cast / moved in one copy (a bfloat16
model from a float32 file holds only the bfloat16 copies). Parameters stay
`nn.Parameter`s with the skeleton's `requires_grad`, attributes (`tp_partial_grad`) and
ties, and are writable (on the CPU writes copy the page, never reach the file). The files
stay mapped while a CPU model lives: they may be deleted or replaced (our savers write a
temp file and rename it) but must not be rewritten in place.

Keys and shapes are checked strictly first, with errors that name the offending
keys and the checkpoint. The only shape differences let through are those the modules' load
hooks resize by value: the vision encoder's position / tile embeddings (another tile size)
and what a module accepts in `resizes_on_load` (the video aggregator's temporal / group
embeddings at another frames_per_group / group count). The hooks run inside
`load_state_dict`, which `assign_strict` calls before assigning; the replicated tensors
they resize reach them as read (checkpoint dtype, on the CPU). (The RoPE table is in no
checkpoint and needs no restoring: it is not a module buffer, see
`TextDecoder._rope_table_on`.)
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

import model_parallel as mp
from llama_vision.model import VisionLanguageModel

from .hf_io import DEFAULT_MAX_SHARD_BYTES, hf_dir_params, is_hf_checkpoint, load_hf_as_meta, save_hf_checkpoint
from .meta import (
    PARAMS_FILE,
    CheckpointMismatchError,
    build_skeleton,
    args_from_params,
    check_keys,
    check_shapes,
    is_meta_checkpoint,
    load_meta_state_dict,
    load_strict,
    read_params,
    save_meta_checkpoint,
)


def checkpoint_format(path: str | Path) -> str:
    """"meta" (params.json + consolidated*.pth) or "hf" (config.json + *.safetensors)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"a checkpoint is a directory, got the file {path}")
    if is_meta_checkpoint(path):
        return "meta"
    if is_hf_checkpoint(path):
        return "hf"
    names = sorted(p.name for p in path.iterdir())[:12]
    raise ValueError(
        f"{path} is neither a Meta checkpoint (params.json + consolidated.NN.pth) nor a Hugging Face one "
        f"(config.json + *.safetensors); it contains {names}"
    )


def checkpoint_params(path: str | Path) -> dict:
    """The Meta params dict of a checkpoint dir of either format (validated)."""
    path = Path(path)
    if checkpoint_format(path) == "meta":
        params = read_params(path)
        args_from_params(params, path / PARAMS_FILE)
        return params
    return hf_dir_params(path)  # config.json + the tile-embedding layout its weights need


def load_model(
    path: str | Path,
    tp: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    params_overrides: Mapping | None = None,
) -> VisionLanguageModel:
    """A checkpoint dir (Meta or HF format) -> model in eval mode holding this rank's weights.

    tp: tensor-parallel degree; None = the current model-parallel world size (1 without
    torch.distributed). tp > 1 initialises the model-parallel groups if needed (launch
    with `torchrun --nproc_per_node tp`). params_overrides: run-time settings such as
    `attn_backend` or `max_seq_len` (architecture keys must match the weights).
    """
    path = Path(path)
    params = {**checkpoint_params(path), **(params_overrides or {})}
    _resolve_tp(tp)  # build_model shards for the current TP degree
    device = torch.device(device)
    model = build_skeleton(params, dtype)  # meta device, this rank's shapes
    state = rank_state_dict(model, path, device=device)
    assign_strict(model, state, path, device=device)
    return model.eval()


def load_into(model: nn.Module, path: str | Path, *, allow_missing_prefixes: tuple[str, ...] = ()) -> None:
    """Load a checkpoint dir into an existing model (its device, dtype and TP degree), e.g.
    the next training stage starting from the previous stage's `final/`. Keys under
    `allow_missing_prefixes` (modules added since) keep their current values. Tensors a
    load hook resizes (e.g. video_pretrain's aggregator into video_sft's larger
    frames_per_group / group count) are resized, not refused."""
    path = Path(path)
    state = rank_state_dict(model, path, allow_missing_prefixes=allow_missing_prefixes)
    load_strict(model, state, path, allow_missing_prefixes)


def rank_state_dict(
    model: nn.Module,
    path: str | Path,
    *,
    allow_missing_prefixes: tuple[str, ...] = (),
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's tensors for `model` (built at the current TP degree) from a checkpoint dir.
    `device`: place each TP-split tensor there, in the model's dtype, as soon as it is read
    (see `_placer`); None leaves every tensor as read (memory-mapped CPU slices / views)."""
    path = Path(path)
    rank, world = mp.tp_rank(), mp.tp_size()
    fmt = checkpoint_format(path)
    place = None if device is None else _placer(model, torch.device(device), own_slices=fmt == "hf" and world > 1)
    if fmt == "meta":
        return load_meta_state_dict(path, rank, world, model, allow_missing_prefixes=allow_missing_prefixes, place=place)
    # In the model's tile-embedding layout (checkpoint_params chose it, or params_overrides).
    _, full = load_hf_as_meta(path, getattr(getattr(model, "args", None), "tile_embedding_layout", None))
    check_keys(full, model.state_dict(), path, allow_missing_prefixes)
    check_shapes({k: tuple(v.shape) for k, v in full.items()}, model, world, path)
    local = mp.shard_state_dict(model, full, rank, world)  # views of the full tensors
    full.clear()  # a full tensor the conversion materialised now lives only through its slice
    if place is not None:
        for key in local:
            local[key] = place(key, local[key])
    return local


def _placer(model: nn.Module, device: torch.device, *, own_slices: bool = False):
    """`place(key, tensor)` for this rank's tensors as they are read: a TP-split tensor of
    the model's shape goes to `device` in the skeleton's dtype, contiguous (no copy when it
    already is all that: a memory-mapped slice on the CPU stays the file's pages). Other
    tensors are returned as they are: replicated ones may still be resized or read by the
    modules' load hooks (vision position / tile embeddings, video tables) in the
    checkpoint's dtype, and a wrong shape is left for the strict checks to report;
    `assign_strict` casts / moves those afterwards. own_slices (HF at TP > 1): on the CPU
    a slice is copied out of its full tensor, which the HF conversion may have
    materialised (un-permuted q/k) and which would otherwise stay alive behind the view."""
    split = mp.shard_plan(model, "runtime")
    skeleton = model.state_dict(keep_vars=True)

    def place(key: str, t: torch.Tensor) -> torch.Tensor:
        want = skeleton.get(key)
        if split.get(key) is None or want is None or t.shape != want.shape:
            return t
        copy = own_slices and device.type == "cpu" and t.untyped_storage().nbytes() > t.numel() * t.element_size()
        # `.to(memory_format=contiguous_format)` would keep a 2-D strided view (a row-parallel
        # slice) as it is: `.contiguous()` after the move copies it on the device.
        return t.to(device=device, dtype=want.dtype, copy=copy).contiguous()

    return place


def materialize(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Allocate a meta-device model on `device` (uninitialised); the caller then loads every
    parameter and buffer."""
    model.to_empty(device=device)
    return model


def assign_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source, *, device: str | torch.device = "cpu", allow_missing: Iterable[str] = ()
) -> nn.Module:
    """Load `state` (tensors on the CPU, e.g. memory-mapped, or already on `device`) into
    `model` (built on the meta device, or uninitialised on `device`) WITHOUT a second copy
    of the weights: each parameter / buffer becomes the loaded tensor when that already has
    the skeleton's dtype, is on `device` and contiguous, else a contiguous cast / copy of it
    there (one copy). Keys and shapes are strict (as
    `load_strict`, whose load hooks run first). The skeleton's parameter attributes
    (`requires_grad`, `tp_partial_grad`, ...) and ties are kept; loaded tensors that
    overlap in memory are copied, so parameters share storage only where the skeleton tied
    them. allow_missing: keys the state need not hold (tensors that already have values)."""
    slots: dict[int, list[tuple[dict, str]]] = {}  # id(skeleton tensor) -> where it is held
    skeleton: dict[int, torch.Tensor] = {}
    for kind, named in (("_parameters", model.named_parameters), ("_buffers", model.named_buffers)):
        for name, t in named(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            slots.setdefault(id(t), []).append((getattr(model.get_submodule(owner), kind), attr))
            skeleton[id(t)] = t
    load_strict(model, state, source, tuple(allow_missing), assign=True)

    def install(key: int, t: torch.Tensor) -> None:
        old = skeleton[key]
        if isinstance(old, nn.Parameter):
            if not isinstance(t, nn.Parameter):
                t = nn.Parameter(t, requires_grad=old.requires_grad)
            t.requires_grad_(old.requires_grad)
            t.__dict__.update(old.__dict__)
        for table, attr in slots[key]:
            table[attr] = t

    loaded: dict[int, torch.Tensor] = {}
    for key, places in slots.items():
        table, attr = places[0]
        got, old = table[attr], skeleton[key]
        if got is old:  # not in the checkpoint: a non-persistent buffer, if a module has one
            continue
        ready = got.detach().to(device=device, dtype=old.dtype).contiguous()  # (see `_placer`)
        install(key, got if ready.data_ptr() == got.data_ptr() and ready.dtype == got.dtype else ready)
        loaded[key] = table[attr]
    # No two parameters may share memory unless tied in the skeleton (e.g. a checkpoint
    # saved from a model with tied weights stores one storage under two keys).
    end = 0
    for key, t in sorted(((k, t) for k, t in loaded.items() if t.numel()), key=lambda kt: kt[1].data_ptr()):
        start = t.data_ptr()
        if start < end:
            install(key, t.detach().clone())
        end = max(end, start + t.numel() * t.element_size())
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointMismatchError(f"loading {source}: tensors left without values: {left[:20]}")
    return model


def _resolve_tp(tp: int | None) -> int:
    current = mp.tp_size()
    if tp is None:
        return current
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if mp.is_model_parallel():
        if tp != current:
            raise ValueError(f"load_model(tp={tp}) but model parallelism is initialised with TP={current}")
        return tp
    if tp == 1:
        return 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tp:
        raise RuntimeError(
            f"load_model(tp={tp}) needs a multiple of {tp} processes, this job has WORLD_SIZE={world}: "
            f"launch with `torchrun --nproc_per_node {tp} ...`"
        )
    mp.init_model_parallel(tp)
    return tp


# --- format conversion (tools/convert_checkpoint.py) ----------------------------------------
def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str,
    *,
    num_shards: int = 1,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert a checkpoint dir of either format to `to` ("meta" or "hf"; converting to the
    same format re-shards / re-casts it). tokenizer.model is copied when present."""
    if to not in ("meta", "hf"):
        raise ValueError(f"target format must be 'meta' or 'hf', got {to!r}")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("output dir must differ from the input dir")
    if checkpoint_format(src) == "meta":
        params = read_params(src)
        args_from_params(params, src / PARAMS_FILE)
        state = load_meta_state_dict(src, 0, 1, build_skeleton(params))
    else:
        params, state = load_hf_as_meta(src)
    if to == "meta":
        save_meta_checkpoint(state, params, dst, num_shards=num_shards, dtype=dtype)
    else:
        save_hf_checkpoint(state, dst, args=params, max_shard_bytes=max_shard_bytes, dtype=dtype)
    tok = src / "tokenizer.model"
    if tok.is_file():
        tmp = dst / ".tokenizer.model.tmp"
        shutil.copyfile(tok, tmp)
        os.replace(tmp, dst / "tokenizer.model")
    return dst
