"""The scan's per-shard cache: parquet *parts*, and the done marker that commits a shard.

Layout under ``OUTPUT/_work``::

    run.json                      fingerprint of the config + the input shard list
    parts/000003/p000000000-000000063-n64.parquet
    parts/000003/p000000064-000000101-n38-last.parquet
    done/000003.json              written once every row of shard 3 is in parts/000003

A part holds some rows of ONE input shard (every column the scan produced except the
in-flight frames); its name says its first and last row index, its row count and whether
it holds the shard's last row. Rows of a shard may arrive in any grouping and order (Ray
batches them as it likes), so whoever writes a part then checks: when a ``-last`` part
exists and the row counts add up to its last index + 1, the shard is complete and its
marker is written. Parts and markers are written to a temporary name and renamed
(``os.replace``), so a killed run leaves only whole files; the parts of a shard without a
marker are deleted and recomputed on the next run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llama_vision.utils.io import atomic_write_text

_PART = re.compile(r"^p(\d+)-(\d+)-n(\d+)(-last)?\.parquet$")


def part_dir(work: Path, shard_id: int) -> Path:
    return work / "parts" / f"{shard_id:06d}"


def marker_path(work: Path, shard_id: int) -> Path:
    return work / "done" / f"{shard_id:06d}.json"


def is_done(work: Path, shard_id: int) -> bool:
    return marker_path(work, shard_id).is_file()


def part_files(work: Path, shard_id: int) -> list[str]:
    """The shard's parts in row order of their first index."""
    folder = part_dir(work, shard_id)
    if not folder.is_dir():
        return []
    names = sorted(n for n in os.listdir(folder) if _PART.match(n))
    return [str(folder / n) for n in names]


def reset_shard(work: Path, shard_id: int) -> None:
    """Forget a shard's incomplete parts (a killed run's leftovers) before rescanning it."""
    shutil.rmtree(part_dir(work, shard_id), ignore_errors=True)


def to_arrow(values: np.ndarray) -> pa.Array:
    """A numpy batch column -> Arrow: object arrays of str / bytes / int lists, 2-D float
    arrays (embeddings) as fixed-size lists, other numeric arrays as they are."""
    if values.dtype == object:
        first = next((v for v in values if v is not None), None)
        if isinstance(first, (bytes, bytearray)):
            return pa.array([bytes(v) for v in values], pa.binary())
        if isinstance(first, (list, tuple, np.ndarray)):
            return pa.array([[int(x) for x in v] for v in values], pa.list_(pa.int32()))
        return pa.array(["" if v is None else str(v) for v in values], pa.string())
    if values.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), values.shape[1])
    if values.ndim > 2:
        raise ValueError(f"cannot store a {values.ndim}-d column in a part")
    return pa.array(values)


def write_part(work: Path, batch: dict[str, np.ndarray], rows: np.ndarray, skip_columns: Sequence[str]) -> str:
    """Write ``rows`` of ``batch`` (all of one shard) as a part; returns its path."""
    shard_id = int(batch["shard_id"][rows[0]])
    index = batch["index"][rows]
    has_last = bool(np.any(batch["last"][rows]))
    name = f"p{int(index.min()):09d}-{int(index.max()):09d}-n{len(rows)}{'-last' if has_last else ''}.parquet"
    folder = part_dir(work, shard_id)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: to_arrow(v[rows]) for k, v in batch.items() if k not in skip_columns})
    path = folder / name
    write_parquet_atomic(table, path)
    return str(path)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a parquet file under a temporary name in the same folder, then rename it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def complete_rows(work: Path, shard_id: int) -> int | None:
    """The shard's row count when all of its parts are written, else None."""
    total, last = 0, None
    for path in part_files(work, shard_id):
        m = _PART.match(os.path.basename(path))
        total += int(m.group(3))
        if m.group(4):
            last = int(m.group(2))
    return total if last is not None and total == last + 1 else None


def mark_done(work: Path, shard_id: int, source: str, rows: int, fingerprint: str) -> None:
    atomic_write_text(marker_path(work, shard_id),
                      json.dumps({"shard": source, "rows": rows, "fingerprint": fingerprint}) + "\n")


def write_parts(batch: dict[str, np.ndarray], work: str, fingerprint: str, skip_columns: Sequence[str]) -> dict:
    """The scan's last map_batches: store the batch's rows as one part per shard and commit
    the shards this completes. Returns one row per shard touched: ``shard_id``, ``rows``
    (in this batch) and ``done`` (the shard was committed by this call)."""
    work_dir = Path(work)
    ids, counts, done = [], [], []
    shard_ids = np.asarray(batch["shard_id"])
    for shard_id in np.unique(shard_ids):
        rows = np.flatnonzero(shard_ids == shard_id)
        write_part(work_dir, batch, rows, skip_columns)
        total = complete_rows(work_dir, int(shard_id))
        finished = total is not None and not is_done(work_dir, int(shard_id))
        if finished:
            mark_done(work_dir, int(shard_id), str(batch["source"][rows[0]]), total, fingerprint)
        ids.append(int(shard_id))
        counts.append(len(rows))
        done.append(finished)
    return {"shard_id": np.asarray(ids, np.int64), "rows": np.asarray(counts, np.int64), "done": np.asarray(done)}


def read_shard_table(work: Path, shard_id: int, columns: Sequence[str] | None = None) -> pa.Table:
    """All scanned rows of a shard, sorted by index (only ``columns`` that exist)."""
    files = part_files(work, shard_id)
    if not files:
        return pa.table({})
    tables = []
    for f in files:
        schema_names = pq.read_schema(f).names
        cols = None if columns is None else [c for c in columns if c in schema_names]
        tables.append(pq.read_table(f, columns=cols))
    table = pa.concat_tables(tables, promote_options="default")
    return table.sort_by("index") if "index" in table.column_names else table


def column_numpy(table: pa.Table, name: str) -> np.ndarray:
    """A part column as numpy: strings/bytes/lists as object arrays, fixed-size lists 2-D."""
    col = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    if pa.types.is_list(col.type):
        out = np.empty(len(col), dtype=object)
        out[:] = [np.asarray(v, np.int64) for v in col.to_pylist()]
        return out
    return col.to_numpy(zero_copy_only=False)
