"""Learning-rate schedule: linear warmup then cosine decay.

With ``s`` the number of optimizer steps already taken (0 for the first step), ``W`` the warmup
steps and ``M`` the total steps::

    s <  W:  lr(s) = lr * (s + 1) / W                          (linear warmup, ends exactly at lr)
    s >= W:  p     = min(1, (s - W) / max(1, M - W))
             lr(s) = min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p))
    s >= M:  lr(s) = min_lr

Warmup starts at ``lr / W`` rather than 0 so the very first optimizer step is not wasted. The
first post-warmup step (``s = W``) uses the peak ``lr``; step ``M`` and beyond use ``min_lr``.
If ``W > M`` (e.g. a short smoke run overriding ``max_steps``) warmup simply never finishes.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_lr_scheduler", "warmup_cosine"]


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based), per the formula in the module docstring."""
    if warmup_steps < 0 or max_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and max_steps >= 1, got {warmup_steps}, {max_steps}")
    if min_lr < 0 or min_lr > lr:
        raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={min_lr}, lr={lr}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`warmup_cosine` as a factor of each group's initial lr.

    Call ``scheduler.step()`` once after every ``optimizer.step()``. The schedule parameters
    come from the arguments (a plain closure, so ``state_dict()`` holds only counters and
    loads with ``weights_only=True``); resume with ``scheduler.load_state_dict(sd)`` on a
    scheduler built with the same arguments, which restores ``last_epoch`` and the current lr.
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    # Validate eagerly so a bad config fails here, not at the first scheduler.step().
    warmup_cosine(0, warmup_steps=warmup_steps, max_steps=max_steps, lr=1.0, min_lr=min_lr_ratio)

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup_steps=warmup_steps, max_steps=max_steps, lr=1.0, min_lr=min_lr_ratio)

    return LambdaLR(optimizer, factor)
