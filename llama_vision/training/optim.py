"""Optimizer construction, gradient clipping and parameter counting.

Weight-decay policy of :func:`build_adamw` (decoupled decay, i.e. ``torch.optim.AdamW``):

* **decay**: parameters with 2+ dimensions (linear / conv / attention weight matrices);
* **no decay**: every parameter with ``ndim <= 1`` (norm scales, biases, the scalar/vector
  ``tanh`` gates of cross-attention adapters, learnable class tokens stored as 1-D) and every
  parameter whose name contains one of ``no_decay_keywords`` (default ``"embed"``, catching
  token/positional embedding tables such as ``tok_embeddings.weight``, ``positional_embedding``,
  ``pos_embed``, ``class_embedding``). Decaying these pulls norms/gates towards 0 and shrinks
  rarely seen embedding rows, which hurts rather than regularises.

Frozen parameters (``requires_grad=False``, e.g. the Llama decoder in adapter training) are not
given to the optimizer at all, so they get no Adam moments: no memory cost and no chance of
being updated by weight decay. A parameter unfrozen later needs a new optimizer.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["build_adamw", "build_stage_optimizer", "clip_grad_norm_", "count_parameters", "group_lr_multiplier_of", "is_gate",
           "split_decay_params", "stage_param_groups"]


def split_decay_params(
    named_params: Iterable[tuple[str, nn.Parameter]], no_decay_keywords: Iterable[str] = ("embed",)
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split trainable ``(name, param)`` pairs into ``(decay, no_decay)`` per the module policy.

    Frozen parameters are dropped; a parameter shared under several names appears once.
    """
    keywords = tuple(k.lower() for k in no_decay_keywords)
    decay, no_decay, seen = [], [], set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim <= 1 or any(k in name.lower() for k in keywords):
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    return decay, no_decay


def is_gate(name: str) -> bool:
    """A tanh gate parameter (`...gate_attn`, `...gate`, `..._embedding_gate`)."""
    return name.rsplit(".", 1)[-1].startswith("gate") or name.endswith("_gate")


def stage_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, gate_lr_multiplier: float = 1.0,
    lr_multiplier_of: Callable[[str], float] | None = None,
) -> list[dict]:
    """A training stage's AdamW groups of the trainable parameters: decay, no-decay, and
    the tanh gates in their own no-decay group at lr x gate_lr_multiplier (decay would pull
    them to 0; a larger step shortens their cold start). lr_multiplier_of(name): a further
    factor per parameter (OptimConfig.group_lr_multipliers by trainability group); each
    distinct factor gets its own groups. Empty groups are omitted."""
    decay, no_decay = split_decay_params(named_params)
    factor = lr_multiplier_of or (lambda name: 1.0)
    kinds = [(decay, weight_decay, 1.0), ([(n, p) for n, p in no_decay if not is_gate(n)], 0.0, 1.0),
             ([(n, p) for n, p in no_decay if is_gate(n)], 0.0, gate_lr_multiplier)]
    groups = []
    for params, wd, kind_factor in kinds:
        by_factor: dict[float, list[nn.Parameter]] = {}
        for n, p in params:
            by_factor.setdefault(float(factor(n)), []).append(p)
        for f, ps in by_factor.items():
            group = {"params": ps, "weight_decay": wd}
            if kind_factor * f != 1.0:
                group["lr"] = lr * kind_factor * f
            groups.append(group)
    return [g for g in groups if g["params"]]


def group_lr_multiplier_of(model: nn.Module, multipliers: dict[str, float]) -> Callable[[str], float] | None:
    """OptimConfig.group_lr_multipliers -> name -> factor over `model`'s trainability groups
    (llama_vision.model.trainability); None when empty. An unknown group or a factor <= 0 is
    a ValueError naming the known groups."""
    if not multipliers:
        return None
    from llama_vision.model.trainability import trainable_groups

    groups = trainable_groups(model)
    unknown = sorted(set(multipliers) - set(groups))
    if unknown:
        raise ValueError(f"optim.group_lr_multipliers: unknown group(s) {unknown}; this model's groups are {sorted(groups)}")
    bad = {g: f for g, f in multipliers.items() if not f > 0}
    if bad:
        raise ValueError(f"optim.group_lr_multipliers: factors must be > 0, got {bad}")
    owner = {n: g for g, named in groups.items() for n, _ in named}
    return lambda name: multipliers.get(owner.get(name, ""), 1.0)


def build_stage_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], optim, shards: bool = False,
                          lr_multiplier_of: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """A training stage's AdamW (`optim`: the config's OptimConfig) over its trainable
    parameters, in `stage_param_groups`. shards: the parameters are FSDP shards already,
    so a plain AdamW keeps state for the shards only; otherwise the state is sharded over
    the data-parallel ranks (ZeRO-1; plain AdamW at DP = 1)."""
    import model_parallel as mp

    groups = stage_param_groups(named_params, optim.lr, optim.weight_decay, optim.gate_lr_multiplier, lr_multiplier_of)
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    return torch.optim.AdamW(groups, **kwargs) if shards else mp.zero_redundancy_adamw(groups, **kwargs)


def build_adamw(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    no_decay_keywords: Iterable[str] = ("embed",),
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``named_params`` (e.g. ``model.named_parameters()``).

    Two param groups, named ``"decay"`` (``weight_decay``) and ``"no_decay"`` (0.0); an empty
    group is omitted. Raises ``ValueError`` if nothing is trainable.
    """
    decay, no_decay = split_decay_params(named_params, no_decay_keywords)
    groups = []
    if decay:
        groups.append({"params": [p for _, p in decay], "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": [p for _, p in no_decay], "weight_decay": 0.0, "name": "no_decay"})
    if not groups:
        raise ValueError("build_adamw: no trainable parameters (all have requires_grad=False)")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float | None, norm_type: float = 2.0) -> float:
    """Clip the global gradient norm of ``params`` to ``max_norm``; return the pre-clip norm.

    Parameters whose ``.grad`` is ``None`` (frozen, or unused this step) are skipped; with no
    gradients at all the norm is 0.0. ``max_norm=None`` (or ``inf``) only measures the norm.
    A non-finite norm is returned as is (the grads are then non-finite too; the caller should
    skip the optimizer step). The norm is over *local* tensors: with tensor-parallel sharded
    parameters, the caller must combine per-rank norms across the model-parallel group.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    if max_norm is None or math.isinf(max_norm):
        total = torch.nn.utils.get_total_norm([p.grad for p in with_grad], norm_type=norm_type)
    else:
        total = torch.nn.utils.clip_grad_norm_(with_grad, max_norm, norm_type=norm_type)
    return float(total)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total": n, "trainable": n}`` element counts (shared parameters counted once)."""
    total = trainable = 0
    for p in model.parameters():  # Module.parameters() already de-duplicates shared tensors
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"total": total, "trainable": trainable}
