"""Per-image cross-attention state for the server, and its image cache.

A request's images are encoded one by one (the ViT sees each image's tiles alone, so an
image's features do not depend on what it is batched with) and each adapter block's K/V is
a per-token projection of them: an image's K/V is therefore a property of the image alone.
:class:`ImageCache` keeps it, keyed by the SHA-256 of the encoded bytes, so a repeated image
(a multi-turn chat, one document asked many questions) skips the vision encoder and the K/V
projections. :func:`batch_media` lays the cached pieces of the running slots out as the
decoder's :class:`~llama_vision.model.cross_attention.MediaState` for one batch.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from llama_vision.model.cross_attention import MediaState


@dataclass
class ImageKV:
    """One image, ready for the adapters: per adapter block (id) k, v [Hkv, L, Dh] over its
    L media tokens (tile slots x tokens per tile), valid [L] (False: empty tile slots)."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor


def image_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageCache:
    """LRU of :class:`ImageKV` by image hash (``capacity`` images; 0: no caching).

    Counters: ``encoder_runs`` (images sent through the vision encoder), ``hits``."""

    def __init__(self, model, capacity: int = 64):
        from llama_vision.data.image import ImageProcessor

        self.model = model
        self.capacity = capacity
        args = model.args
        self.processor = ImageProcessor(tile_size=args.vision_chunk_size, max_num_tiles=args.vision_max_num_chunks)
        self._entries: OrderedDict[str, ImageKV] = OrderedDict()
        self.encoder_runs = 0
        self.hits = 0

    def get(self, data: bytes) -> ImageKV:
        key = image_key(data)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        entry = self.encode(data)
        if self.capacity > 0:
            self._entries[key] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return entry

    @torch.inference_mode()
    def encode(self, data: bytes) -> ImageKV:
        """Vision encoder + every image adapter block's K/V projection for one image."""
        from llama_vision.data.image import load_image

        model = self.model
        tiles, grid = self.processor(load_image(data))
        n_slots = model.args.vision_max_num_chunks
        device = model.text_model.output.weight.device
        dtype = model.vision_model.vision_projection.weight.dtype
        images = torch.zeros(1, 1, n_slots, *tiles.shape[1:], dtype=dtype, device=device)
        images[0, 0, : tiles.shape[0]] = tiles.to(device=device, dtype=dtype)
        ratios = torch.tensor([[list(grid)]], device=device)
        enc = model.modalities["image"].encode((images, ratios))
        self.encoder_runs += 1
        tokens = enc.tokens.reshape(1, -1, enc.tokens.shape[-1])  # [1, L, D]
        kv = {}
        for block in model.text_model.adapters("image"):
            k, v = block.compute_kv(tokens)
            kv[id(block)] = (k[0], v[0])
        return ImageKV(kv=kv, valid=enc.valid.reshape(-1))


def batch_media(rows: list[list[ImageKV]], spans: list[tuple[torch.Tensor, torch.Tensor]], blocks, device) -> MediaState | None:
    """The image MediaState of a batch of slots: rows[b] = slot b's images in placeholder
    order, spans[b] = its (start, end) [n_b] text spans. Slots with fewer images (or none)
    get padding slots that nothing attends to (their rows see no image: the adapters pass
    them through unchanged, exactly as a text-only forward). None when no slot has one."""
    n_max = max((len(r) for r in rows), default=0)
    if n_max == 0:
        return None
    first = next(img for r in rows for img in r)
    length = first.valid.shape[0]
    b = len(rows)
    kv = {}
    for block in blocks:
        k0, _ = first.kv[id(block)]
        h, _, d = k0.shape
        k = torch.zeros(b, h, n_max * length, d, dtype=k0.dtype, device=device)
        v = torch.zeros_like(k)
        for i, r in enumerate(rows):
            for j, img in enumerate(r):
                ki, vi = img.kv[id(block)]
                k[i, :, j * length : (j + 1) * length] = ki
                v[i, :, j * length : (j + 1) * length] = vi
        kv[id(block)] = (k, v)
    valid = torch.zeros(b, n_max * length, dtype=torch.bool, device=device)
    start = torch.zeros(b, n_max, dtype=torch.long, device=device)
    end = torch.zeros(b, n_max, dtype=torch.long, device=device)
    for i, (r, (s, e)) in enumerate(zip(rows, spans)):
        for j, img in enumerate(r):
            valid[i, j * length : (j + 1) * length] = img.valid
        start[i, : len(r)] = s[: len(r)]
        end[i, : len(r)] = e[: len(r)]
    owner = torch.arange(n_max, device=device).repeat_interleave(length)
    return MediaState(kv=kv, token_owner=owner, token_valid=valid, span_start=start, span_end=end)
