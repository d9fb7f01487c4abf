"""transformers' Mllama on the tiny config, for tests that compare against it (imported as
`from _hf_mllama import ...`; needs transformers)."""
from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from llama_vision.checkpoint.hf import supported_aspect_ratios

IMG = 512  # image token id of the tiny config (= vocab_size)


def taps_are_layer_inputs(self, hidden_states, attention_mask=None):
    """MllamaVisionEncoder.forward recording each layer's INPUT, as Meta's reference taps
    (`out.append(x)` before block i) and transformers < 5 did. transformers 5.23 records
    layer OUTPUTS, shifting every intermediate feature one layer late (pinned below)."""
    states = ()
    for layer in self.layers:
        states += (hidden_states,)
        hidden_states = layer(hidden_states=hidden_states, attention_mask=attention_mask)
    return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states + (hidden_states,))


def tile_images(ratios: list[tuple[int, int]], seed: int, max_tiles: int = 4, size: int = 28):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.zeros(1, len(ratios), max_tiles, 3, size, size)
    for i, (h, w) in enumerate(ratios):
        imgs[0, i, : h * w] = torch.randn(h * w, 3, size, size, generator=g)
    ar = torch.tensor([ratios], dtype=torch.long)
    return imgs, ar


def hf_inputs(tokens: list[int], ratios, imgs):
    ids = torch.tensor([tokens])
    if not ratios:
        return dict(input_ids=ids)
    table = supported_aspect_ratios(4)
    ar_ids = torch.tensor([[table.index(tuple(r)) + 1 for r in ratios]])
    ar_mask = torch.zeros(1, len(ratios), 4, dtype=torch.long)
    for i, (h, w) in enumerate(ratios):
        ar_mask[0, i, : h * w] = 1
    sparse = get_cross_attention_token_mask(tokens, IMG)
    dense = convert_sparse_cross_attention_mask_to_dense(
        [sparse], num_tiles=[[h * w for h, w in ratios]], max_num_tiles=4, length=len(tokens)
    )
    return dict(
        input_ids=ids,
        pixel_values=imgs,
        aspect_ratio_ids=ar_ids,
        aspect_ratio_mask=ar_mask,
        cross_attention_mask=torch.from_numpy(dense),
    )
