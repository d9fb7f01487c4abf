"""Split and merge state dicts across tensor-parallel ranks.

The plan comes from the modules themselves (`tp_dims` set by the layer factories), never
from key-name patterns: column-parallel and vocab-parallel weights split on dim 0 (and
column biases with them), row-parallel weights on dim 1, everything else is replicated.
"""
from __future__ import annotations

import torch
from torch import nn

from .groups import tp_rank, tp_size


def _plan(model: nn.Module, attr: str) -> dict[str, int | None]:
    plan: dict[str, int | None] = {}
    for name, module in model.named_modules():
        dims = getattr(module, attr, {})
        prefix = f"{name}." if name else ""
        for pname, _ in module.named_parameters(recurse=False):
            plan[prefix + pname] = dims.get(pname)
    return plan


def shard_plan(model: nn.Module, layout: str = "checkpoint") -> dict[str, int | None]:
    """Key -> split dim (or None). layout="checkpoint": how Meta's consolidated.NN.pth files
    are split; layout="runtime": how this model's parameters are split in memory."""
    if layout not in ("checkpoint", "runtime"):
        raise ValueError(f"layout must be 'checkpoint' or 'runtime', got {layout!r}")
    return _plan(model, "checkpoint_tp_dims" if layout == "checkpoint" else "tp_dims")


def split_state_dict(full: dict[str, torch.Tensor], plan: dict[str, int | None], world: int) -> list[dict[str, torch.Tensor]]:
    """Full state dict -> `world` shards (rank order). Keys absent from the plan are replicated."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for key, tensor in full.items():
        dim = plan.get(key)
        if dim is None:
            for shard in shards:
                shard[key] = tensor
            continue
        if tensor.shape[dim] % world:
            raise ValueError(f"{key}: dim {dim} of size {tensor.shape[dim]} does not split into {world} shards")
        for shard, piece in zip(shards, tensor.chunk(world, dim=dim)):
            shard[key] = piece.clone()
    return shards


def merge_shards(shards: list[dict[str, torch.Tensor]], plan: dict[str, int | None]) -> dict[str, torch.Tensor]:
    """Inverse of `split_state_dict`. Replicated keys must agree across shards."""
    keys = list(shards[0])
    for i, shard in enumerate(shards[1:], 1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))[:5]
            raise KeyError(f"shard {i} has different keys than shard 0, e.g. {diff}")
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        dim = plan.get(key)
        if dim is None:
            merged[key] = shards[0][key]
        else:
            merged[key] = torch.cat([s[key] for s in shards], dim=dim)
    return merged


def shard_state_dict(model: nn.Module, full: dict[str, torch.Tensor], rank: int | None = None, world: int | None = None) -> dict[str, torch.Tensor]:
    """The slice of a full (TP=1) state dict that this rank's `model` holds."""
    rank = tp_rank() if rank is None else rank
    world = tp_size() if world is None else world
    plan = shard_plan(model, "runtime")
    local = {}
    for key, tensor in full.items():
        dim = plan.get(key)
        local[key] = tensor if dim is None or world == 1 else tensor.chunk(world, dim=dim)[rank]
    return local
