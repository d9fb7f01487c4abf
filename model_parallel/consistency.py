"""Checks that the ranks of one tensor-parallel group agree (all process-group calls here)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import tp_group, tp_rank, tp_size


def assert_same_across_tp(values: torch.Tensor, what: str) -> None:
    """Raise on EVERY rank of the tensor-parallel group unless all of them hold the same
    `values` (a small 1-D tensor, e.g. a batch fingerprint). Tensor-parallel peers compute
    one replica together: if their inputs differ they would hang or train on garbage, so
    the run stops with an error that names what differed. No-op at TP=1."""
    if tp_size() == 1:
        return
    gathered = [torch.empty_like(values) for _ in range(tp_size())]
    dist.all_gather(gathered, values.contiguous(), group=tp_group())
    differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if differ:
        raise RuntimeError(
            f"{what}: tensor-parallel ranks {differ} of this replica hold different data than TP rank 0 "
            f"(this is TP rank {tp_rank()}); the peers of one replica must read identical inputs "
            "(check the data paths and that every rank sees the same files)"
        )
