"""FSDP2 over the data-parallel dimension, fairscale tensor parallelism inside each replica.

`shard_data_parallel(model, units, ...)` calls `torch.distributed.fsdp.fully_shard` on
each unit (bottom-up) and on the root, over the "dp" dimension of the (dp x tp)
DeviceMesh (`groups.device_mesh`). Every parameter -- the frozen trunk included -- is then
a DTensor sharded along dim 0 over the DP ranks (each holds 1 / DP of its TP-local
tensor), gradients are reduce-scattered into shards, and an optimizer built afterwards
keeps state for its shards only. Fairscale's TP layers are untouched: FSDP shards their
(already TP-local) plain tensors, and the TP collectives run inside their forwards.

Choices made here, not in the model code:
* gradients are SUMMED over DP (divide factor 1): the trainer divides the loss by the
  global target count, so the sum is the full-batch gradient (FSDP's default mean would
  divide it by DP once more);
* parameters keep their storage dtype (no param_dtype cast: the precision policy already
  stored frozen weights in bf16 and keeps trainable ones float32), gradients are
  reduce-scattered in `reduce_dtype` (float32 by default);
* attributes of the original parameters that the trainer reads (`tp_partial_grad`) are
  carried over to FSDP's new parameter objects.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["full_state_dict", "is_fsdp", "local_tensor", "shard_data_parallel"]

_CARRIED_ATTRS = ("tp_partial_grad",)


def shard_data_parallel(
    model: nn.Module,
    units: Iterable[nn.Module],
    *,
    dp_mesh,
    forward_methods: Iterable[tuple[nn.Module, str]] = (),
    reduce_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Shard `model` with FSDP2 over `dp_mesh` (a 1-D DeviceMesh of the DP ranks).

    units: the modules that all-gather their parameters together (one transformer block,
        one adapter block, ...), innermost first; the root takes whatever is left.
    forward_methods: (module, method name) pairs that read the module's parameters but are
        not its `forward` (e.g. an adapter's `compute_kv`): FSDP unshards around them too.
    Returns the model (modified in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    carried = {
        name: {a: getattr(p, a) for a in _CARRIED_ATTRS if hasattr(p, a)} for name, p in model.named_parameters()
    }
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for unit in units:
        fully_shard(unit, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    for module, method in forward_methods:
        register_fsdp_forward_method(module, method)
    for module in model.modules():
        if is_fsdp(module):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM (no pre-multiplied sum: gloo has none, and x 1.0 is a no-op).
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    for name, p in model.named_parameters():
        for attr, value in carried.get(name, {}).items():
            setattr(p, attr, value)
    return model


def is_fsdp(module: nn.Module) -> bool:
    """True for a module `fully_shard` was applied to."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: the local shard of a DTensor, `t` itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict with every DP-sharded tensor gathered whole (its TP-local
    tensor), on the CPU. Collective over the DP ranks (one all-gather per tensor, in
    state-dict order); ranks with keep=False get {} and never hold more than one
    gathered tensor at a time."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, t in model.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[key] = full.detach().cpu()
    return out
