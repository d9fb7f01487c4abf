"""Training datasets: records -> tokenized examples with tiled images.

Three ``IterableDataset`` s share one engine (:class:`ExampleDataset`):

* :class:`CaptionDataset` (pretraining): ``[<|image|>] * n + [<|begin_of_text|>] + caption +
  [<|end_of_text|>]`` -- the image tokens before BOS as in Meta's and transformers' captioning
  prompts. Loss on the caption tokens and the final EOS only. A record without an image is
  a text-only sample (``[bos] + text + [eos]``). A record's ``media_text`` goes where the
  media's tokens go, after any image tokens and before BOS, and is never a target: a
  textual stand-in for the media, with which a text-only stage teaches the decoder to read
  what sits in the media slot (the CPU demo's scene lines, docs/llava.md).
* :class:`ConversationDataset` (SFT): :class:`~llama_vision.tokenizer.ChatFormat` dialogs;
  loss exactly on ChatFormat's assistant mask (assistant content + its ``<|eot_id|>``).
* :class:`DPODataset`: a prompt plus ``chosen``/``rejected`` replies; each side is the dialog
  ``prompt + [assistant reply]`` with loss on the final reply only.

Examples (dicts, see :mod:`.collate`) hold ``labels`` already shifted for next-token
prediction: ``labels[i] = tokens[i + 1]`` when token ``i + 1`` is a target, else ``-100``.

**Truncation.** Sequences longer than ``max_seq_len`` keep their first ``max_seq_len`` tokens.
Images whose ``<|image|>`` token falls in the cut part are dropped with it (text only attends
to images whose token precedes it, so the kept text loses nothing); dropped images are not
even decoded. A sample left with no labelled token is skipped as ``empty_labels``.

**Bad data.** Nothing in a sample can crash iteration and nothing is dropped silently: a
sample that cannot be used is skipped and counted per reason in a :class:`SkipCounter` (see
``SKIP_REASONS``). Each example carries its worker's cumulative counts, collation copies them
to ``batch.skipped``, and :meth:`ExampleDataset.observe` (called by
``collate.ResumableDataLoader``) sums them over workers for the ``skipped_samples`` metric.
Skips that happen after a worker's last example of a single-epoch pass have no batch to
travel in and are not reported (in ``loop=True`` mode they arrive with the next epoch).

**Position.** Records reach each (rank, worker) partition in a deterministic order
(:mod:`.sampler`); a partition's position is ``(epoch, records consumed)``, skipped records
included. ``state_dict()``/``load_state_dict()`` save and restore every partition's position,
so a resumed run continues with exactly the next sample, in the same batch order. At
another world size or ``num_workers`` (record split: the records of an epoch have one global
order, :mod:`.sampler`), :func:`resume_position` turns every old partition's position into
the set of records already consumed, and the new partitions share the rest of the epoch.
"""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from llama_vision.tokenizer import ChatFormat

from .batch import IGNORE_INDEX
from .collate import collate_examples, collate_preferences
from .image import ImageLoadError, load_image
from .sampler import ConsumedRecords, SplitMode, current_partition, partition_stream, record_owner
from .sources import BAD_JSON, BAD_RECORD, BAD_SHARD, BAD_TEXT, MISSING_SHARD, Record

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<|image|>"

# Skip reasons (sources contribute bad_json, bad_record, bad_text, bad_shard, missing_shard).
MISSING_IMAGE = "missing_image"  # an image path that does not exist
BAD_IMAGE = "bad_image"  # corrupt / truncated / undecodable image
EMPTY_TEXT = "empty_text"  # empty caption or empty DPO reply
IMAGE_COUNT_MISMATCH = "image_count_mismatch"  # <|image|> placeholders != images given
EMPTY_LABELS = "empty_labels"  # no loss-bearing token (e.g. no assistant turn, or truncated away)
NO_IMAGE = "no_image"  # CaptionDataset(allow_text_only=False) and the sample has no image
IDENTICAL_PAIR = "identical_pair"  # DPO chosen == rejected: no preference signal
SKIP_REASONS = (
    BAD_JSON, BAD_RECORD, BAD_TEXT, BAD_SHARD, MISSING_SHARD, MISSING_IMAGE, BAD_IMAGE,
    EMPTY_TEXT, IMAGE_COUNT_MISMATCH, EMPTY_LABELS, NO_IMAGE, IDENTICAL_PAIR,
)  # fmt: skip

