"""The modality-extension seam: a modality = a placeholder token, an encoder that turns
raw inputs into text-width tokens, and a set of gated cross-attention adapters scheduled
into the decoder. Images are registered this way by the model itself; video (and any
user modality) is added with `VisionLanguageModel.add_modality` without editing the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class MediaTokens:
    """An encoder's output for a batch.

    tokens: [B, N, L, D] text-width tokens of N media slots per row (L tokens each).
    valid:  [B, N, L] bool; False for padding (empty tiles, absent slots).
    """

    tokens: torch.Tensor
    valid: torch.Tensor


@dataclass
class Modality:
    """name: key of the modality in `media_inputs`; token_id: its placeholder in the token
    stream (each placeholder marks where one item sits); encode(inputs) -> MediaTokens;
    adapter_attr: state-dict name of its adapter blocks under `text_model`; layers: the
    self-attention layers its blocks run before; order: who runs first at a shared layer;
    aliases: other ids accepted as the placeholder at the input."""

    name: str
    token_id: int
    encode: Callable[[Any], MediaTokens]
    adapter_attr: str
    layers: list[int]
    order: int = 0
    aliases: tuple[int, ...] = ()
    trainable_modules: list[str] = field(default_factory=list)

    @property
    def placeholder_ids(self) -> set[int]:
        return {self.token_id, *self.aliases}


def every_kth(layers: list[int], k: int) -> list[int]:
    """Every k-th entry of a schedule, counted so that the last one is kept
    (the paper's "before every 4th image cross-attention layer")."""
    return layers[::-1][::k][::-1]


def zero_gates(module: nn.Module) -> None:
    """Set every tanh gate under `module` to 0 (a control run: adapters become no-ops)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gate_attn", "gate_ffwd"):
                p.zero_()
