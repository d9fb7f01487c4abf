"""Weighted mixtures of datasets (`data.sources`): the paper's resampling of low-frequency
data -- a small source with a large weight is read again and again, a large one with a
small weight only partly per "epoch" of the mixture.

Each partition (DP rank x DataLoader worker) draws the source of its k-th example from an
RNG seeded by (seed, partition) -- P(source i) = weight_i / sum(weights) -- and takes that
source's next example. Every source is an ordinary `ExampleDataset` (looping forever over
its own epochs, with its own shuffling and skip accounting), so the mixture's position is
the number of draws per partition plus each source's own position: a resumed run
replays the draws and continues every source exactly. At another layout each source's
position translates as usual (`datasets.resume_position`) and the new partitions start
fresh draw streams: the same weights, every source's records still read once per its
epoch.
"""
from __future__ import annotations

import bisect
import itertools
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

from torch.utils.data import IterableDataset

from .datasets import ExampleDataset, resume_position
from .sampler import current_partition, make_rng

__all__ = ["MixtureDataset"]


class MixtureDataset(IterableDataset):
    """Examples of `datasets` mixed by `weights` (see the module docstring).

    datasets: ExampleDatasets built with loop=True, the same rank / world size, and
        examples that collate together (all LM kinds; see `collate` for video sources).
    weights: one positive number per dataset (normalised here).
    collate: the collate function of the mixture's batches (default: the first dataset's;
        a projector video source's takes image and text rows beside its clips)."""

    def __init__(self, datasets: Sequence[ExampleDataset], weights: Sequence[float], *, names: Sequence[str] | None = None,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, collate: Callable | None = None):
        super().__init__()
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"data.sources: {len(datasets)} datasets but {len(weights)} weights")
        bad = [w for w in weights if not w > 0]
        if bad:
            raise ValueError(f"data.sources: every weight must be > 0, got {list(weights)}")
        not_looping = [i for i, d in enumerate(datasets) if not d.loop]
        if not_looping:
            raise ValueError(f"data.sources {not_looping}: a mixed source must loop (it is drawn from forever)")
        self.datasets = list(datasets)
        self.names = list(names or [f"source{i}" for i in range(len(datasets))])
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self._cumulative = list(itertools.accumulate(self.weights))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._collate = collate
        self._taken: dict[int, int] = {}  # logical worker -> draws handed out
        self._num_workers: int | None = None
        self._next_worker = 0

    def collate_fn(self):
        return self._collate if self._collate is not None else self.datasets[0].collate_fn()

    # What micro-batch builders (packing, token budgets) read of an example dataset: the
    # sources share them (one tokenizer, processor and sequence length).
    @property
    def max_seq_len(self) -> int:
        return self.datasets[0].max_seq_len

    @property
    def tokenizer(self):
        return self.datasets[0].tokenizer

    @property
    def image_processor(self):
        return self.datasets[0].image_processor

    @property
    def image_token_id(self) -> int:
        return self.datasets[0].image_token_id

    def pick(self, u: float) -> int:
        """The source of a draw u in [0, 1)."""
        return min(bisect.bisect_right(self._cumulative, u), len(self.datasets) - 1)

    # --- iteration (in the worker) ------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        for d in self.datasets:  # every source names the workers as the mixture does
            d._next_worker = self._next_worker
        partition = current_partition(self.rank, self.world_size, rotation=self._next_worker)
        taken = self._taken.get(partition.worker, 0)
        rng = make_rng("mixture", self.seed, partition.index)
        for _ in range(taken):
            rng.random()
        streams = [iter(d) for d in self.datasets]
        latest: dict[int, tuple[dict, dict]] = {}  # source -> its latest (position, skipped)
        for k in itertools.count(taken + 1):
            source = self.pick(rng.random())
            example = next(streams[source])
            latest[source] = (example["position"], example["skipped"])
            skipped: dict[str, int] = {}
            for _, counts in latest.values():
                for reason, n in counts.items():
                    skipped[reason] = skipped.get(reason, 0) + n
            example["position"] = {
                "rank": partition.rank, "worker": partition.worker, "num_workers": partition.num_workers,
                "taken": k, "sources": {i: pos for i, (pos, _) in latest.items()},
                "source_skipped": {i: counts for i, (_, counts) in latest.items()},
            }
            example["skipped"] = skipped
            example["source"] = source
            yield example

    # --- position (main process) ---------------------------------------------------------
    def observe(self, batch: Any) -> None:
        pos = batch.position
        if pos is None:
            return
        for i, source_pos in pos["sources"].items():
            self.datasets[int(i)].observe(SimpleNamespace(position=source_pos, skipped=pos["source_skipped"][i]))
        self._taken[pos["worker"]] = pos["taken"]
        self._num_workers = pos["num_workers"]
        self._next_worker = (pos["worker"] + 1) % pos["num_workers"]

    def skipped(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for d in self.datasets:
            for reason, n in d.skipped().items():
                totals[reason] = totals.get(reason, 0) + n
        return totals

    def state_dict(self) -> dict[str, Any]:
        partition = current_partition(self.rank, self.world_size)
        return {
            "kind": "mixture", "seed": self.seed, "rank": partition.rank, "world_size": partition.world_size,
            "num_workers": self._num_workers, "next_worker": self._next_worker, "names": self.names,
            "taken": {str(w): n for w, n in sorted(self._taken.items())},
            "sources": [d.state_dict() for d in self.datasets],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("names") != self.names:
            raise ValueError(f"data position is for the sources {state.get('names')}, this mixture has {self.names}")
        for d, s in zip(self.datasets, state["sources"]):
            d.load_state_dict(s)
        self._taken = {int(w): n for w, n in state["taken"].items()}
        self._num_workers, self._next_worker = state["num_workers"], state["next_worker"]

    def resume_state(self, states: list[dict[str, Any]], rank: int, world_size: int, num_workers: int) -> dict[str, Any]:
        """The position of DP rank `rank` resuming mixtures saved by `states` (one per old
        DP rank): the same layout continues exactly; another one translates each source
        and restarts the draws."""
        nw = max(1, num_workers)
        if len(states) == world_size and all(s["num_workers"] in (None, nw) for s in states):
            return states[rank]
        sources = [resume_position([s["sources"][i] for s in states], rank, world_size, num_workers)
                   for i in range(len(self.datasets))]
        next_workers = {s["next_worker"] for s in sources}
        return {**states[0], "rank": rank, "world_size": world_size, "num_workers": nw, "taken": {},
                "next_worker": next_workers.pop() if len(next_workers) == 1 else 0,
                "sources": sources}