Example = dict[str, Any]


class SkipSample(Exception):
    """Raised while building an example to skip the sample for ``reason``."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SkippedSample:
    reason: str
    key: str
    message: str


class SkipCounter:
    """Counts skipped samples per reason and remembers the last few for the log.

    Logging is bounded: a reason is logged (WARNING) at its 1st, 10th, 100th, ... occurrence.
    """

    def __init__(self, counts: dict[str, int] | None = None, keep_last: int = 8):
        self.counts: dict[str, int] = dict(counts or {})
        self.recent: deque[SkippedSample] = deque(maxlen=keep_last)

    def add(self, reason: str, key: str, message: str = "") -> None:
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        self.recent.append(SkippedSample(reason, key, message))
        if n == 10 ** (len(str(n)) - 1):
            logger.warning("skipped sample %s (%s, %d so far): %s", key, reason, n, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        """A copy of the counts (safe to ship in a batch)."""
        return dict(self.counts)

    def __repr__(self) -> str:
        return f"SkipCounter({self.counts})"


@dataclass
class WorkerPosition:
    """Where one partition (DataLoader worker of this rank) stands."""

    epoch: int
    consumed: int = 0  # records taken from the partition's stream in `epoch`, skips included
    skipped: dict[str, int] = field(default_factory=dict)  # cumulative over the run
    cursor: int | None = None  # record split: 1 + global-order index of the last record taken


def shifted_labels(tokens: Sequence[int], target_mask: Sequence[bool]) -> list[int]:
    """Next-token labels: ``labels[i] = tokens[i + 1]`` if ``target_mask[i + 1]`` else -100.

    ``target_mask[j]`` says whether token ``j`` is to be predicted (ChatFormat's assistant mask
    has exactly this meaning); the last position never has a target.
    """
    labels = [tokens[i + 1] if target_mask[i + 1] else IGNORE_INDEX for i in range(len(tokens) - 1)]
    return (labels + [IGNORE_INDEX]) if tokens else []


def split_image_placeholders(content: Any) -> list[Any]:
    """Message content -> ChatFormat's list form, turning every ``<|image|>`` in text into
    ``{"type": "image"}`` (so both the string form and the list form are accepted)."""
    items = [content] if isinstance(content, str) else content
    if not isinstance(items, list):
        raise SkipSample(BAD_RECORD, f"message content must be a str or a list, got {type(content).__name__}")
    parts: list[Any] = []
    for item in items:
        if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            text = item["text"]
        elif isinstance(item, str):
            text = item
        elif isinstance(item, dict) and item.get("type") == "image":
            parts.append({"type": "image"})
            continue
        else:
            raise SkipSample(BAD_RECORD, f"unsupported content item {item!r}")
        pieces = text.split(IMAGE_PLACEHOLDER)
        for k, piece in enumerate(pieces):
            if k > 0:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
    return parts


def normalize_messages(messages: Any) -> tuple[list[dict[str, Any]], int]:
    """Validated copies of ``messages`` in list-content form, and their number of images."""
    if not isinstance(messages, list) or not messages:
        raise SkipSample(BAD_RECORD, "messages must be a non-empty list")
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise SkipSample(BAD_RECORD, f"malformed message {message!r:.200}")
        out.append({**message, "content": split_image_placeholders(message["content"])})
    n_images = sum(1 for m in out for part in m["content"] if part.get("type") == "image")
    return out, n_images


def expand_images(tokens: list[int], target_mask: list[bool], counts: Sequence[int], image_token_id: int,
                  max_seq_len: int) -> tuple[list[int], list[bool], int]:
    """Each image placeholder of `tokens` repeated counts[k] times (k-th image; targets
    off), cut to `max_seq_len` -- before the run of the first image that would be cut
    (an image's tokens are all or none). -> (tokens, target_mask, images kept)."""
    out, mask, k, kept = [], [], 0, 0
    for t, m in zip(tokens, target_mask):
        if t == image_token_id:
            if len(out) + counts[k] > max_seq_len:
                break
            out += [t] * counts[k]
            mask += [False] * counts[k]
            k += 1
            kept = k
        else:
            if len(out) >= max_seq_len:
                break
            out.append(t)
            mask.append(m)
    return out, mask, kept


def truncate(tokens: list[int], target_mask: list[bool], max_seq_len: int, image_token_id: int):
    """Cut to ``max_seq_len``; returns ``(tokens, labels, n_images_kept)`` (see module doc)."""
    tokens, target_mask = tokens[:max_seq_len], target_mask[:max_seq_len]
    labels = shifted_labels(tokens, target_mask)
    if all(label == IGNORE_INDEX for label in labels):
        raise SkipSample(EMPTY_LABELS, f"no labelled token within {max_seq_len} tokens")
    return tokens, labels, sum(1 for t in tokens if t == image_token_id)


class ExampleDataset(IterableDataset):
    """Shared engine: sharding, shuffling, resume, skip accounting, image loading.

    Args:
        source: a record source from :mod:`.sources`.
        tokenizer: a ``llama_vision.tokenizer`` tokenizer.
        image_processor: ``ImageProcessor(tile_size, max_num_tiles)``.
        max_seq_len: longest example (tokens, image tokens included).
        seed: seeds shard order and shuffle buffers (together with the epoch).
        shuffle: shuffle shard order per epoch and use a shuffle buffer of ``shuffle_buffer``
            records; ``False`` reads records in source order. Records inside one shard (a
            tar, or a whole JSONL file) are only mixed by the buffer: a file sorted by
            source or kind stays nearly sorted, and a run shorter than an epoch may never
            reach its tail -- shuffle such files once when writing them (the CPU demo's
            stage-0 corpus had exactly this bug).
        split: ``"auto"``, ``"shard"`` or ``"record"`` (see :mod:`.sampler`).
        rank, world_size: data-parallel position; default: ``torch.distributed`` if
            initialised, else 0 of 1.
        loop: run forever, each partition moving to the next epoch when its stream ends (for
            step-based training, and required with DDP: ranks would otherwise finish epochs
            at different steps). ``False``: one epoch per pass (``set_epoch`` to change it).
        epoch: first epoch.
        block_size: record split hands records to partitions in blocks of this many (the
            micro-batch size: :func:`.sampler.record_owner`), so batches do not depend on
            the number of DataLoader workers.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        max_seq_len: int = 2048,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        split: SplitMode = "auto",
        rank: int | None = None,
        world_size: int | None = None,
        loop: bool = False,
        epoch: int = 0,
        block_size: int = 1,
    ):
        super().__init__()
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.source = source
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.loop = loop
        self.epoch = epoch
        self.block_size = block_size
        self.image_token_id: int = tokenizer.image_token_id
        # Live counter of the process iterating (the worker's own copy of the dataset).
        self.skip_counter = SkipCounter()
        # Main-process view, fed by observe(): partition position per logical worker id.
        self._positions: dict[int, WorkerPosition] = {}
        self._num_workers: int | None = None
        self._next_worker = 0
        # Epoch -> records of its global order consumed by an earlier run of another layout
        # (sampler.ConsumedRecords rules; see resume_position).
        self._consumed: dict[int, list[dict]] = {}

    # ------------------------------------------------------------------ examples
    @abstractmethod
    def build_example(self, record: Record) -> Example:
        """Record -> example; raise :class:`SkipSample` to skip it."""

    def collate_fn(self) -> Callable[[list[Example]], Any]:
        """The collate function for this dataset's examples."""
        return partial(
            collate_examples,
            pad_id=self.tokenizer.pad_id,
            max_num_tiles=self.image_processor.max_num_tiles,
            image_token_id=self.image_token_id,
        )

    def load_images(self, refs: Sequence[Any]) -> tuple[list[Any], list[tuple[int, int]]]:
        """Decode and tile images given as paths or encoded bytes.

        Returns ``(tiles, aspect_ratios)``: one float32 (the processor's ``output="uint8"``:
        uint8) ``[n_tiles, 3, S, S]`` and one ``(tiles_h, tiles_w)`` per image. Raises :class:`SkipSample` (``missing_image`` /
        ``bad_image``) naming the file.
        """
        tiles, ratios = [], []
        for ref in refs:
            if isinstance(ref, (str, os.PathLike)) and not os.path.isfile(ref):
                raise SkipSample(MISSING_IMAGE, f"image file {os.fspath(ref)!r} does not exist")
            try:
                image = load_image(ref)
                t, ratio = self.image_processor(image)
            except ImageLoadError as exc:
                raise SkipSample(BAD_IMAGE, str(exc)) from None
            except (ValueError, OSError) as exc:  # processor refusing a degenerate image
                name = repr(os.fspath(ref)) if isinstance(ref, (str, os.PathLike)) else "<bytes>"
                raise SkipSample(BAD_IMAGE, f"cannot tile image {name}: {exc}") from None
            tiles.append(t)
            ratios.append(tuple(ratio))
        return tiles, ratios

    def _lm_example(
        self, key: str, tokens: list[int], target_mask: list[bool], image_refs: Sequence[Any]
    ) -> Example:
        if getattr(self.image_processor, "tokens_per_item", None) is not None:
            return self._expanded_example(key, tokens, target_mask, image_refs)
        tokens, labels, n_kept = truncate(tokens, target_mask, self.max_seq_len, self.image_token_id)
        images, ratios = self.load_images(image_refs[:n_kept])
        return {"key": key, "tokens": tokens, "labels": labels, "images": images, "aspect_ratios": ratios}

    def _expanded_example(self, key: str, tokens: list[int], target_mask: list[bool], image_refs: Sequence[Any]) -> Example:
        """A projector-modality example (LLaVA): every image placeholder expanded to as many
        as the image has tokens (its size decides with AnyRes), then cut to max_seq_len
        before the first image that no longer fits whole."""
        n_images = sum(1 for t in tokens if t == self.image_token_id)
        images, sizes = self.load_images(image_refs[:n_images])
        counts = [self.image_processor.tokens_per_item(size) for size in sizes]
        tokens, target_mask, n_kept = expand_images(tokens, target_mask, counts, self.image_token_id, self.max_seq_len)
        labels = shifted_labels(tokens, target_mask)
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample(EMPTY_LABELS, f"no labelled token within {self.max_seq_len} tokens")
        return {"key": key, "tokens": tokens, "labels": labels, "images": images[:n_kept], "aspect_ratios": sizes[:n_kept],
                "image_token_counts": counts[:n_kept]}

    def _example_or_skip(self, record: Record, counter: SkipCounter) -> Example | None:
        if record.error is not None:
            counter.add(record.error, record.key, record.message)
            return None
        try:
            return self.build_example(record)
        except SkipSample as skip:
            counter.add(skip.reason, record.key, skip.message)
        except (ValueError, TypeError, KeyError) as exc:
            # Structurally odd JSON reaching the chat format or tokenizer: a data problem.
            counter.add(BAD_RECORD, record.key, f"{type(exc).__name__}: {exc}")
        return None

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Example]:
        partition = current_partition(self.rank, self.world_size, rotation=self._next_worker)
        resuming = any(p.consumed for p in self._positions.values())
        if resuming and self._num_workers != partition.num_workers:
            raise ValueError(
                f"the data position was saved with {self._num_workers} DataLoader workers per rank; "
                f"resuming with {partition.num_workers} would change which records each worker reads"
            )
        pos = self._positions.get(partition.worker) or WorkerPosition(self.epoch)
        epoch, start = pos.epoch, pos.consumed
        # Cumulative counts: from the saved/observed position, or -- iterating in the main
        # process -- its own counter from an earlier pass, which also holds skips made after
        # that pass's last batch. A worker must not inherit the main process's counter.
        live = self.skip_counter.counts if get_worker_info() is None else {}
        counter = self.skip_counter = SkipCounter(
            {r: max(pos.skipped.get(r, 0), live.get(r, 0)) for r in {*pos.skipped, *live}}
        )
        while True:
            produced = 0
            stream = partition_stream(
                self.source,
                partition,
                seed=self.seed,
                epoch=epoch,
                shuffle=self.shuffle,
                buffer_size=self.shuffle_buffer,
                split=self.split,
                start=start,
                consumed=ConsumedRecords(self._consumed.get(epoch)),
                with_index=True,
                block=self.block_size,
            )
            for consumed, (index, record) in enumerate(stream, start + 1):
                example = self._example_or_skip(record, counter)
                if example is None:
                    continue
                produced += 1
                example["position"] = {
                    "rank": partition.rank,
                    "worker": partition.worker,
                    "num_workers": partition.num_workers,
                    "epoch": epoch,
                    "consumed": consumed,
                    "cursor": None if index is None else index + 1,
                }
                example["skipped"] = counter.snapshot()
                yield example
            if not self.loop:
                return
            if produced == 0 and start == 0 and epoch not in self._consumed:
                # Looping over an epoch with nothing usable would spin forever.
                raise RuntimeError(
                    f"rank {partition.rank} worker {partition.worker}: no usable example in epoch {epoch} "
                    f"(skips so far: {counter.counts}); the data has fewer good records than "
                    f"ranks x workers, or all of them are bad"
                )
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ position, metrics
    def observe(self, batch: Any) -> None:
        """Record a batch handed to the training loop (main process): its worker's position
        and cumulative skip counts. ``ResumableDataLoader`` calls this for every batch."""
        pos = batch.position
        if pos is None:
            return
        self._positions[pos["worker"]] = WorkerPosition(pos["epoch"], pos["consumed"], dict(batch.skipped), pos.get("cursor"))
        self._num_workers = pos["num_workers"]
        # The DataLoader asks workers round-robin; the next batch is due from the next one.
        self._next_worker = (pos["worker"] + 1) % pos["num_workers"]

    def end_of_pass(self) -> None:
        """Called when a full single-epoch pass has been iterated: go to the next epoch."""
        if not self.loop:
            self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning on the next pass (skip totals are kept)."""
        self.epoch = epoch
        for pos in self._positions.values():
            pos.epoch, pos.consumed = epoch, 0
        self._next_worker = 0

    def skipped(self) -> dict[str, int]:
        """Skip counts per reason: the workers' latest reports summed.

        Without DataLoader workers this process iterates itself, and its live counter (which
        also holds skips after the last batch) can only be ahead of the reports: take the
        larger per reason. With workers the live counter of this copy stays empty.
        """
        totals: dict[str, int] = {}
        for pos in self._positions.values():
            for reason, n in pos.skipped.items():
                totals[reason] = totals.get(reason, 0) + n
        for reason, n in self.skip_counter.counts.items():
            totals[reason] = max(totals.get(reason, 0), n)
        return totals

    def _resolved_rank(self) -> tuple[int, int]:
        partition = current_partition(self.rank, self.world_size)
        return partition.rank, partition.world_size

    def state_dict(self) -> dict[str, Any]:
        """The data position: plain Python values (JSON/torch.save friendly)."""
        rank, world_size = self._resolved_rank()
        return {
            "seed": self.seed,
            "rank": rank,
            "world_size": world_size,
            "epoch": self.epoch,
            "num_workers": self._num_workers,
            "next_worker": self._next_worker,
            "workers": [
                {"worker": w, "epoch": p.epoch, "consumed": p.consumed, "skipped": dict(p.skipped), "cursor": p.cursor}
                for w, p in sorted(self._positions.items())
            ],
            "block_size": self.block_size,
            "consumed_by_earlier_layouts": {str(e): rules for e, rules in sorted(self._consumed.items())},
        }

    def resume_state(self, states: list[dict[str, Any]], rank: int, world_size: int, num_workers: int) -> dict[str, Any]:
        """This dataset's position as DP rank `rank` of `world_size` with `num_workers`
        workers, from the states every DP rank of a run saved (:func:`resume_position`)."""
        return resume_position(states, rank, world_size, num_workers, self.block_size)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (before creating the DataLoader iterator)."""
        rank, world_size = self._resolved_rank()
        if (state["seed"], state["rank"], state["world_size"]) != (self.seed, rank, world_size):
            raise ValueError(
                f"data state is for seed {state['seed']}, rank {state['rank']} of {state['world_size']}; "
                f"this dataset has seed {self.seed}, rank {rank} of {world_size}"
            )
        self.epoch = state["epoch"]
        self._num_workers = state["num_workers"]
        self._next_worker = state["next_worker"]
        self._positions = {
            w["worker"]: WorkerPosition(w["epoch"], w["consumed"], dict(w["skipped"]), w.get("cursor")) for w in state["workers"]
        }
        self._consumed = {int(e): rules for e, rules in state.get("consumed_by_earlier_layouts", {}).items()}


