"""Gradient plumbing for training under TP x DP (all process-group calls live here)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .fsdp import local_tensor
from .groups import dp_group, dp_size, is_model_parallel, tp_group, tp_size


def _group(group: str) -> tuple[int, object]:
    """(size, process group) of the data-parallel ("dp") or tensor-parallel ("tp") group."""
    if group == "dp":
        return dp_size(), dp_group()
    if group == "tp":
        return tp_size(), tp_group()
    raise ValueError(f"group must be 'dp' or 'tp', got {group!r}")


def all_reduce_sum(x: torch.Tensor, group: str = "dp") -> torch.Tensor:
    """In-place sum over the data-parallel ("dp") or tensor-parallel ("tp") group."""
    size, pg = _group(group)
    if size > 1:
        dist.all_reduce(x, group=pg)
    return x


def all_reduce_max(x: torch.Tensor, group: str = "dp") -> torch.Tensor:
    """In-place elementwise max over the data-parallel ("dp") or tensor-parallel ("tp") group."""
    size, pg = _group(group)
    if size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=pg)
    return x


def all_gather_object(obj, group: str = "dp") -> list:
    """[obj of each rank of the data-parallel ("dp") or tensor-parallel ("tp") group], in
    group-rank order ([obj] without one)."""
    size, pg = _group(group)
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj, group=pg)
    return out


def sync_gradients(
    params: list[torch.nn.Parameter],
    bucket_bytes: int = 25 << 20,
    reduce_dtype: torch.dtype | None = None,
    dp_sharded: bool = False,
) -> None:
    """SUM gradients over the DP group (the loss is already divided by the global token
    count, so summing gives exactly the full-batch gradient), and over the TP group for
    replicated weights whose gradient is partial per rank (`tp_partial_grad`).
    Gradients are flattened into buckets to issue few collectives.

    Ranks may see different kinds of micro-batches (one text-only, another with images):
    a parameter that some DP rank left without a gradient gets a zero one there when ANY
    rank has one, so every rank issues the same collectives (different bucket sizes would
    hang NCCL and mix up gloo's gradients). A parameter that NO rank touched keeps
    `grad=None` everywhere, so AdamW skips it (no moment update, no weight decay) exactly
    as one process would on the union batch.

    reduce_dtype: the dtype the buckets are summed in (None: the gradients' own, float32
    for float32 master parameters); the sums are cast back into the gradients.
    dp_sharded: the parameters are FSDP shards, whose backward already reduce-scattered
    the DP sum into each rank's gradient shard: only the TP part is left (on the shards:
    a replicated parameter is sharded alike on every TP rank).
    """
    if dp_size() > 1 and not dp_sharded:
        _fill_missing_grads(params, dp_group())
        _bucketed_all_reduce([p.grad for p in params if p.grad is not None], dp_group(), bucket_bytes, reduce_dtype)
    if tp_size() > 1:
        partial = [local_tensor(p.grad) for p in params if p.grad is not None and getattr(p, "tp_partial_grad", False)]
        _bucketed_all_reduce(partial, tp_group(), bucket_bytes, reduce_dtype)


def _fill_missing_grads(params: list[torch.nn.Parameter], group) -> None:
    """Zero gradients where this rank has none but another rank of `group` has one."""
    if not params:
        return
    device = next((p.grad.device for p in params if p.grad is not None), params[0].device)
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=group)
    for p, anywhere in zip(params, has_grad.tolist()):
        if anywhere and p.grad is None:
            p.grad = torch.zeros_like(p)


def _bucketed_all_reduce(grads: list[torch.Tensor], group, bucket_bytes: int, reduce_dtype: torch.dtype | None = None) -> None:
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            if reduce_dtype is not None and flat.dtype != reduce_dtype:
                flat = flat.to(reduce_dtype)
            dist.all_reduce(flat, group=group)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def global_grad_norm(params: list[torch.nn.Parameter], tp_dims: dict[int, int | None], dp_sharded: bool = False) -> torch.Tensor:
    """L2 norm of the full model's gradient: squares of TP-sharded parameters are summed
    across the TP group, replicated ones counted once. tp_dims: id(param) -> split dim.
    dp_sharded (FSDP): every gradient is split over the DP ranks, so both sums are first
    summed over the DP group."""
    dev = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
    sharded = torch.zeros((), device=dev, dtype=torch.float32)
    replicated = torch.zeros((), device=dev, dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        sq = local_tensor(p.grad).detach().float().pow(2).sum()
        if tp_dims.get(id(p)) is not None:
            sharded += sq
        else:
            replicated += sq
    if dp_sharded and dp_size() > 1:
        both = torch.stack([sharded, replicated])
        dist.all_reduce(both, group=dp_group())
        sharded, replicated = both[0], both[1]
    if tp_size() > 1 and is_model_parallel():
        dist.all_reduce(sharded, group=tp_group())
    return (sharded + replicated).sqrt()


def zero_redundancy_adamw(params, **adamw_kwargs):
    """AdamW whose state is sharded across the DP group (ZeRO-1); plain AdamW at DP=1."""
    if dp_size() == 1:
        return torch.optim.AdamW(params, **adamw_kwargs)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=dp_group(), **adamw_kwargs)
