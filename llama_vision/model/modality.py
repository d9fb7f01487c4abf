"""The modality-extension seam: a modality = a placeholder token, an encoder that turns
raw inputs into text-width tokens, and a way to fuse them into the decoder:

* fusion "cross_attention" (the paper's): gated cross-attention adapters scheduled before
  decoder layers read the tokens; one placeholder marks where an item sits, and the text
  after it sees the item (Meta's span rule). Images are registered this way by the model
  itself; video is added the same way.
* fusion "projector" (LLaVA's early fusion): the tokens ARE decoder inputs. The prompt holds
  one placeholder per visual token (the input side expands an item's placeholder to as
  many as its encoder gives: `tokens_per_item`), and the model puts the encoder's tokens
  in their place (`DecoderInput.input_embeds` + `embeds_mask`, docs/decoder_input.md), so
  masks, positions, KV caches and ragged batches treat them as ordinary tokens. No
  adapter blocks; the text model is unchanged.

Any modality is added with `VisionLanguageModel.add_modality` without editing the model.
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
class FusedEmbeds:
    """A projector modality's tokens for a batch, ready to replace its placeholders.

    tokens: [M, D] every row's visual tokens in placeholder order (row-major).
    counts: [B] tokens per row (= the row's placeholders of the modality).
    """

    tokens: torch.Tensor
    counts: list[int]
    unattended: torch.Tensor | None = None
    """[K, D] tokens of items whose rows have no placeholder (VisionLanguageModel.
    unattended_media: FSDP's dummy media), kept in the graph with weight 0; else None."""


FUSIONS = ("cross_attention", "projector")


@dataclass
class Modality:
    """name: key of the modality in `media_inputs`; token_id: its placeholder in the token
    stream (each placeholder marks where one item sits); encode(inputs) -> MediaTokens;
    adapter_attr: state-dict name of its adapter blocks under `text_model`; layers: the
    self-attention layers its blocks run before; order: who runs first at a shared layer;
    aliases: other ids accepted as the placeholder at the input. fusion: "cross_attention"
    or "projector" (module docstring; a projector modality has no adapter blocks:
    adapter_attr "" and layers []).
    tokens_per_item(item_meta) -> how many placeholders one item takes in the prompt
    (projector fusion; None for cross-attention, where an item takes one)."""

    name: str
    token_id: int
    encode: Callable[[Any], MediaTokens]
    adapter_attr: str
    layers: list[int]
    order: int = 0
    aliases: tuple[int, ...] = ()
    trainable_modules: list[str] = field(default_factory=list)
    fusion: str = "cross_attention"
    tokens_per_item: Callable[[Any], int] | None = None

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
