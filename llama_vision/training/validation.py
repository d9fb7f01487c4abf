"""Validation during training: the LM loss and greedy token accuracy on held-out data.

Every labelled token of the held-out set counts once, on every data-parallel rank's share
(the same record split as training, read in order): val_loss = summed NLL / targets,
val_token_accuracy = (argmax == target) / targets, both over ALL ranks (one all-reduce at
the end, so ranks with different numbers of held-out batches stay in step).
"""
from __future__ import annotations

from dataclasses import replace

import torch

import model_parallel as mp
from llama_vision.data.batch import IGNORE_INDEX

from .data import build_loader
from .losses import lm_loss_sum

__all__ = ["build_eval_loader", "eval_enabled", "validate"]


def eval_enabled(cfg) -> bool:
    """Whether `cfg` validates; a validation it cannot run is a clear error."""
    if not cfg.eval_every:
        return False
    if cfg.stage == "dpo":
        raise ValueError("eval_every: validation measures the LM loss; stage dpo has no such target (set eval_every: 0)")
    if not cfg.data.eval_paths:
        raise ValueError("eval_every is set but data.eval_paths is empty: point it at held-out shards / manifests")
    return True


def build_eval_loader(cfg, tokenizer, model_args):
    """A single pass over data.eval_paths, unshuffled (None when validation is off)."""
    if not eval_enabled(cfg):
        return None
    eval_cfg = replace(cfg, data=replace(cfg.data, paths=list(cfg.data.eval_paths), shuffle=False))
    return build_loader(eval_cfg, tokenizer, model_args, mp.dp_rank(), mp.dp_size(), loop=False)


@torch.no_grad()
def validate(objective, loader, device: torch.device, max_batches: int = 0) -> dict:
    """-> {"val_loss", "val_token_accuracy", "val_targets"} over the held-out set.

    `objective` is the stage's LMObjective (its `logits(batch)`); the model is put in eval
    mode for the pass and back in train mode after it."""
    model = objective.model
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, correct, targets
    try:
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            batch = batch.to(device)
            logits = objective.logits(batch).float()
            labels = batch.labels
            mask = labels != IGNORE_INDEX
            totals[0] += lm_loss_sum(logits, labels)
            totals[1] += ((logits.argmax(-1) == labels) & mask).sum()
            totals[2] += mask.sum()
    finally:
        model.train()
    nll, correct, targets = mp.all_reduce_sum(totals, "dp").tolist()
    n = max(targets, 1.0)
    return {"val_loss": nll / n, "val_token_accuracy": correct / n, "val_targets": int(targets)}
