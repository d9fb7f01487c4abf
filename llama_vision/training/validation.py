"""Validation during training: the LM loss and greedy token accuracy on held-out data.

Every labelled token of the held-out set counts once, on every data-parallel rank's share
(the same record split as training, read in order): val_loss = summed NLL / targets,
val_token_accuracy = (argmax == target) / targets, both over ALL ranks (one all-reduce at
the end, so ranks with different numbers of held-out batches stay in step).
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import torch

import model_parallel as mp
from llama_vision.data.batch import IGNORE_INDEX

from .data import build_loader
from .losses import lm_loss_sum
from .media_sync import blank_batch, embedding_tables, unattended_images, uniform_media

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
    # Held-out data is of kind data.kind, also when training reads a mixture (data.sources).
    eval_cfg = replace(cfg, data=replace(cfg.data, paths=list(cfg.data.eval_paths), shuffle=False, sources=[]))
    return build_loader(eval_cfg, tokenizer, model_args, mp.dp_rank(), mp.dp_size(), loop=False)


@torch.no_grad()
def validate(objective, loader, device: torch.device, max_batches: int = 0, *, fsdp: bool = False, tile_size: int = 0,
             projector: tuple[int, int] | None = None) -> dict:
    """-> {"val_loss", "val_token_accuracy", "val_targets"} over the held-out set.

    `objective` is the stage's LMObjective (its `logits(batch)`); the model is put in eval
    mode for the pass and back in train mode after it. fsdp: the DP ranks run the same
    modules batch by batch (media_sync), a rank whose share ran out running target-free
    blank batches until every rank's has; tile_size / projector: the dummy images'
    (media_sync.with_dummy_media)."""
    model = objective.model
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, correct, targets
    try:
        for batch, every_table in _held_out(loader, max_batches, device, fsdp, tile_size, model.args.vocab_size, projector):
            batch = batch.to(device).normalized()  # uint8 tiles (data.tile_dtype): on the device
            with embedding_tables(model, every_table), unattended_images(model, fsdp and projector is not None):
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


def _held_out(loader, max_batches: int, device, fsdp: bool, tile_size: int, vocab_size: int, projector=None):
    """(batch, read every embedding table) pairs of this rank's share; under FSDP in step
    with the other DP ranks (one small all-reduce per batch)."""
    it, last = iter(loader), None
    for i in itertools.count():
        batch = None if max_batches and i >= max_batches else next(it, None)
        if not fsdp:
            if batch is None:
                return
            yield batch, False
            continue
        if not mp.all_reduce_max(torch.tensor([batch is not None], dtype=torch.uint8, device=device), "dp").item():
            return
        batch = blank_batch(last) if batch is None else batch
        last = batch
        yield uniform_media([batch], tile_size, vocab_size, device, projector)[0]
