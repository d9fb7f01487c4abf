"""Deterministic, resumable distribution of records over ranks and DataLoader workers.

Every (rank, worker) pair -- a *partition* -- reads its own record stream, and that stream is a
pure function of ``(source, seed, epoch, partition)``:

1. **Shard order.** The source's shards (tar files, JSONL files) are permuted with an RNG seeded
   by ``(seed, epoch)`` -- identical on every rank and worker, different every epoch.
2. **Split.** With ``P = world_size * num_workers`` partitions, partition ``p = rank *
   num_workers + worker`` takes

   * ``split="shard"``: the shards at positions ``j`` of the permuted order with
     ``j % P == p`` (each worker reads only its own files: cheapest I/O, but workers finish
     at different times when shard sizes differ);
   * ``split="record"``: every record whose index ``i`` in the concatenated stream of all
     shards satisfies ``i % P == p`` (perfectly balanced, but every worker reads every file);
   * ``split="auto"`` (default): ``"shard"`` when there are at least ``P`` shards, else
     ``"record"``.

   Either way, every record goes to exactly one partition per epoch.
3. **Shuffle buffer.** Records go through a buffer of ``buffer_size`` records (webdataset
   style). Record split: ONE buffer over the whole epoch, seeded by ``(seed, epoch)``, before
   the split -- so record ``i`` of the epoch's global order is the same whatever the
   number of partitions, and a run resumed at another world size or worker count continues
   that order (:class:`ConsumedRecords`). Shard split: each partition's own buffer, seeded
   by ``(seed, epoch, p)``.

Resuming therefore only needs, per partition, the epoch and the number of records already
taken from that stream: :func:`partition_stream` with ``start=n`` regenerates the stream and
drops its first ``n`` records. Dropped records are read (tar members are streamed past) but
never decoded or tokenized, so resuming costs I/O proportional to the skipped part of the
current epoch only.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Protocol, TypeVar

import torch

T = TypeVar("T")
SplitMode = Literal["auto", "shard", "record"]


class ShardedSource(Protocol):
    """What the sampler needs from a record source (see :mod:`llama_vision.data.sources`)."""

    shards: list[str]

    def iter_shard(self, shard: str) -> Iterator: ...


@dataclass(frozen=True)
class Partition:
    """One consumer of records: DataLoader worker ``worker`` of data-parallel rank ``rank``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size) or not (0 <= self.worker < self.num_workers):
            raise ValueError(f"invalid partition {self}")

    @property
    def index(self) -> int:
        """Global partition index ``rank * num_workers + worker``."""
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        """Total number of partitions ``world_size * num_workers``."""
        return self.world_size * self.num_workers


def make_rng(*parts: object) -> random.Random:
    """An RNG seeded from ``parts``, identical in every process.

    Hashing the repr with SHA-256 (instead of ``hash()``) keeps seeds independent of
    ``PYTHONHASHSEED``, which differs between DataLoader worker processes under spawn.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Indices of the shards in the order they are read in ``epoch`` (same for all ranks)."""
    order = list(range(num_shards))
    if shuffle:
        make_rng("shards", seed, epoch).shuffle(order)
    return order


def resolve_split(split: SplitMode, num_shards: int, partition: Partition) -> Literal["shard", "record"]:
    """The effective split mode (``"auto"`` -> shard-level when there are several
    partitions and every one gets a shard; one partition reads every shard either way,
    in the record split's layout-independent order)."""
    if split == "auto":
        return "shard" if 1 < partition.count <= num_shards else "record"
    if split not in ("shard", "record"):
        raise ValueError(f"split must be 'auto', 'shard' or 'record', got {split!r}")
    return split


