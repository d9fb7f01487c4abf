"""Where a run writes under ``--output DIR`` (the layout docs/curation.md describes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutputLayout:
    """The paths of a run's outputs and of its scan cache (``_work``)."""

    root: Path

    @property
    def work(self) -> Path:
        return self.root / "_work"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    def pattern(self, n: int) -> str:
        return str(self.shards / f"{{000000..{n - 1:06d}}}.tar")


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar counting shards (a no-op bar when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shard", disable=not enabled)
