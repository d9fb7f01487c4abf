"""Stage objectives: what one micro-batch adds to the loss, what the loss is normalised by,
and the stage's own metrics and state.

Every objective returns a SUMMED loss over its micro-batch; the trainer divides by the
GLOBAL count of `num_targets` over all micro-batches and data-parallel ranks, so DP=N
equals one process on the whole batch.

* `LMObjective`: token cross-entropy over the labelled tokens (pretraining, SFT, video).
* `DPOObjective`: Direct Preference Optimisation over (chosen, rejected) pairs against a
  reference policy. The reference holds ONLY the trainable tensors (the frozen trunk is
  shared with the policy: an 11B reference would otherwise be another ~45 GB), is swapped
  into the parameters in place for its forward, and is optionally EMA-updated towards the policy.
  Chosen and rejected continuations of a pair share their prompt's media, so each model
  encodes a pair's images once and scores both continuations in one forward.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Callable

import torch
from torch import nn

import model_parallel as mp

from .losses import dpo_loss, lm_loss_sum, sequence_logps

__all__ = ["DPOObjective", "LMObjective", "PairScorer", "build_objective"]

AutocastFactory = Callable[[], AbstractContextManager]


class LMObjective:
    """Summed token NLL of a `Batch` (labels already shifted; -100 = no loss)."""

    def __init__(self, model: nn.Module, autocast: AutocastFactory):
        self.model = model
        self.autocast = autocast

    def num_targets(self, batch) -> int:
        return batch.num_targets

    def logits(self, batch) -> torch.Tensor:
        """[B, L, V] logits of a Batch (images and any other modality's media inputs); a
        packed Batch (segment_ids) passes its layout as the model's DecoderInput."""
        media = batch.media_inputs() if hasattr(batch, "media_inputs") else None
        aspect_ratios = batch.aspect_ratios if batch.images is not None else None
        layout = {}
        if getattr(batch, "segment_ids", None) is not None:
            from llama_vision.model.decoder_input import DecoderInput

            layout["decoder_input"] = DecoderInput(positions=batch.positions, segment_ids=batch.segment_ids, lengths=batch.lengths)
        with self.autocast():
            return self.model(batch.tokens, batch.images, aspect_ratios, media_inputs=media, **layout)

    def loss_sum(self, batch) -> torch.Tensor:
        return lm_loss_sum(self.logits(batch), batch.labels)

    def step_metrics(self, count: torch.Tensor) -> dict:
        return {}

    def after_optimizer_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PairScorer(nn.Module):
    """(policy or reference) -> per-pair summed log-probs of the chosen and rejected
    continuations of a `PreferenceBatch`.

    The pair's media are encoded ONCE (vision encoder + every adapter's K/V) and both
    continuations are scored in one forward over [chosen rows; rejected rows]: the
    rejected rows reuse the chosen rows' media with attention spans taken from their own
    placeholders (see `VisionLanguageModel.media_for_rows`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (chosen logps [B], rejected logps [B]), float32."""
        chosen, rejected = batch.chosen, batch.rejected
        b = len(chosen)
        tokens = _cat_padded(chosen.tokens, rejected.tokens, 0)
        labels = _cat_padded(chosen.labels, rejected.labels, -100)
        media = {}
        if chosen.images is not None:
            media = self.model.prepare_media(chosen.tokens, {"image": (chosen.images, chosen.aspect_ratios)})
            rows = torch.arange(b, device=tokens.device).repeat(2)
            media = self.model.media_for_rows(media, rows, tokens)
        logps = sequence_logps(self.model(tokens, media=media), labels)
        return logps[:b], logps[b:]


def _cat_padded(a: torch.Tensor, b: torch.Tensor, value: int) -> torch.Tensor:
    """Stack [Ba, La] and [Bb, Lb] int rows into [Ba + Bb, max(La, Lb)], right-padded with
    `value`. Padding sits after each row's last token, so under the causal mask it changes
    no real position's output, and its labels are -100; 0 is a valid, non-placeholder id."""
    length = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)  # noqa: E731
    return torch.cat([pad(a), pad(b)])


class DPOObjective:
    """DPO (Rafailov et al.) with the paper's optional EMA reference.

    reference: {parameter name: tensor} for the trainable parameters only, a copy of the
    policy's at construction (after `init_from`); everything frozen is read from the policy
    itself, which is exact because frozen weights never change.
    """

    def __init__(self, model: nn.Module, beta: float, autocast: AutocastFactory, ref_ema_every: int = 0, ref_ema_decay: float = 0.99):
        self.model = model
        self.scorer = PairScorer(model)
        self.beta = beta
        self.autocast = autocast
        self.ref_ema_every = ref_ema_every
        self.ref_ema_decay = ref_ema_decay
        self.reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self._margin_sum = None

    def num_targets(self, batch) -> int:
        return len(batch)

    def loss_sum(self, batch) -> torch.Tensor:
        with torch.no_grad(), self.autocast(), self.reference_weights():
            ref_chosen, ref_rejected = self.scorer(batch)
        with self.autocast():
            chosen, rejected = self.scorer(batch)
        losses, margins = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        margin = margins.sum()
        self._margin_sum = margin if self._margin_sum is None else self._margin_sum + margin
        return losses.sum()

    @contextmanager
    def reference_weights(self):
        """Within: the model's trainable parameters hold the reference's values (swapped
        in place, one tensor at a time, and back on exit). In place because under FSDP a
        parameter is all-gathered from its shard's own storage at every use: substituting
        other tensors for the parameters (torch.func.functional_call) would be ignored."""
        params = dict(self.model.named_parameters())
        pairs = [(mp.local_tensor(params[n]), mp.local_tensor(t)) for n, t in self.reference.items()]
        _swap(pairs)
        try:
            yield
        finally:
            _swap(pairs)

    def step_metrics(self, count: torch.Tensor) -> dict:
        """reward_margin: mean beta * margin over the step's pairs on ALL DP ranks."""
        total = self._margin_sum if self._margin_sum is not None else torch.zeros((), device=count.device)
        self._margin_sum = None
        total = mp.all_reduce_sum(total.detach().float().clone(), "dp")
        return {"reward_margin": float(total / count.clamp(min=1))}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        if not (self.ref_ema_every and step % self.ref_ema_every == 0):
            return
        d = self.ref_ema_decay
        for n, p in self.model.named_parameters():
            if n in self.reference:
                self.reference[n].mul_(d).add_(p.detach(), alpha=1 - d)

    def state_dict(self) -> dict:
        return {"reference": {n: t.detach().cpu() for n, t in self.reference.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["reference"]
        if set(saved) != set(self.reference):
            missing, extra = sorted(set(self.reference) - set(saved)), sorted(set(saved) - set(self.reference))
            raise KeyError(f"DPO reference state does not match the trainable parameters: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for n, t in saved.items():
                self.reference[n].copy_(t)


@torch.no_grad()
def _swap(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for a, b in pairs:
        held = a.clone()
        a.copy_(b)
        b.copy_(held)


def build_objective(cfg, model: nn.Module, autocast: AutocastFactory):
    """The stage's objective: DPO for `stage: dpo`, token LM for every other stage."""
    if cfg.stage == "dpo":
        d = cfg.dpo
        return DPOObjective(model, d.beta, autocast, d.ref_ema_every, d.ref_ema_decay)
    return LMObjective(model, autocast)
