"""Layer factories: plain torch layers at TP=1, fairscale's parallel layers at TP>1.

Every module a factory returns carries `tp_dims` / `checkpoint_tp_dims`: per parameter, the
dimension split across model-parallel ranks (0 for column-parallel / vocab-parallel,
1 for row-parallel weights, None for replicated). `sharding.shard_plan` reads it, so checkpoint
merge/split never relies on key-name patterns.
"""
from __future__ import annotations

import torch
from torch import nn
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel import mappings as fs_map

from .groups import tp_rank, tp_size


def is_linear(module: nn.Module) -> bool:
    """A weight-matrix projection a factory here may return: `nn.Linear` at TP=1,
    fairscale's Column/RowParallelLinear at TP>1 (model code asks this instead of naming
    fairscale's classes)."""
    return isinstance(module, (nn.Linear, fs_layers.ColumnParallelLinear, fs_layers.RowParallelLinear))


def _keep(weight: torch.Tensor) -> torch.Tensor:
    # Weights are initialised by the model (or loaded); skip fairscale's xavier pass, which
    # would build and initialise a full master weight on every rank.
    return weight


def _tag(module: nn.Module, weight_dim: int | None, bias_dim: int | None, checkpoint_dims: dict | None = None) -> nn.Module:
    # tp_dims: how this rank's parameters are split in memory; checkpoint_tp_dims: how
    # Meta's consolidated.NN.pth files split them (they differ only for replicated K/V).
    module.tp_dims = {"weight": weight_dim, "bias": bias_dim}
    module.checkpoint_tp_dims = checkpoint_dims or dict(module.tp_dims)
    return module


def _check_divisible(n: int, what: str) -> None:
    if n % tp_size():
        raise ValueError(f"{what} of size {n} does not split across tensor-parallel degree {tp_size()}")


def column_parallel_linear(in_features: int, out_features: int, bias: bool = False, gather_output: bool = False) -> nn.Module:
    """y = x W^T (+ b) with W split on the output dim; output stays sharded unless gathered."""
    _check_divisible(out_features, "column-parallel output")
    if tp_size() == 1:
        layer = nn.Linear(in_features, out_features, bias=bias)
    else:
        layer = fs_layers.ColumnParallelLinear(
            in_features, out_features, bias=bias, gather_output=gather_output, init_method=_keep
        )
    return _tag(layer, 0, 0)


def row_parallel_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """y = x W^T (+ b) with W split on the input dim; the partial sums are all-reduced."""
    _check_divisible(in_features, "row-parallel input")
    if tp_size() == 1:
        layer = nn.Linear(in_features, out_features, bias=bias)
    else:
        layer = fs_layers.RowParallelLinear(
            in_features, out_features, bias=bias, input_is_parallel=True, init_method=_keep
        )
    return _tag(layer, 1, None)


def vocab_parallel_embedding(num_embeddings: int, dim: int) -> nn.Module:
    _check_divisible(num_embeddings, "vocabulary (embedding rows)")
    if tp_size() == 1:
        layer = nn.Embedding(num_embeddings, dim)
    else:
        layer = fs_layers.VocabParallelEmbedding(num_embeddings, dim, init_method=_keep)
    return _tag(layer, 0, None)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    """All-gather the last dim across the TP group (identity at TP=1)."""
    return x if tp_size() == 1 else fs_map.gather_from_model_parallel_region(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) across the TP group (identity at TP=1)."""
    return x if tp_size() == 1 else fs_map.reduce_from_model_parallel_region(x)


class ReplicatedKVHeads(nn.Module):
    """K or V projection when TP > n_kv_heads: every rank holds all KV heads (as Meta's
    checkpoints store them, split on dim 0) and computes only the one its query heads use.

    In training the weight's gradient is partial per rank (`tp_partial_grad`): the trainer
    all-reduces it over the TP group.
    """

    def __init__(self, dim: int, n_kv_heads: int, head_dim: int, world: int, rank: int):
        super().__init__()
        if world % n_kv_heads:
            raise ValueError(f"TP={world} > n_kv_heads={n_kv_heads} needs TP to be a multiple of n_kv_heads")
        self.weight = nn.Parameter(torch.empty(n_kv_heads * head_dim, dim))
        self.weight.tp_partial_grad = True
        head = rank * n_kv_heads // world
        self.rows = slice(head * head_dim, (head + 1) * head_dim)
        _tag(self, None, None, {"weight": 0})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each rank's query heads read this K/V through their own path: the gradient w.r.t.
        # the (replicated) input is a partial sum, all-reduced in backward like a column-
        # parallel layer's input.
        return torch.nn.functional.linear(fs_map.copy_to_model_parallel_region(x), self.weight[self.rows])


def kv_parallel_linear(dim: int, n_kv_heads: int, head_dim: int) -> nn.Module:
    """K/V projection at GQA width: column-parallel while TP <= n_kv_heads, else replicated."""
    world = tp_size()
    if world <= n_kv_heads:
        return column_parallel_linear(dim, n_kv_heads * head_dim)
    return ReplicatedKVHeads(dim, n_kv_heads, head_dim, world, tp_rank())
