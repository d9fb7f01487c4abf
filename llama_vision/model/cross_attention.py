"""Gated cross-attention adapters and the media state they read.

Block (Meta's CrossAttentionTransformerBlock):
    h   = x + tanh(g_attn) * row * XAttn(RMSNorm(x), media)
    out = h + tanh(g_ffwd) * row * FFN(RMSNorm(h))
`row` is 1 for text positions with a media item before them, 0 otherwise: such rows
pass through unchanged (Meta zeroes BOTH branches; transformers zeroes only the FFN and
lets those rows attend to every vision token -- we follow Meta, see the tests).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model_parallel import tp_size

from .args import ModelArgs
from .attention import attention
from .layers import FeedForward, GQAProjections, RMSNorm

NO_END = 1 << 40  # the last media span runs to the end of generation


class CrossAttention(GQAProjections):
    """Queries from text, keys/values from media tokens; GQA; RMSNorm on q and k."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.q_norm = RMSNorm(self.head_dim, eps=args.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=args.norm_eps)
        # Replicated, but each TP rank only normalises its own heads: its gradient is a
        # partial sum that the trainer all-reduces over the TP group.
        self.q_norm.weight.tp_partial_grad = self.k_norm.weight.tp_partial_grad = tp_size() > 1

    def compute_kv(self, media_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """media_tokens [B, T, D] -> k, v [B, n_local_kv_heads, T, head_dim].

        Cached at GQA width: Meta's reference repeats them to every query head (n_rep x
        the memory); the attention kernel broadcasts instead.
        """
        b, t, _ = media_tokens.shape
        k = self.k_norm(self.wk(media_tokens).view(b, t, self.n_local_kv_heads, self.head_dim))
        v = self.wv(media_tokens).view(b, t, self.n_local_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, kv, mask, row):
        """x [B, S, D], mask bool [B, 1, S, T], row [B, S, 1] -> [B, S, D]."""
        b, s, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, s, self.n_local_heads, self.head_dim)).transpose(1, 2)
        out = attention(q, kv[0], kv[1], mask=mask, backend=self.backend)
        out = out.transpose(1, 2).reshape(b, s, -1) * row
        return self.wo(out)


class GatedCrossAttentionBlock(nn.Module):
    """A trunk-sized block with tanh gates (initialised to 0: a fresh adapter is a no-op)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = CrossAttention(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def compute_kv(self, media_tokens: torch.Tensor):
        return self.attention.compute_kv(media_tokens)

    def forward(self, x, kv, mask, row):
        row = row.to(x.dtype)
        h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), kv, mask, row)
        return h + self.gate_ffwd.tanh() * (self.feed_forward(self.ffn_norm(h)) * row)


def build_adapter_blocks(args: ModelArgs, n: int) -> nn.ModuleList:
    return nn.ModuleList(GatedCrossAttentionBlock(args) for _ in range(n))


@dataclass
class MediaState:
    """What the adapters of one modality need, computed once per prompt.

    kv:          per adapter block (keyed by id), k/v [B, Hkv, T, Dh] over the flattened
                 media tokens of each row (T = N media slots x tokens per slot).
    token_owner: [T] media slot of each token.
    token_valid: [B, T] False for padding (absent media, empty tiles).
    span_start, span_end: [B, N] text positions [start, end) that attend to slot n.
    """

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    token_owner: torch.Tensor
    token_valid: torch.Tensor
    span_start: torch.Tensor
    span_end: torch.Tensor
    extra: dict = field(default_factory=dict)

    def kv_for(self, block: nn.Module):
        return self.kv[id(block)]

    def masks(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] -> (attend bool [B, 1, S, T], row [B, S, 1] bool)."""
        p = positions[:, :, None]
        sees = (self.span_start[:, None, :] <= p) & (p < self.span_end[:, None, :])  # [B, S, N]
        mask = sees[:, :, self.token_owner] & self.token_valid[:, None, :]
        row = mask.any(-1, keepdim=True)
        # Rows that see nothing attend everywhere (no NaN) and are zeroed by `row`, exactly
        # as Meta's additive mask does after multiplying it by the row mask.
        return (mask | ~row)[:, None], row

    def select_rows(self, rows: torch.Tensor) -> "MediaState":
        return MediaState(
            kv={k: (a[rows], b[rows]) for k, (a, b) in self.kv.items()},
            token_owner=self.token_owner,
            token_valid=self.token_valid[rows],
            span_start=self.span_start[rows],
            span_end=self.span_end[rows],
            extra=self.extra,
        )


def media_spans(tokens: list[list[int]], placeholder_ids: set[int], slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Text spans attending to each media item, by Meta's rule (create_vision_mask):

    media i sees positions [loc_i, loc_{i+1}); the last one sees everything after it
    (through generation -- the reference stops at the prompt end, so generated tokens of
    a multi-image prompt saw no image; we follow transformers here); consecutive
    placeholders share the text that follows the last of them.
    Returns start, end LongTensors [B, slots]; absent slots get an empty span.
    """
    rows = []
    for row in tokens:
        locs = [i for i, t in enumerate(row) if t in placeholder_ids]
        spans = [[a, b] for a, b in zip(locs[:-1], locs[1:])]
        if locs:
            spans.append([locs[-1], NO_END])
        last_end = NO_END
        for span in reversed(spans):
            if span[0] == span[1] - 1:
                span[1] = last_end
            last_end = span[1]
        rows.append(spans)
    n = max([len(r) for r in rows] + [slots or 0, 1])
    start = torch.full((len(rows), n), NO_END, dtype=torch.long)
    end = torch.zeros((len(rows), n), dtype=torch.long)
    for b, spans in enumerate(rows):
        for i, (s, e) in enumerate(spans):
            start[b, i], end[b, i] = s, e
    return start, end
