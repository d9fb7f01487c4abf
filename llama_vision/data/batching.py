"""Micro-batches of a varying number of examples, with an exact resume position:
token-budget batching (``data.max_tokens_per_batch``) and packing (``data.packing``).

The DataLoader's own batching takes a fixed ``batch_size`` of examples. Here the dataset
forms whole micro-batches itself (:class:`MicroBatchDataset`, loaded with
``batch_size=None``): a *batcher* takes examples in stream order until one does not fit,
the micro-batch is collated and handed out, and the example that did not fit starts the
next micro-batch. Every micro-batch is therefore a contiguous run of the example stream,
and its ``position`` is the one of its LAST example -- the example pulled from the stream
but left for the next micro-batch is not in it. A resume from that position re-reads the
stream from the first example not handed out, and the batcher, which only ever looks at
the examples since the last hand-out, rebuilds exactly the same micro-batches: nothing is
lost or duplicated.

Batchers (``add(example) -> bool``, ``flush() -> rows``, truthy when holding examples):

* :class:`TokenBudgetBatcher`: one example per row; takes examples while rows x longest
  row (the padded tokens of the micro-batch) stays within the budget, at least one.
* :class:`~.packing.NextFitPacker`: packed rows of at most ``max_seq_len`` tokens; a
  micro-batch is ``micro_batch_size`` rows, or with a token budget ``budget //
  max_seq_len`` rows (a packed row may fill up to max_seq_len, so that bounds its padded
  tokens by the budget).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from torch.utils.data import IterableDataset

from .collate import Example

Rows = list[list[Example]]


class TokenBudgetBatcher:
    """Unpacked micro-batches under a padded-token budget: rows x longest <= budget.

    An example longer than the budget on its own still forms a micro-batch (alone)."""

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"token budget must be >= 1, got {budget}")
        self.budget = budget
        self.rows: Rows = []
        self._longest = 0

    def add(self, example: Example) -> bool:
        n = len(example["tokens"])
        longest = max(self._longest, n)
        if self.rows and (len(self.rows) + 1) * longest > self.budget:
            return False
        self.rows.append([example])
        self._longest = longest
        return True

    def flush(self) -> Rows:
        rows, self.rows, self._longest = self.rows, [], 0
        return rows

    def __bool__(self) -> bool:
        return bool(self.rows)


class MicroBatchDataset(IterableDataset):
    """Whole micro-batches from an example dataset (``ExampleDataset``): what
    ``build_dataloader(dataset, batch_size=None)`` loads.

    Args:
        dataset: yields examples carrying ``position`` and ``skipped`` (see
            :mod:`.datasets`); its resume state is the state of this dataset.
        make_batcher: builds a fresh batcher (called once per iteration, in the worker).
        collate: rows (lists of examples) -> a batch; its ``position``/``skipped`` must
            be the last example's (:func:`.packing.collate_packed`, or
            :class:`UnpackedRows` around the dataset's own collate function).

    Position bookkeeping (``observe``, ``state_dict``, ``load_state_dict``, ``skipped``,
    ``set_epoch``, ``end_of_pass``) is the wrapped dataset's: each micro-batch reports its
    last example's position, exactly as a fixed-size batch does.
    """

    def __init__(self, dataset: Any, make_batcher: Callable[[], Any], collate: Callable[[Rows], Any]):
        super().__init__()
        self.dataset = dataset
        self.make_batcher = make_batcher
        self.collate = collate

    def __iter__(self) -> Iterator[Any]:
        batcher = self.make_batcher()
        for example in self.dataset:
            if not batcher.add(example):
                # `example` stays here, outside the batch handed out, and opens the next one.
                yield self.collate(batcher.flush())
                if not batcher.add(example):
                    raise RuntimeError(f"an empty batcher refused example {example.get('key')!r}")
        if batcher:  # a single-epoch pass ended: the partial micro-batch
            yield self.collate(batcher.flush())

    # The wrapped dataset keeps the position: delegate.
    def observe(self, batch: Any) -> None:
        self.dataset.observe(batch)

    def end_of_pass(self) -> None:
        self.dataset.end_of_pass()

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def skipped(self) -> dict[str, int]:
        return self.dataset.skipped()

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)


class UnpackedRows:
    """Adapts an example collate function (list of examples -> batch) to rows of one
    example each (a picklable callable, for DataLoader workers)."""

    def __init__(self, collate: Callable[[list[Example]], Any]):
        self.collate = collate

    def __call__(self, rows: Sequence[Sequence[Example]]) -> Any:
        if any(len(row) != 1 for row in rows):
            raise ValueError(f"unpacked micro-batch rows must hold one example each, got {[len(r) for r in rows]}")
        return self.collate([row[0] for row in rows])
