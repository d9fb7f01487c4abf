"""Layer factories: plain torch layers at TP=1, fairscale's parallel layers at TP>1.

Every module a factory returns carries `tp_dims` / `checkpoint_tp_dims`: per parameter, the
dimension split across model-parallel ranks (0 for column-parallel / vocab-parallel,
1 for row-parallel weights, None for replicated). `sharding.shard_plan` reads it, so checkpoint
merge/split never relies on key-name patterns.

At TP > 1 the factories return fairscale's own classes (Column/RowParallelLinear,
VocabParallelEmbedding: their forward, isinstance checks, state-dict names) but never run
fairscale's constructors, which allocate the weight with the legacy `torch.Tensor(n, m)`
(always the CPU, whatever the device context), build and initialise a FULL master weight
on every rank and scatter it. Instead each module gets exactly the attributes fairscale's
`__init__` sets, with this rank's parameters allocated by `torch.empty` on the ambient
device and dtype: on the meta device (checkpoint loading) a TP > 1 model costs no memory,
and on a real device only the local shards are allocated, uninitialised (the model's
`init_weights` or a checkpoint fills them; biases start at zero as fairscale's do).
tests/dist_tp_memory_worker.py checks the attributes against fairscale's constructor.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
from torch import nn

from .groups import tp_rank, tp_size


def _fairscale() -> SimpleNamespace:
    """fairscale's model-parallel layers, mappings and utils, imported on first use: only
    TP > 1 needs them (a machine without fairscale runs everything else)."""
    try:
        from fairscale.nn.model_parallel import layers, mappings, utils
    except ImportError as e:
        raise ImportError("tensor parallelism (tp > 1) needs fairscale: pip install fairscale") from e
    return SimpleNamespace(layers=layers, mappings=mappings, utils=utils)


def is_linear(module: nn.Module) -> bool:
    """A weight-matrix projection a factory here may return: `nn.Linear` at TP=1,
    fairscale's Column/RowParallelLinear at TP>1 (model code asks this instead of naming
    fairscale's classes)."""
    if isinstance(module, nn.Linear):
        return True
    fs_layers = sys.modules.get("fairscale.nn.model_parallel.layers")  # only a TP > 1 model has them
    return fs_layers is not None and isinstance(module, (fs_layers.ColumnParallelLinear, fs_layers.RowParallelLinear))


def _fairscale_module(cls: type, attrs: dict, weight_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> nn.Module:
    """An instance of fairscale's `cls` with `attrs` (the plain attributes its __init__ sets)
    and this rank's `weight` (+ `bias`, zeroed) from `torch.empty` on the ambient device /
    dtype, fairscale's constructor not run (see the module docstring)."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for name, value in attrs.items():
        setattr(layer, name, value)
    layer.weight = nn.Parameter(torch.empty(weight_shape))
    if bias_shape is None:
        layer.register_parameter("bias", None)
    else:
        layer.bias = nn.Parameter(torch.empty(bias_shape))
        with torch.no_grad():
            layer.bias.zero_()
    return layer


def _fs_column_parallel(in_features: int, out_features: int, bias: bool, gather_output: bool) -> nn.Module:
    fs = _fairscale()
    local = fs.utils.divide_and_check_no_remainder(out_features, tp_size())
    attrs = dict(in_features=in_features, out_features=out_features, gather_output=gather_output,
                 output_size_per_partition=local, master_weight=None)
    return _fairscale_module(fs.layers.ColumnParallelLinear, attrs, (local, in_features), (local,) if bias else None)


def _fs_row_parallel(in_features: int, out_features: int, bias: bool) -> nn.Module:
    fs = _fairscale()
    local = fs.utils.divide_and_check_no_remainder(in_features, tp_size())
    attrs = dict(in_features=in_features, out_features=out_features, input_is_parallel=True,
                 input_size_per_partition=local, master_weight=None)
    return _fairscale_module(fs.layers.RowParallelLinear, attrs, (out_features, local), (out_features,) if bias else None)


def _fs_vocab_parallel_embedding(num_embeddings: int, dim: int) -> nn.Module:
    fs = _fairscale()
    start, end = fs.utils.VocabUtility.vocab_range_from_global_vocab_size(num_embeddings, tp_rank(), tp_size())
    attrs = dict(num_embeddings=num_embeddings, embedding_dim=dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, vocab_start_index=start, vocab_end_index=end,
                 num_embeddings_per_partition=end - start)
    return _fairscale_module(fs.layers.VocabParallelEmbedding, attrs, (end - start, dim), None)


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
        layer = _fs_column_parallel(in_features, out_features, bias, gather_output)
    return _tag(layer, 0, 0)


def row_parallel_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """y = x W^T (+ b) with W split on the input dim; the partial sums are all-reduced."""
    _check_divisible(in_features, "row-parallel input")
    if tp_size() == 1:
        layer = nn.Linear(in_features, out_features, bias=bias)
    else:
        layer = _fs_row_parallel(in_features, out_features, bias)
    return _tag(layer, 1, None)


def vocab_parallel_embedding(num_embeddings: int, dim: int) -> nn.Module:
    _check_divisible(num_embeddings, "vocabulary (embedding rows)")
    if tp_size() == 1:
        layer = nn.Embedding(num_embeddings, dim)
    else:
        layer = _fs_vocab_parallel_embedding(num_embeddings, dim)
    return _tag(layer, 0, None)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    """All-gather the last dim across the TP group (identity at TP=1)."""
    return x if tp_size() == 1 else _fairscale().mappings.gather_from_model_parallel_region(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) across the TP group (identity at TP=1)."""
    return x if tp_size() == 1 else _fairscale().mappings.reduce_from_model_parallel_region(x)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Identity in forward, all-reduce (sum) of the gradient across the TP group in
    backward (identity at TP=1): a replicated activation read by rank-local work, as a
    column-parallel layer reads its input."""
    return x if tp_size() == 1 else _fairscale().mappings.copy_to_model_parallel_region(x)


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
        return torch.nn.functional.linear(_fairscale().mappings.copy_to_model_parallel_region(x), self.weight[self.rows])


def kv_parallel_linear(dim: int, n_kv_heads: int, head_dim: int) -> nn.Module:
    """K/V projection at GQA width: column-parallel while TP <= n_kv_heads, else replicated."""
    world = tp_size()
    if world <= n_kv_heads:
        return column_parallel_linear(dim, n_kv_heads * head_dim)
    return ReplicatedKVHeads(dim, n_kv_heads, head_dim, world, tp_rank())