def shuffle_buffer(items: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """Approximate shuffle with a bounded buffer (the webdataset algorithm).

    The buffer fills up to ``buffer_size`` items; then every incoming item replaces a random
    buffered one, which is emitted. Memory stays at ``buffer_size`` items. ``buffer_size <= 1``
    passes items through unchanged.
    """
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        out, buffer[j] = buffer[j], item
        yield out
    rng.shuffle(buffer)
    yield from buffer


def record_owner(i: int, block: int, world_size: int, num_workers: int) -> int:
    """Record split: the partition index (rank * num_workers + worker) that reads record
    ``i`` of the global order. Records go in blocks of ``block`` (the micro-batch size):
    block m goes to rank ``m % world_size`` and, within it, to worker
    ``(m // world_size) % num_workers`` -- the worker the DataLoader asks for that rank's
    (m // world_size)-th batch. So a rank's k-th micro-batch holds the records of block
    ``k * world_size + rank`` whatever its number of workers, and a step's global batch
    (world_size x block records) is the same at every data-parallel degree that keeps it."""
    q = (i // block) % (world_size * num_workers)
    return (q % world_size) * num_workers + q // world_size


class ConsumedRecords:
    """Records of one epoch's global order already consumed by an earlier run of another
    layout: one rule per such run, ``{block, world_size, num_workers, cursors}``, where
    record ``i`` was consumed iff ``i < cursors[record_owner(i, ...)]`` (that run's owner
    partition had read its share up to its cursor; ``None`` = to the end of the epoch).
    Exact whatever the layouts: every record of the epoch is read once over all runs."""

    def __init__(self, rules: list[dict] | None = None):
        self.rules = list(rules or [])

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __contains__(self, i: int) -> bool:
        for rule in self.rules:
            cursor = rule["cursors"][record_owner(i, rule["block"], rule["world_size"], rule["num_workers"])]
            if cursor is None or i < cursor:
                return True
        return False


def global_order(source: ShardedSource, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, buffer_size: int = 1000) -> Iterator:
    """Every record of ``epoch`` in one order that depends on no layout (record split):
    the permuted shards concatenated, through ONE shuffle buffer seeded by (seed, epoch)."""
    order = shard_order(len(source.shards), seed, epoch, shuffle)
    records = itertools.chain.from_iterable(source.iter_shard(source.shards[j]) for j in order)
    # Seeded as a single partition's buffer always was: one process reads what it read before.
    return shuffle_buffer(records, buffer_size, make_rng("buffer", seed, epoch, 0)) if shuffle else records


def partition_stream(
    source: ShardedSource,
    partition: Partition,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    buffer_size: int = 1000,
    split: SplitMode = "auto",
    start: int = 0,
    consumed: ConsumedRecords | None = None,
    with_index: bool = False,
    block: int = 1,
) -> Iterator:
    """The records partition ``partition`` reads in ``epoch``, from position ``start`` on.

    Record split: the partition takes its blocks of ``block`` records (see
    :func:`record_owner`) of the layout-independent :func:`global_order`, minus those in
    ``consumed``. Shard
    split: the partition reads its own shards through its own shuffle buffer (cheapest I/O;
    the order then depends on the number of partitions, so a run can only resume at the
    same layout). ``with_index``: yield ``(i, record)``, ``i`` the record's index in the
    global order (record split; None under shard split).

    Deterministic in all arguments; ``partition_stream(..., start=n)`` equals
    ``itertools.islice(partition_stream(..., start=0), n, None)``.
    ``shuffle=False`` keeps the shard order and disables the buffer.
    """
    mode = resolve_split(split, len(source.shards), partition)
    if mode == "shard":
        if consumed:
            raise ValueError("records consumed by a run of another layout can only be skipped under record split")
        order = shard_order(len(source.shards), seed, epoch, shuffle)
        records = itertools.chain.from_iterable(source.iter_shard(source.shards[j]) for j in order[partition.index :: partition.count])
        if shuffle:
            records = shuffle_buffer(records, buffer_size, make_rng("buffer", seed, epoch, partition.index))
        indexed = ((None, r) for r in records)
    else:
        p, w, nw = partition.index, partition.world_size, partition.num_workers
        everything = enumerate(global_order(source, seed=seed, epoch=epoch, shuffle=shuffle, buffer_size=buffer_size))
        indexed = ((i, r) for i, r in everything if record_owner(i, block, w, nw) == p and not (consumed and i in consumed))
    out = itertools.islice(indexed, start, None)
    return out if with_index else (r for _, r in out)


def current_partition(rank: int | None = None, world_size: int | None = None, rotation: int = 0) -> Partition:
    """The partition of the calling process.

    ``rank``/``world_size`` default to ``torch.distributed`` when it is initialised (else 0/1);
    the worker comes from ``torch.utils.data.get_worker_info()`` (worker 0 of 1 in the main
    process). ``rotation`` renames DataLoader worker ``w`` to logical worker
    ``(w + rotation) % num_workers``: the DataLoader always asks physical worker 0 first, so a
    resumed run rotates names to make the worker that was due next in the interrupted run
    speak first, reproducing the interrupted batch order exactly.
    """
    if world_size is None or rank is None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return Partition(rank, world_size, (worker + rotation) % num_workers, num_workers)
