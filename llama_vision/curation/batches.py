"""Helpers shared by the stage functions: which rows of a batch a stage works on, and
column naming.

Every stage function takes a batch (dict of numpy arrays, see curation.io) and returns it
with its own columns added, named ``<stage>__<field>`` (``clip_score__score``). A
filtering stage's verdict is ``<stage>__reason``: ``""`` keeps the row, anything else is
why it is removed. A stage only looks at *live* rows: readable (``skip == ""``) and not
already rejected by an earlier per-sample stage (the ``prior`` reason columns); other rows
get neutral values (``""``, NaN, 0) so that every batch has the same columns.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np


def column(stage: str, field: str) -> str:
    return f"{stage}__{field}"


def reason_column(stage: str) -> str:
    return column(stage, "reason")


def live_rows(batch: dict[str, np.ndarray], prior: Sequence[str] = ()) -> np.ndarray:
    """bool [B]: rows that are readable and not rejected by the ``prior`` reason columns."""
    live = np.asarray([s == "" for s in batch["skip"]], dtype=bool)
    for name in prior:
        live &= np.asarray([r == "" for r in batch[name]], dtype=bool)
    return live


def chunks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive pieces of at most ``size`` of an index array (model sub-batches)."""
    for start in range(0, len(rows), max(1, size)):
        yield rows[start:start + size]


def object_array(values: Sequence) -> np.ndarray:
    """A 1-D object array (strings, bytes, lists) that numpy will not try to broadcast."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def text_column(n: int, fill: str = "") -> np.ndarray:
    return object_array([fill] * n)


@contextmanager
def timed(batch: dict[str, np.ndarray], stage: str) -> Iterator[None]:
    """Adds ``<stage>__seconds``: the batch's wall time spread evenly over its rows (the
    report sums it into worker-seconds per stage)."""
    start = time.perf_counter()
    yield
    n = len(batch["skip"])
    batch[column(stage, "seconds")] = np.full(n, (time.perf_counter() - start) / max(1, n), dtype=np.float64)