class CaptionDataset(ExampleDataset):
    """Image-caption pretraining examples (see module docstring).

    Extra args: ``allow_text_only`` (default True): records without an image become
    text-only examples; False skips them as ``no_image``.
    """

    def __init__(
        self, source: Any, tokenizer: Any, image_processor: Any, *, allow_text_only: bool = True, **kwargs: Any
    ):
        super().__init__(source, tokenizer, image_processor, **kwargs)
        self.allow_text_only = allow_text_only

    def build_example(self, record: Record) -> Example:
        text = record.fields.get("text")
        if not isinstance(text, str) or not text.strip():
            raise SkipSample(EMPTY_TEXT, "empty caption")
        images = record.fields.get("images") or []
        if not images and not self.allow_text_only:
            raise SkipSample(NO_IMAGE, "sample has no image")
        tok = self.tokenizer
        # Captions from .txt files usually end in a newline: strip surrounding whitespace.
        caption = tok.encode(text.strip(), bos=False, eos=False)
        media_text = record.fields.get("media_text")
        stand_in = tok.encode(media_text.strip(), bos=False, eos=False) if media_text else []
        prefix = [self.image_token_id] * len(images) + stand_in + [tok.bos_id]
        tokens = prefix + caption + [tok.eos_id]
        target_mask = [False] * len(prefix) + [True] * (len(caption) + 1)
        return self._lm_example(record.key, tokens, target_mask, images)


