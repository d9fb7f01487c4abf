"""Multimodal sequence packing (``data.packing``): several examples per row, up to
``max_seq_len`` tokens, instead of one example padded to the longest row.

Rows are filled greedily in stream order (next-fit): an example goes into the current
row if it fits, else it opens the next row; when the micro-batch has all its rows, the
example that did not fit is left for the next micro-batch (:class:`NextFitPacker`). The
order of examples is never changed, so a micro-batch is always a contiguous run of the
stream and its resume position is that of its last example (see :mod:`.batching`).

:func:`collate_packed` turns the rows into a :class:`~.batch.Batch` with ``positions``
(RoPE, restarting at 0 per sample), ``segment_ids`` (sample of each token, -1 = padding)
and ``image_segments``; the model reads them as a ``DecoderInput``
(docs/decoder_input.md): block-diagonal causal self-attention, and each image seen only by
its own sample's text. Labels need no change: a sample's last label is already -100
(``datasets.shifted_labels``), so nothing predicts the next sample's first token.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .batch import IGNORE_INDEX, Batch
from .collate import LLAMA3_IMAGE_TOKEN_ID, Example, _check_rows, _image_tensors, _pad

PADDING_SEGMENT = -1  # = llama_vision.model.decoder_input.PADDING_SEGMENT (no model import in data workers)


class NextFitPacker:
    """Collects one micro-batch of at most `rows` packed rows of at most `capacity` tokens.

    ``add(example)`` takes the example (True) or, the micro-batch being full, leaves it to
    the caller for the next one (False); ``flush()`` returns the rows and starts over. An
    empty packer takes any example that fits a row alone.
    """

    def __init__(self, capacity: int, rows: int):
        if capacity < 1 or rows < 1:
            raise ValueError(f"NextFitPacker needs capacity >= 1 and rows >= 1, got {capacity} and {rows}")
        self.capacity = capacity
        self.max_rows = rows
        self.rows: list[list[Example]] = []
        self._used: list[int] = []

    def add(self, example: Example) -> bool:
        n = len(example["tokens"])
        if n > self.capacity:
            raise ValueError(f"example {example['key']!r} has {n} tokens, more than a packed row's {self.capacity} "
                             f"(data.max_seq_len); the dataset should have truncated it")
        if self.rows and self._used[-1] + n <= self.capacity:
            self.rows[-1].append(example)
            self._used[-1] += n
            return True
        if len(self.rows) == self.max_rows:
            return False
        self.rows.append([example])
        self._used.append(n)
        return True

    def flush(self) -> list[list[Example]]:
        rows, self.rows, self._used = self.rows, [], []
        return rows

    def __bool__(self) -> bool:
        return bool(self.rows)


def collate_packed(
    rows: Sequence[Sequence[Example]],
    pad_id: int,
    max_num_tiles: int,
    image_token_id: int = LLAMA3_IMAGE_TOKEN_ID,
) -> Batch:
    """Packed rows (each a list of examples, in stream order) -> a packed :class:`Batch`.

    ``tokens``/``labels`` [B, L]: each row is its examples' tokens/labels concatenated,
    right-padded to the longest row; ``positions`` [B, L]: 0..n-1 per example (the
    padding run restarts at 0 too); ``segment_ids`` [B, L]: index of the example in its
    row, -1 for padding; ``images`` [B, N, T, 3, S, S]: the row's examples' images
    concatenated in token order (N = most images in a row), ``image_segments`` [B, N]: the
    example of each image slot, -1 for absent slots; ``lengths`` [B]: real tokens per
    row; ``keys``: every example's key, row by row; ``skipped``/``position``: the last
    example's (the last of the stream, since rows keep stream order).
    """
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("cannot collate packed rows: empty batch or empty row")
    if pad_id < 0:
        raise ValueError(f"pad_id must be a valid token id, got {pad_id}")
    flat = [ex for row in rows for ex in row]
    _check_rows(flat, "tokens", "labels", image_token_id)
    for ex in flat:
        if ex["labels"][-1] != IGNORE_INDEX:
            raise ValueError(f"example {ex['key']!r}: its last label is {ex['labels'][-1]}, not {IGNORE_INDEX}; "
                             f"packed, it would be trained to predict the next sample's first token")
    # Projector-modality examples (LLaVA) carry their images' placeholder counts; their
    # absent slots are sized (0, 0) (collate._image_tensors), so the rows keep saying so.
    projector = any("image_token_counts" in ex for ex in flat)
    tok_rows, lab_rows, seg_rows, pos_rows, row_media, img_seg_rows = [], [], [], [], [], []
    for row in rows:
        tok, lab, seg, pos, images, ratios, img_seg = [], [], [], [], [], [], []
        for i, ex in enumerate(row):
            n = len(ex["tokens"])
            tok += ex["tokens"]
            lab += ex["labels"]
            seg += [i] * n
            pos += range(n)
            images += ex["images"]
            ratios += ex["aspect_ratios"]
            img_seg += [i] * len(ex["images"])
        tok_rows.append(tok)
        lab_rows.append(lab)
        seg_rows.append(seg)
        pos_rows.append(pos)
        media = {"images": images, "aspect_ratios": ratios}
        if projector:
            media["image_token_counts"] = [c for ex in row for c in ex.get("image_token_counts", [])]
        row_media.append(media)
        img_seg_rows.append(img_seg)
    lengths = torch.tensor([len(t) for t in tok_rows], dtype=torch.long)
    width = int(lengths.max())
    # The padding run of a row is its own segment: positions 0, 1, ... as well.
    positions = torch.tensor([p + list(range(width - len(p))) for p in pos_rows], dtype=torch.long)
    images, aspect_ratios, num_tiles, num_images = _image_tensors(row_media, max_num_tiles)
    last = flat[-1]
    return Batch(
        tokens=_pad(tok_rows, pad_id),
        labels=_pad(lab_rows, IGNORE_INDEX),
        lengths=lengths,
        images=images,
        aspect_ratios=aspect_ratios,
        num_tiles=num_tiles,
        num_images=num_images,
        keys=[ex["key"] for ex in flat],
        skipped=dict(last.get("skipped") or {}),
        position=last.get("position"),
        positions=positions,
        segment_ids=_pad(seg_rows, PADDING_SEGMENT),
        image_segments=_pad_to(img_seg_rows, aspect_ratios.shape[1], PADDING_SEGMENT),
    )


def _pad_to(rows: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
    """Int rows -> int64 [len(rows), width], right-padded with `value`."""
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out
