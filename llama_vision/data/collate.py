"""Examples -> padded batches, and the DataLoader that keeps the data position.

An *example* (built by :mod:`llama_vision.data.datasets`) is a dict::

    key: str
    tokens: list[int]            # image positions hold image_token_id
    labels: list[int]            # shifted targets: labels[i] = tokens[i + 1] or -100
    images: list[Tensor]         # one float32 (or uint8) [n_tiles, 3, S, S] per image, in token order
    aspect_ratios: list[(h, w)]  # tile grid per image (LLaVA: the image's size in pixels)
    image_token_counts: list[int]  # LLaVA only: placeholders per image (expanded prompts)
    position, skipped            # bookkeeping for resume and skip metrics (optional)

DPO examples hold ``chosen_tokens``/``chosen_labels``/``rejected_tokens``/``rejected_labels``
instead of ``tokens``/``labels``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from .batch import IGNORE_INDEX, Batch, PreferenceBatch
from .image import stack_aspect_ratios, stack_images

LLAMA3_IMAGE_TOKEN_ID = 128256
Example = dict[str, Any]


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad int rows to the longest: int64 ``[B, L]``."""
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _check_rows(examples: Sequence[Example], tokens_key: str, labels_key: str, image_token_id: int) -> None:
    """Every row: labels as long as tokens, one image per image token."""
    for ex in examples:
        tokens, labels = ex[tokens_key], ex[labels_key]
        if len(tokens) == 0 or len(tokens) != len(labels):
            raise ValueError(f"example {ex['key']!r}: {len(tokens)} tokens but {len(labels)} labels")
        n_tokens = sum(1 for t in tokens if t == image_token_id)
        counts = ex.get("image_token_counts")  # projector modalities: many placeholders per image
        if counts is not None and n_tokens == sum(counts) and len(counts) == len(ex["images"]):
            n_tokens = len(counts)
        if n_tokens != len(ex["images"]) or len(ex["images"]) != len(ex["aspect_ratios"]):
            raise ValueError(
                f"example {ex['key']!r}: {n_tokens} image tokens (id {image_token_id}) but "
                f"{len(ex['images'])} images and {len(ex['aspect_ratios'])} aspect ratios"
            )


def _image_tensors(examples: Sequence[Example], max_num_tiles: int) -> tuple[torch.Tensor | None, ...]:
    """``(images [B,N,T,3,S,S] | None, aspect_ratios [B,N,2], num_tiles [B,N], num_images [B])``.

    ``N = max(1, most images in a row)``, following :func:`stack_images`; ``images`` is
    ``None`` when no row has an image so text-only batches skip the vision encoder, else of
    the examples' tile dtype (float32, or uint8 for ``Batch.normalized`` on the device).
    """
    per_row = [list(ex["images"]) for ex in examples]
    num_images = torch.tensor([len(r) for r in per_row], dtype=torch.long)
    # Projector-modality examples (image_token_counts) carry image sizes: (0, 0) = no image.
    absent = 0 if any("image_token_counts" in ex for ex in examples) else 1
    aspect_ratios = stack_aspect_ratios([[tuple(ar) for ar in ex["aspect_ratios"]] for ex in examples], absent)
    if int(num_images.sum()) == 0:
        return None, aspect_ratios, torch.zeros(aspect_ratios.shape[:2], dtype=torch.long), num_images
    images, num_tiles = stack_images(per_row, max_num_tiles)
    return images, aspect_ratios, num_tiles, num_images


def _lm_batch(examples, tokens_key, labels_key, pad_id, image_parts) -> Batch:
    images, aspect_ratios, num_tiles, num_images = image_parts
    last = examples[-1]
    return Batch(
        tokens=_pad([ex[tokens_key] for ex in examples], pad_id),
        labels=_pad([ex[labels_key] for ex in examples], IGNORE_INDEX),
        lengths=torch.tensor([len(ex[tokens_key]) for ex in examples], dtype=torch.long),
        images=images,
        aspect_ratios=aspect_ratios,
        num_tiles=num_tiles,
        num_images=num_images,
        keys=[ex["key"] for ex in examples],
        # Examples come from one worker in stream order: the last one carries that worker's
        # latest cumulative skip counts and resume position.
        skipped=dict(last.get("skipped") or {}),
        position=last.get("position"),
    )


