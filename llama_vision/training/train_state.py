"""The training state, as one distributed checkpoint that resumes at any layout.

What a checkpoint holds (dcp_checkpoint.py has the files):

Tensors (torch.distributed.checkpoint; each rank contributes its pieces of every global
tensor, see model_parallel.dcp.global_view, so a load at another TP degree, DP degree or
data-parallel mode reads its own new pieces):

    model.<param>                          trainable parameters (frozen weights come from
                                           init_from / init_text_from, never from here)
    optim.<param>.exp_avg / .exp_avg_sq    AdamW moments (FSDP: sharded like the params;
                                           ZeRO-1: written by the owning rank)
    optim.<param>.step                     AdamW's step count of that parameter
    reference.<param>                      DPO: the reference policy's trainable tensors
    rng.rank<R>.<generator>                every rank's RNG state (a rank beyond the saved
                                           world resumes rank 0's)

JSON (train_state.json, rank 0):

    progress    {step, skipped_nonfinite}
    scheduler   the LR scheduler's state (it owns the learning rate)
    data        the data position of every data-parallel rank (their loaders' state), from
                which a run at another DP degree or worker count continues the same
                global sample order (llama_vision.data.datasets.resume_position)
    layout      {world_size, tp, dp, data_parallel, num_workers} of the run that wrote it

AdamW creates its state lazily, at a parameter's first gradient; both save and load first
give every trainable parameter an explicit zero state (exactly what AdamW would create),
so every layout saves and expects the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import model_parallel as mp

from .checkpointing import capture_rng_state, restore_rng_state
from .dcp_checkpoint import DistributedCheckpointer

__all__ = ["Progress", "TrainState", "materialize_adamw_state"]


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


@torch.no_grad()
def materialize_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of an AdamW without state the state AdamW's first step would
    create (step 0, zero moments): bitwise the same run afterwards (AdamW skips a
    parameter without gradient whether or not it has state)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class TrainState:
    """Everything a resumed run needs, in the layout above.

    tp_dims: parameter name -> the dim fairscale split it along (None: TP-replicated).
    dp_sharded: the parameters are FSDP shards over the DP ranks.
    layout: this run's {world_size, tp, dp, data_parallel, num_workers}."""

    def __init__(self, progress: Progress, model: nn.Module, optimizer, scheduler, loader, objective,
                 tp_dims: dict[str, int | None], dp_sharded: bool, layout: dict):
        self.progress, self.model, self.optimizer, self.scheduler = progress, model, optimizer, scheduler
        self.loader, self.objective = loader, objective
        self.tp_dims, self.dp_sharded, self.layout = tp_dims, dp_sharded, layout

    @property
    def local_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW holding this rank's state (under ZeRO-1 the wrapper's inner one)."""
        return getattr(self.optimizer, "optim", self.optimizer)

    def _view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return mp.global_view(t.detach(), self.tp_dims.get(name), self.dp_sharded)

    def tensors(self, rng_rank: int | None = None) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors of this rank: views of the live state (loading into
        them restores it in place), RNG under `rng.rank<rng_rank>` (default: this rank)."""
        out = {f"model.{n}": self._view(n, p) for n, p in self.model.named_parameters() if p.requires_grad}
        names = {id(p): n for n, p in self.model.named_parameters()}
        local = self.local_optimizer
        materialize_adamw_state(local)
        for group in local.param_groups:
            for p in group["params"]:
                n = names[id(p)]
                for key, value in local.state[p].items():
                    out[f"optim.{n}.{key}"] = value if key == "step" else self._view(n, value)
        for n, t in (getattr(self.objective, "reference", None) or {}).items():
            out[f"reference.{n}"] = self._view(n, t)
        rank = mp.global_rank() if rng_rank is None else rng_rank
        out.update({f"rng.rank{rank}.{k}": v for k, v in capture_rng_state().items()})
        return out

    def json_state(self) -> dict:
        """The small state (collective: gathers every DP rank's data position)."""
        return {
            "progress": self.progress.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": mp.all_gather_object(self.loader.state_dict(), "dp"),
            "layout": self.layout,
        }

    def save(self, checkpointer: DistributedCheckpointer, step: int) -> None:
        checkpointer.save(step, self.tensors(), self.json_state())

    def load(self, checkpointer: DistributedCheckpointer, step_dir: str | Path) -> None:
        """Restore everything from `step_dir` (collective), whatever layout wrote it."""
        state = checkpointer.read_state(step_dir)
        saved = checkpointer.saved_keys(step_dir)
        rank = mp.global_rank()
        source = rank if rank < int(state["layout"]["world_size"]) else 0
        tensors = {k: v for k, v in self.tensors(rng_rank=source).items() if not (k.startswith("rng.") and k not in saved)}
        missing = sorted(k for k in tensors if k not in saved)
        if missing:
            raise KeyError(
                f"checkpoint {step_dir} lacks {len(missing)} tensors this run needs (another stage or trainable "
                f"set?): {missing[:5]}"
            )
        checkpointer.load_tensors(step_dir, tensors)
        prefix = f"rng.rank{source}."
        restore_rng_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.scheduler.load_state_dict(state["scheduler"])
        # The scheduler owns the lr: put it into the groups it drives (under ZeRO-1 the
        # wrapper's, copied into the inner optimizer at every step and not part of its state).
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.progress.load_state_dict(state["progress"])
        # The dataset that keeps the position (micro-batch builders wrap it) translates it.
        keeper = self.loader.dataset
        while not hasattr(keeper, "resume_state"):
            keeper = keeper.dataset
        self.loader.load_state_dict(keeper.resume_state(state["data"], mp.dp_rank(), mp.dp_size(), self.layout["num_workers"]))
