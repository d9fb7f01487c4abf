"""The decoder's per-token input layout, beyond token ids: one contract for sequence
packing, per-slot KV caches and embedding fusion (docs/decoder_input.md).

    DecoderInput(
        positions    int64 [B, S]     RoPE position of each token (None: see below)
        segment_ids  int64 [B, S]     packed sample of each token; < 0 = padding
        lengths      int64 [B]        real (non-padding) tokens per row, right-padded
        input_embeds float  [B, S, D] input embeddings instead of the token embedding
        embeds_mask  bool  [B, S]     where input_embeds replaces it (None: everywhere)
    )

Self-attention: query i sees key j iff j <= i (token index in the row) and
segment_ids[i] == segment_ids[j]. Cross-attention spans (Meta's rule, see
`cross_attention.media_spans`) are in TOKEN-INDEX coordinates of the row and are clipped
to the segment of their placeholder; RoPE positions restart at 0 per segment. The two
are different numbers in a packed row: spans never read `positions`.

Everything None = today's input (a causal prefix from position 0, or the caller's
`positions` with KV caches): the same computation, bitwise-identical logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PADDING_SEGMENT = -1


@dataclass
class DecoderInput:
    """See the module docstring and docs/decoder_input.md. All fields optional."""

    positions: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    input_embeds: torch.Tensor | None = None
    embeds_mask: torch.Tensor | None = None

    @classmethod
    def packed(cls, segment_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> "DecoderInput":
        """A packed row layout from segment ids alone: positions restart at 0 per segment."""
        return cls(positions=positions_from_segments(segment_ids), segment_ids=segment_ids, lengths=lengths)

    def resolved_segments(self, seq: int, *, cached: bool = False) -> torch.Tensor | None:
        """segment_ids, or (lengths only, no KV caches) one segment per row with its
        padding apart. With caches, lengths only describe the rows: each row is one
        sequence at its positions, and padding after a prompt is overwritten as decoding
        proceeds (what generation does)."""
        if self.segment_ids is not None:
            return self.segment_ids
        if self.lengths is not None and not cached:
            return segments_from_lengths(self.lengths, seq)
        return None

    def validate(self, batch: int, seq: int, dim: int, *, cached: bool, keep: bool) -> None:
        """Raise ValueError naming the field when the layout does not fit a [batch, seq]
        input of width `dim` (cached / keep: KV caches / logit_index are in use)."""
        for name, want in (("positions", (batch, seq)), ("segment_ids", (batch, seq)), ("lengths", (batch,)),
                           ("input_embeds", (batch, seq, dim)), ("embeds_mask", (batch, seq))):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"DecoderInput.{name}: expected shape {list(want)}, got {list(t.shape)}")
        for name in ("positions", "segment_ids", "lengths"):
            t = getattr(self, name)
            if t is not None and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
                raise ValueError(f"DecoderInput.{name}: expected an integer tensor, got {t.dtype}")
        if self.embeds_mask is not None:
            if self.embeds_mask.dtype != torch.bool:
                raise ValueError(f"DecoderInput.embeds_mask: expected bool, got {self.embeds_mask.dtype}")
            if self.input_embeds is None:
                raise ValueError("DecoderInput.embeds_mask is set but input_embeds is None")
        if self.input_embeds is not None and not self.input_embeds.is_floating_point():
            raise ValueError(f"DecoderInput.input_embeds: expected a floating tensor, got {self.input_embeds.dtype}")
        if self.segment_ids is not None and cached:
            raise ValueError("DecoderInput.segment_ids describe a fresh (uncached) forward; with KV caches "
                             "each row is one sequence at its `positions` (one cache slot per row)")
        if self.resolved_segments(seq, cached=cached) is not None and keep:
            raise ValueError("logit_index is not supported with DecoderInput.segment_ids / lengths (packed rows)")
        if self.lengths is not None:
            bad = (self.lengths < 0) | (self.lengths > seq)
            if bool(bad.any()):
                raise ValueError(f"DecoderInput.lengths must be in [0, {seq}], got {self.lengths.tolist()}")
        if self.segment_ids is not None:
            check_segments(self.segment_ids, self.lengths)


def check_segments(segment_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
    """Each segment id >= 0 must form ONE contiguous run of its row (a packed sample is a
    contiguous token range; padding, < 0, may sit anywhere); with `lengths`, tokens from
    lengths[b] on are padding and the ones before are not. One host sync."""
    real = segment_ids >= 0
    runs = (segment_starts(segment_ids) & real).sum(1)
    srt = segment_ids.sort(dim=1).values
    distinct = ((srt[:, 1:] != srt[:, :-1]) & (srt[:, 1:] >= 0)).sum(1) + (srt[:, 0] >= 0).long()
    bad = runs != distinct
    if lengths is not None:
        idx = torch.arange(segment_ids.shape[1], device=segment_ids.device)
        wrong_padding = (real != (idx[None, :] < lengths[:, None].to(segment_ids.device))).any(1)
    else:
        wrong_padding = torch.zeros_like(bad)
    if bool((bad | wrong_padding).any()):
        b = int((bad | wrong_padding).nonzero()[0, 0])
        row = segment_ids[b].tolist()
        if bool(bad[b]):
            raise ValueError(f"DecoderInput.segment_ids: row {b} has a segment in two separate runs; a segment "
                             f"must be contiguous: {row}")
        raise ValueError(f"DecoderInput: row {b} has lengths={int(lengths[b])} but its segment_ids mark other "
                         f"tokens as padding (< 0): {row}")


def segments_from_lengths(lengths: torch.Tensor, seq: int) -> torch.Tensor:
    """lengths [B] -> int64 [B, seq]: 0 for the first lengths[b] tokens, PADDING_SEGMENT after."""
    idx = torch.arange(seq, device=lengths.device)[None, :]
    return torch.where(idx < lengths[:, None], 0, PADDING_SEGMENT).long()


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> bool [B, S]: True at the first token of each segment run."""
    first = torch.ones_like(segment_ids[:, :1], dtype=torch.bool)
    return torch.cat([first, segment_ids[:, 1:] != segment_ids[:, :-1]], dim=1)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> int64 [B, S]: 0, 1, 2, ... restarting at every segment run (padding too)."""
    s = segment_ids.shape[1]
    idx = torch.arange(s, device=segment_ids.device).expand_as(segment_ids)
    # The index of the latest segment start at or before each token.
    start = torch.where(segment_starts(segment_ids), idx, 0).cummax(dim=1).values
    return (idx - start).long()


def segment_ends(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> int64 [B, S]: the exclusive end (token index) of each token's segment run."""
    s = segment_ids.shape[1]
    idx = torch.arange(s, device=segment_ids.device).expand_as(segment_ids)
    last = torch.cat([segment_ids[:, 1:] != segment_ids[:, :-1], torch.ones_like(segment_ids[:, :1], dtype=torch.bool)], 1)
    # The index of the next segment end at or after each token (a reversed cummin).
    end = torch.where(last, idx + 1, s).flip(1).cummin(dim=1).values.flip(1)
    return end.long()


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> bool [B, 1, S, S]: query i sees key j iff j <= i and both are in one
    segment (block-diagonal causal). Every query sees itself, so no row is empty."""
    s = segment_ids.shape[1]
    idx = torch.arange(s, device=segment_ids.device)
    causal = idx[None, :] <= idx[:, None]  # [S(query), S(key)]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def clip_spans_to_segments(span_start: torch.Tensor, span_end: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Media spans [B, N] (token-index coordinates of the row) -> span_end clipped to the
    end of the segment that holds each span's placeholder (span_start), so an item only
    ever reaches text of its own sample. Absent slots (span_start past the row) keep
    their empty span. Idempotent.

    Equal to applying Meta's span rule (`media_spans`) to each sample alone: inside a
    sample the spans are unchanged, and the last item of a sample -- whose span would run
    to the next sample's first placeholder, or to the end -- stops at its sample's end."""
    s = segment_ids.shape[1]
    present = span_start < s
    ends = segment_ends(segment_ids)
    at = torch.gather(ends, 1, span_start.clamp(max=s - 1).to(ends.device))
    return torch.where(present.to(ends.device), torch.minimum(span_end.to(ends.device), at), span_end.to(ends.device))
