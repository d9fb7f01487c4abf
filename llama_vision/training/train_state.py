"""The training state as Stateful pieces, each with `state_dict()` / `load_state_dict()`
(torch.distributed.checkpoint's Stateful protocol), and the one dict a rank writes.

Layout of a rank's checkpoint dict (torch.save, `weights_only`-loadable; see
checkpointing.CheckpointManager for the files)::

    step, skipped_nonfinite   Progress
    trainable                 {name: tensor} of the trainable parameters (frozen weights come
                              from `init_from` / the model's params, never from here)
    optimizer                 this rank's AdamW state (at DP > 1: its ZeRO-1 shard)
    scheduler                 the LR scheduler
    data                      the loader's position (per worker, per DP rank)
    rng                       Python / numpy / torch (CPU, CUDA) generators
    + the objective's own     DPO: reference (the reference policy's trainable tensors)

Distributed checkpointing (DCP) replaces this file only: the trainer sees `TrainState`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpointing import capture_rng_state, restore_rng_state

__all__ = ["ModelTrainables", "OptimizerState", "Progress", "RNGState", "SchedulerState", "TrainState"]


@dataclass
class Progress:
    """Optimizer steps taken (skipped ones included) and steps skipped for a non-finite
    loss or gradient."""

    step: int = 0
    skipped_nonfinite: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_nonfinite": self.skipped_nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))


class ModelTrainables:
    """The model's trainable parameters by name (this rank's TP shards)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.model.named_parameters())
        trainable = {n for n, p in named.items() if p.requires_grad}
        if set(state) != trainable:
            missing, extra = sorted(trainable - set(state)), sorted(set(state) - trainable)
            raise KeyError(f"checkpoint's trainable tensors do not match this stage's: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, t in state.items():
            named[n].copy_(t)


class OptimizerState:
    """The optimizer's state: at DP > 1 the ZeRO-1 wrapper's local (inner) optimizer, i.e.
    this rank's shard -- the one place that knows about the wrapper."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    @property
    def local(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optim", self.optimizer)

    def state_dict(self) -> dict:
        return self.local.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.local.load_state_dict(state)


class SchedulerState:
    """The LR scheduler, which owns the learning rate: loading puts its value into the
    param groups it drives. At DP > 1 those are the ZeRO wrapper's, copied into the inner
    optimizer at every step and not part of the inner state (without this the first step
    after a resume runs at the step-0 lr)."""

    def __init__(self, scheduler, optimizer: torch.optim.Optimizer):
        self.scheduler, self.optimizer = scheduler, optimizer

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


class RNGState:
    """Every generator training draws from (data order lives in `data`, not here)."""

    def state_dict(self) -> dict:
        return capture_rng_state()

    def load_state_dict(self, state: dict) -> None:
        restore_rng_state(state)


class TrainState:
    """All of a rank's training state in the layout above. `objective` contributes its own
    top-level keys (DPO's reference) and reads them back from the whole dict."""

    def __init__(self, progress: Progress, model: nn.Module, optimizer, scheduler, loader, objective):
        self.progress = progress
        self.objective = objective
        # Load order matters: the scheduler writes the lr into the optimizer's groups.
        self.parts: dict[str, Any] = {
            "trainable": ModelTrainables(model),
            "optimizer": OptimizerState(optimizer),
            "scheduler": SchedulerState(scheduler, optimizer),
            "data": loader,
            "rng": RNGState(),
        }

    def state_dict(self) -> dict:
        return {
            **self.progress.state_dict(),
            **{key: part.state_dict() for key, part in self.parts.items()},
            **self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, part in self.parts.items():
            part.load_state_dict(state[key])
        self.objective.load_state_dict(state)
        self.progress.load_state_dict(state)