class _ChatDataset(ExampleDataset):
    """Datasets built on the chat format."""

    def __init__(self, source: Any, tokenizer: Any, image_processor: Any, **kwargs: Any):
        super().__init__(source, tokenizer, image_processor, **kwargs)
        self._chat = None

    @property
    def chat(self) -> ChatFormat:
        # Built on first use, i.e. in the worker process, keeping the dataset cheap to copy.
        if self._chat is None:
            self._chat = ChatFormat(self.tokenizer)
        return self._chat

    def _dialog(self, record: Record, messages: Any) -> list[dict[str, Any]]:
        messages, n_placeholders = normalize_messages(messages)
        n_images = len(record.fields.get("images") or [])
        if n_placeholders != n_images:
            raise SkipSample(IMAGE_COUNT_MISMATCH, f"{n_placeholders} image placeholders but {n_images} images")
        return messages

    def _encode(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
        ids, mask = self.chat.encode_dialog_with_assistant_mask(messages)
        n_tokens = sum(1 for t in ids if t == self.image_token_id)
        n_images = sum(1 for m in messages for p in m["content"] if p.get("type") == "image")
        if n_tokens != n_images:  # the chat format must emit one token per image
            raise RuntimeError(f"chat format produced {n_tokens} image tokens for {n_images} images")
        return ids, mask


class ConversationDataset(_ChatDataset):
    """Supervised fine-tuning on dialogs: loss on assistant content and its end token only."""

    def build_example(self, record: Record) -> Example:
        messages = self._dialog(record, record.fields.get("messages"))
        tokens, mask = self._encode(messages)
        return self._lm_example(record.key, tokens, mask, record.fields.get("images") or [])


class DPODataset(_ChatDataset):
    """Preference pairs. Examples: ``key``, ``chosen_tokens``, ``chosen_labels``,
    ``rejected_tokens``, ``rejected_labels``, ``images``, ``aspect_ratios`` (shared)."""

    def collate_fn(self) -> Callable[[list[Example]], Any]:
        return partial(
            collate_preferences,
            pad_id=self.tokenizer.pad_id,
            max_num_tiles=self.image_processor.max_num_tiles,
            image_token_id=self.image_token_id,
        )

    def build_example(self, record: Record) -> Example:
        fields = record.fields
        prompt = fields.get("prompt")
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        messages = self._dialog(record, prompt)
        chosen, rejected = fields.get("chosen"), fields.get("rejected")
        if not all(isinstance(reply, str) and reply.strip() for reply in (chosen, rejected)):
            raise SkipSample(EMPTY_TEXT, "empty chosen or rejected reply")
        if chosen == rejected:
            raise SkipSample(IDENTICAL_PAIR, "chosen and rejected replies are identical")
        prompt_ids = self.chat.encode_dialog(messages)  # ends with the open assistant header
        prompt_len = len(prompt_ids)
        example: Example = {"key": record.key}
        kept = []
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            answer = {"role": "assistant", "content": [{"type": "text", "text": reply}]}
            tokens, mask = self._encode(messages + [answer])
            if tokens[:prompt_len] != prompt_ids:
                raise RuntimeError("chat format: the dialog with a reply does not extend the prompt's ids")
            # Loss on the final reply only, not on assistant turns inside the prompt.
            mask = [False] * prompt_len + mask[prompt_len:]
            tokens, labels, n_kept = truncate(tokens, mask, self.max_seq_len, self.image_token_id)
            example[f"{side}_tokens"], example[f"{side}_labels"] = tokens, labels
            kept.append(n_kept)
        # Images live in the shared prompt; a cut inside the prompt leaves no label (skipped
        # above), so both sides always keep every image.
        example["images"], example["aspect_ratios"] = self.load_images((fields.get("images") or [])[: min(kept)])
        return example


def resume_position(states: list[dict[str, Any]], rank: int, world_size: int, num_workers: int, block_size: int = 1) -> dict[str, Any]:
    """The data position of DP rank `rank` of `world_size` (each with `num_workers`
    DataLoader workers) resuming a run whose DP ranks saved `states` (their
    `ExampleDataset.state_dict()`, in rank order).

    Same layout: that rank's own state (the exact continuation). Another world size or
    worker count: every old partition read its share of each epoch's global order up to
    its cursor, so the records consumed are one rule per old layout
    (`sampler.ConsumedRecords`); the new partitions start at the oldest epoch any old one
    was in and read the rest of it, then the later epochs, skipping consumed records. The
    worker holding this rank's first unread block (of `block_size` records, the new run's)
    speaks first, so a run that keeps the global batch continues with exactly the next
    one. The summed skip counts carry over on rank 0's first worker. Needs record split (a
    position without cursors came from shard split, whose order depends on the layout)."""
    num_workers = max(1, num_workers)  # 0 workers: the main process is the one partition
    old_workers = [s["num_workers"] for s in states]
    if len(states) == world_size and all(n in (None, num_workers) for n in old_workers):
        return states[rank]
    partitions = [(s["rank"], w) for s in states for w in s["workers"]]
    if not partitions:  # saved before any batch was drawn: nothing consumed
        return {**states[0], "rank": rank, "world_size": world_size, "num_workers": None, "next_worker": 0, "workers": []}
    # A worker that has read nothing (yet, or since the last layout change) has no cursor.
    partitions = [(r, {**w, "cursor": 0}) if w["cursor"] is None and not w["consumed"] else (r, w) for r, w in partitions]
    if any(w["cursor"] is None for _, w in partitions) or any(n is None for n in old_workers):
        raise ValueError(
            f"cannot resume the data position of {len(states)} DP ranks x {old_workers[0]} workers at {world_size} x "
            f"{num_workers}: it was read with shard split (each partition reads its own files; set data.split: record "
            "for an order that survives a layout change) or before any batch was drawn"
        )
    epochs = [w["epoch"] for _, w in partitions]
    first, last = min(epochs), max(epochs)
    consumed: dict[str, list] = {}
    for e, rules in states[0].get("consumed_by_earlier_layouts", {}).items():
        if int(e) >= first:
            consumed[str(e)] = list(rules)
    nw = old_workers[0] or 1
    for epoch in range(first, last + 1):
        cursors: list[int | None] = [0] * (len(states) * nw)
        for r, w in partitions:
            cursors[r * nw + w["worker"]] = None if w["epoch"] > epoch else w["cursor"] if w["epoch"] == epoch else 0
        rule = {"block": states[0].get("block_size", 1), "world_size": len(states), "num_workers": nw, "cursors": cursors}
        consumed.setdefault(str(epoch), []).append(rule)
    # The first record of `first` that nobody read and this rank owns: its worker is due.
    done, limit = ConsumedRecords(consumed[str(first)]), max(w["cursor"] for _, w in partitions)
    limit += world_size * num_workers * block_size
    mine = (i for i in range(limit + 1) if i not in done and record_owner(i, block_size, world_size, num_workers) // num_workers == rank)
    next_worker = record_owner(next(mine, 0), block_size, world_size, num_workers) % num_workers
    skipped: dict[str, int] = {}
    for _, w in partitions:
        for reason, n in w["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {
        "seed": states[0]["seed"],
        "rank": rank,
        "world_size": world_size,
        "epoch": first,
        "num_workers": num_workers,
        "next_worker": next_worker,
        "workers": [{"worker": w, "epoch": first, "consumed": 0, "skipped": skipped if (rank, w) == (0, 0) else {},
                     "cursor": None} for w in range(num_workers)],
        "consumed_by_earlier_layouts": consumed,
    }