def collate_examples(
    examples: Sequence[Example],
    pad_id: int,
    max_num_tiles: int,
    image_token_id: int = LLAMA3_IMAGE_TOKEN_ID,
) -> Batch:
    """Pad a list of examples into a :class:`Batch` (shapes in :mod:`.batch`).

    Rows may hold any number of images (0..many) with 1..``max_num_tiles`` tiles each.
    ``image_token_id`` must be the tokenizer's (``tokenizer.image_token_id``; the default is
    Llama 3's): each row's count of it must equal its number of images, else ``ValueError``
    naming the example -- datasets skip such samples earlier, so this signals a bug.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    if pad_id < 0:
        raise ValueError(f"pad_id must be a valid token id, got {pad_id}")
    _check_rows(examples, "tokens", "labels", image_token_id)
    return _lm_batch(examples, "tokens", "labels", pad_id, _image_tensors(examples, max_num_tiles))


def collate_preferences(
    examples: Sequence[Example],
    pad_id: int,
    max_num_tiles: int,
    image_token_id: int = LLAMA3_IMAGE_TOKEN_ID,
) -> PreferenceBatch:
    """Pad DPO examples into a :class:`PreferenceBatch` (one shared images tensor)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    if pad_id < 0:
        raise ValueError(f"pad_id must be a valid token id, got {pad_id}")
    _check_rows(examples, "chosen_tokens", "chosen_labels", image_token_id)
    _check_rows(examples, "rejected_tokens", "rejected_labels", image_token_id)
    image_parts = _image_tensors(examples, max_num_tiles)
    return PreferenceBatch(
        chosen=_lm_batch(examples, "chosen_tokens", "chosen_labels", pad_id, image_parts),
        rejected=_lm_batch(examples, "rejected_tokens", "rejected_labels", pad_id, image_parts),
    )


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that reports every batch it hands out back to its dataset.

    Datasets from :mod:`llama_vision.data.datasets` run inside worker processes, so the
    main process only learns their progress from the batches: ``dataset.observe(batch)``
    records each worker's position and skip counts, which ``state_dict()`` returns. At the
    natural end of a (single-epoch) pass the dataset moves on to the next epoch, so
    iterating the loader again reads the next epoch.
    """

    def __iter__(self) -> Iterator[Any]:
        dataset = self.dataset
        observe = getattr(dataset, "observe", None)
        for batch in super().__iter__():
            if observe is not None:
                observe(batch)
            yield batch
        if hasattr(dataset, "end_of_pass"):
            dataset.end_of_pass()

    def state_dict(self) -> dict[str, Any]:
        """The dataset's position (see ``ExampleDataset.state_dict``)."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; call before iterating."""
        self.dataset.load_state_dict(state)

    @property
    def skipped(self) -> dict[str, int]:
        """Skip counts per reason summed over all workers (``skipped_samples`` metrics)."""
        return self.dataset.skipped()


def _whole_batch(batch: Any) -> Any:
    """The collate function of a dataset that yields whole batches (``batch_size=None``)."""
    return batch


def build_dataloader(
    dataset: torch.utils.data.IterableDataset,
    batch_size: int | None,
    num_workers: int = 0,
    collate: Callable[[list[Example]], Any] | None = None,
    *,
    pin_memory: bool = False,
    drop_last: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: Any = None,
) -> ResumableDataLoader:
    """A :class:`ResumableDataLoader` over ``dataset``.

    ``collate`` defaults to ``dataset.collate_fn()`` (right pad id, tile count, image token id
    and batch type for the dataset). Batches are built inside the workers (each batch comes
    from one worker, so it carries that worker's position and skip counts).

    ``batch_size=None``: the dataset yields whole batches itself
    (:class:`~.batching.MicroBatchDataset`: packing, token budgets), handed on as they are.

    Workers are deliberately not persistent: a persistent worker keeps its own copy of the
    dataset, so ``set_epoch``/``load_state_dict`` in the main process would not reach it.
    """
    if batch_size is None:
        if collate is not None:
            raise ValueError("batch_size=None: the dataset yields whole batches, so no collate function applies")
        collate = _whole_batch
    elif collate is None:
        collate = dataset.collate_fn()
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["multiprocessing_context"] = multiprocessing_context
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        **kwargs,
    )
