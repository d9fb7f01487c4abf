"""Batch containers produced by :mod:`llama_vision.data.collate`.

Shapes (``B`` rows, ``L`` = longest row, ``N`` = most images in a row (at least 1),
``T`` = ``max_num_tiles``, ``S`` = tile size):

* ``tokens`` int64 ``[B, L]``: right-padded with the tokenizer's pad id; image positions hold
  ``tokenizer.image_token_id``.
* ``labels`` int64 ``[B, L]``: already shifted, ``labels[b, i]`` is the target predicted *at*
  position ``i`` (``tokens[b, i + 1]``) or ``-100`` (no loss: prompt, image tokens, padding).
* ``lengths`` int64 ``[B]``: real (unpadded) length of each row. Right padding means
  positions are simply ``arange(L)``, so no position tensor is carried.
* ``images`` float32 ``[B, N, T, 3, S, S]`` or ``None`` when no row has an image; absent
  tiles and images are exact zeros. With ``data.tile_dtype: uint8`` the loader hands out
  uint8 pixels instead (black padding and absent slots 0), and :meth:`Batch.normalized`
  turns them into the float32 tiles, bit for bit, once on the device.
* ``aspect_ratios`` int64 ``[B, N, 2]``: ``(tiles_h, tiles_w)`` per image, ``(1, 1)`` for
  absent images; ``num_tiles`` int64 ``[B, N]`` (0 for absent images); ``num_images`` int64
  ``[B]``.
* ``keys``: the sample keys (for logs); ``skipped``: cumulative skip counts per reason of the
  DataLoader worker that built the batch (see ``datasets.SkipCounter``); ``position``: that
  worker's resume position after this batch (see ``datasets.ExampleDataset.observe``).

Packed batches (``data.packing``, :mod:`.packing`) hold several samples per row, and three
more tensors (all ``None`` in an unpacked batch); see docs/decoder_input.md:

* ``positions`` int64 ``[B, L]``: RoPE position of each token, restarting at 0 for every
  packed sample (and for the row's padding).
* ``segment_ids`` int64 ``[B, L]``: which sample of the row (0, 1, ...) each token belongs
  to, ``-1`` for padding. ``lengths`` is still the real tokens per row (all its samples).
* ``image_segments`` int64 ``[B, N]``: the sample of each image slot, ``-1`` for absent
  slots. Images are the concatenation of the row's samples' images, in token order, so
  ``N`` = most images in a packed row. ``keys`` lists every sample, row by row.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from .tiling import CLIP_MEAN, CLIP_STD, normalize_tiles

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A padded language-modelling batch (pretraining captions or SFT dialogs)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    images: torch.Tensor | None
    aspect_ratios: torch.Tensor
    num_tiles: torch.Tensor
    num_images: torch.Tensor
    keys: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    position: dict[str, Any] | None = None
    positions: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    image_segments: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    @property
    def num_targets(self) -> int:
        """Number of labelled (loss-bearing) tokens in the batch."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def real_tokens(self) -> int:
        """Non-padding tokens (every packed sample's tokens; image placeholders included)."""
        return int(self.lengths.sum())

    @property
    def padded_tokens(self) -> int:
        """Token slots the decoder runs: rows x padded length (``B * L``)."""
        return self.tokens.numel()

    @property
    def padding_fraction(self) -> float:
        """Share of the decoder's token slots that are padding: ``1 - real / padded``."""
        return 1.0 - self.real_tokens / max(self.padded_tokens, 1)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor | None = None) -> "Batch":
        """A copy with ``fn`` applied to every tensor (``images`` given: use it as is)."""
        optional = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(
            self,
            tokens=fn(self.tokens),
            labels=fn(self.labels),
            lengths=fn(self.lengths),
            images=images if images is not None else optional(self.images),
            aspect_ratios=fn(self.aspect_ratios),
            num_tiles=fn(self.num_tiles),
            num_images=fn(self.num_images),
            positions=optional(self.positions),
            segment_ids=optional(self.segment_ids),
            image_segments=optional(self.image_segments),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device`` (dtypes unchanged: casting images to the
        model's dtype is the model's business)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """A copy in page-locked memory; called by ``DataLoader(pin_memory=True)``."""
        return self._map(lambda t: t.pin_memory())

    def normalized(
        self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, dtype: torch.dtype = torch.float32
    ) -> "Batch":
        """A copy whose uint8 ``images`` are normalised where they are (call it after
        :meth:`to`): ``dtype`` ``[B, N, T, 3, S, S]``, equal to the float32 loader's images
        (absent tiles and images exact zeros; see ``tiling.normalize_tiles``). Float images
        (``data.tile_dtype: float32``, or none) are returned as they are, so callers need
        not know the loader's tile dtype. ``mean``/``std``: the ImageProcessor's."""
        if self.images is None or self.images.dtype != torch.uint8:
            return self
        return replace(self, images=normalize_tiles(self.images, self.num_tiles, mean, std, dtype))


@dataclass
class PreferenceBatch:
    """DPO batch: ``chosen`` and ``rejected`` continuations of the same prompts.

    Both :class:`Batch` es share one ``images`` tensor (same object), so images are moved to
    the device and encoded once per pair; their token/label tensors are padded separately.
    """

    chosen: Batch
    rejected: Batch

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def keys(self) -> list[str]:
        return self.chosen.keys

    @property
    def skipped(self) -> dict[str, int]:
        return self.chosen.skipped

    @property
    def position(self) -> dict[str, Any] | None:
        return self.chosen.position

    @property
    def images(self) -> torch.Tensor | None:
        return self.chosen.images

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PreferenceBatch":
        images = None if self.images is None else fn(self.images)
        return PreferenceBatch(self.chosen._map(fn, images), self.rejected._map(fn, images))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PreferenceBatch":
        """A copy on ``device``; the shared images are transferred once."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PreferenceBatch":
        return self._map(lambda t: t.pin_memory())

    def normalized(
        self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, dtype: torch.dtype = torch.float32
    ) -> "PreferenceBatch":
        """As :meth:`Batch.normalized`; the shared images are normalised once (and stay shared)."""
        chosen = self.chosen.normalized(mean, std, dtype)
        if chosen is self.chosen:  # nothing to normalise
            return self
        return PreferenceBatch(chosen, replace(self.rejected, images=chosen.images))


def batch_fingerprint(batch: Any) -> torch.Tensor:
    """A cheap content summary of any batch dataclass (`Batch`, `VideoBatch`,
    `PreferenceBatch`) -> float64 [k], on the batch's device: the CRC of its sample keys,
    and per tensor field its element count, its sum and (integer fields) a
    position-weighted sum. Optional tensor fields count when present (a packed batch's
    positions, segment_ids and image_segments: the same tokens packed differently give
    another fingerprint). Equal on ranks that hold the same batch; different, in
    practice, when one rank read other samples or other bytes (a transient read error
    that skipped or corrupted a sample)."""
    values: list[torch.Tensor] = []
    device = None

    def visit(obj: Any) -> None:
        nonlocal device
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                visit(v)
            elif isinstance(v, torch.Tensor):
                device = device or v.device
                values.append(torch.tensor(float(v.numel()), dtype=torch.float64, device=v.device))
                values.append(v.sum(dtype=torch.float64))
                if not v.is_floating_point():
                    weights = torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.float64)
                    values.append((v.reshape(-1).to(torch.float64) * weights).sum())
            elif f.name == "keys":
                values.append(torch.tensor(float(zlib.crc32("\n".join(v).encode())), dtype=torch.float64))

    visit(batch)
    device = device or torch.device("cpu")
    return torch.stack([t.to(device) for t in values])
