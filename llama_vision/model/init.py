"""Deterministic, tensor-parallel-invariant weight initialisation (every model part, every
modality: a TP=N model starts from exactly its slice of the TP=1 weights)."""
from __future__ import annotations

import zlib

import torch
from torch import nn


def initial_value(full_name: str, shape: list[int] | tuple[int, ...], seed: int = 0, std: float | None = None) -> torch.Tensor:
    """The random start value (float32, CPU) of a weight by its state-dict name in the full
    model and its FULL (TP=1) shape: N(0, std), std = the full fan-in^-1/2 unless given,
    from a generator seeded by (seed, name)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(full_name.encode()))
    # LeCun-style fan-in scaling (std = in_features^-1/2; 0.0156 at width 4096, about
    # the usual 0.02) keeps every projection's output at unit scale at any width, so
    # small models' adapters start from informative, not vanishing, signals.
    scale = shape[-1] ** -0.5 if std is None else std  # the FULL fan-in, not this rank's slice
    # On the generator's device (the CPU) whatever the ambient default device is: the
    # draws are the same everywhere, then copied to the parameter's device.
    return torch.randn(list(shape), generator=g, device="cpu") * scale


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, std: float | None = None, prefix: str = "") -> None:
    """Deterministic, tensor-parallel-invariant initialisation.

    Each parameter is drawn in FULL (TP=1) shape from a generator seeded by (seed, its
    name), then this rank keeps its slice: a TP=N model starts from exactly the weights of
    the TP=1 model. Weights ~ N(0, std) with std = (last dim)^-1/2 unless given (linear
    fan-in; class/position embeddings get CLIP's width^-1/2); norms at 1; biases and tanh
    gates at 0.
    `prefix` names a submodule's place in the full model (its parameters' seeds).
    Parameters on the meta device (to be loaded from a checkpoint instead) are skipped.
    """
    from model_parallel import shard_plan, tp_rank, tp_size

    plan = shard_plan(model, "runtime")
    world, rank = tp_size(), tp_rank()
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias" or leaf.startswith("gate") or leaf.endswith("_gate"):
            p.zero_()
            continue
        if "norm" in name or ".ln_" in name or name.startswith("ln_"):
            p.fill_(1.0)
            continue
        dim = plan.get(name)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= world
        full = initial_value(prefix + name, shape, seed, std)
        if dim is not None:
            full = full.chunk(world, dim=dim)[rank]
        p.copy_(full.to(p.dtype))


def kaiming_uniform_value(full_name: str, shape: list[int] | tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """`nn.init.kaiming_uniform_(w, a=sqrt(5))` of a weight of FULL (TP=1) `shape` (the
    nn.Linear default that PEFT and torchtune start LoRA's A with): U(-b, b), b = the full
    fan-in^-1/2, drawn from a generator seeded by (seed, name) as `initial_value`, so a
    TP=N slice equals the TP=1 tensor's slice."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(full_name.encode()))
    bound = shape[-1] ** -0.5
    return (torch.rand(list(shape), generator=g, device="cpu") * 2 - 1) * bound
