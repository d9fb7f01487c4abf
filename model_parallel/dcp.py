"""Tensors as torch.distributed.checkpoint (DCP) must see them: pieces of one global tensor.

Fairscale's TP shards are plain tensors with the same state-dict key on every TP rank; DCP
identifies a saved piece by (key, offset in the global tensor) and de-duplicates equal
pieces across ranks, so it would keep ONE TP rank's shard and silently drop the others.
`global_view` wraps a rank's piece in a DTensor over the ("tp", "dp") mesh that states the
truth: the global tensor is the TP-merged one, the TP split (along the layer's split dim)
is the outer one and the FSDP split (dim 0 of the TP-local tensor, torch.chunk sizes) the
inner one -- exactly the layout `fully_shard` inside fairscale TP produces. DCP then writes
every piece at its offset, once (replicated pieces -- a TP-replicated weight, a ZeRO-1 or
DP=1 parameter held whole by every DP rank -- are written by one rank), and a load at
another TP / DP degree reads each rank's new piece from the overlapping saved ones.

The view shares the piece's storage (`DTensor.from_local(..., run_check=False)`): loading
into it writes into the parameter / optimizer state in place.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .fsdp import local_tensor
from .groups import device_mesh, tp_size

__all__ = ["checkpoint_process_group", "global_rank", "global_view", "load_tensors", "read_whole_tensors", "save_tensors", "saved_tensor_shapes"]


def global_view(t: torch.Tensor, tp_dim: int | None, dp_sharded: bool) -> torch.Tensor:
    """This rank's piece of a tensor as DCP must see it.

    t: a parameter (or optimizer state shaped like one): its TP-local tensor, or an FSDP
        DTensor sharded over DP (`dp_sharded`) whose global shape is the TP-local one.
    tp_dim: the dim fairscale split it along (None: replicated over TP).
    Single process: the tensor itself (it is the whole)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_tensor(t)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shape = list(t.shape)  # TP-local (an FSDP DTensor's global shape is its TP-local one)
    if tp_dim is not None:
        shape[tp_dim] *= tp_size()
    placements = (Shard(tp_dim) if tp_dim is not None else Replicate(), Shard(0) if dp_sharded else Replicate())
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_tensor(t), device_mesh("tp,dp"), placements, run_check=False, shape=torch.Size(shape), stride=stride)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def save_tensors(tensors: dict[str, torch.Tensor], path: str, *, background: bool = False, process_group=None):
    """Write `tensors` (every rank its pieces, collective) as a DCP checkpoint into the
    directory `path`. background: `dcp.async_save` -- returns once the tensors are staged
    (copied), the write goes on in a thread; returns its Future (else None)."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(path)
    if background:
        return dcp.async_save(tensors, storage_writer=writer, process_group=process_group)
    dcp.save(tensors, storage_writer=writer, no_dist=not _distributed())
    return None


def load_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Fill `tensors` in place from the DCP checkpoint at `path`, each rank reading only
    the saved pieces that overlap its own (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(tensors, storage_reader=dcp.FileSystemReader(path), no_dist=not _distributed())


def saved_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> global shape of every tensor of the DCP checkpoint at `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(path).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def read_whole_tensors(path: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of the DCP checkpoint at `path` whose key starts with `prefix`, whole,
    read by this one process (inspection, tests, converters); keys without the prefix."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(path).read_metadata()
    out = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in meta.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
    }
    dcp.load(out, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return {k[len(prefix):]: v for k, v in out.items()}


def checkpoint_process_group():
    """A gloo group over all ranks for a background checkpoint writer, whose collectives
    must not interleave with training's (None in a single process)."""
    return dist.new_group(backend="gloo") if _distributed() else None


def global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
