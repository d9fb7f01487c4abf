"""Step 3 of a run: one output WebDataset shard and one per-sample decision file per input
shard, written by Ray tasks from the scan cache (``shards/000003.tar``,
``samples/000003.parquet``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .config import CurationConfig
from .decide import Corpus, Decisions, sample_ref
from .image_stages import EMBEDDING
from .io import output_key, write_wds_shard
from .layout import OutputLayout, progress_bar
from .parts import column_numpy, read_shard_table, to_arrow, write_parquet_atomic
from .stages import metadata_columns

# Columns never copied into samples/*.parquet (bulk data, bookkeeping).
_NOT_IN_SAMPLES = ("media", "thumb", "meta", "text", "uid", "last", EMBEDDING)
_NOT_IN_SAMPLES_SUFFIXES = ("__seconds", "__digest", "__valid")


def _json_value(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else round(float(v), 5)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def write_output_shard(item: dict, work: str, shards_dir: str, samples_dir: str, meta_columns: dict[str, str]) -> dict:
    """Ray Data ``map``: write the output shard and the per-sample decisions of one input
    shard. ``item``: ``shard_id`` and ``decisions``, JSON of aligned lists ``removed`` (row
    indices), ``removed_by``, ``reason`` and ``dup_of``."""
    shard_id = int(item["shard_id"])
    decisions = json.loads(item["decisions"])
    table = read_shard_table(Path(work), shard_id)
    n = table.num_rows
    cols = {name: column_numpy(table, name) for name in table.column_names}
    removed_by = np.empty(n, dtype=object)
    removed_by[:] = ""
    reason = removed_by.copy()
    pos = {int(i): k for k, i in enumerate(cols["index"])} if n else {}
    dup_of = removed_by.copy()
    for i, by, why, dup in zip(decisions["removed"], decisions["removed_by"], decisions["reason"], decisions["dup_of"]):
        removed_by[pos[int(i)]], reason[pos[int(i)]], dup_of[pos[int(i)]] = by, why, dup
    samples = []
    for k in range(n):
        if cols["skip"][k] or removed_by[k]:
            continue
        try:
            meta = json.loads(cols["meta"][k])
        except ValueError:
            meta = {}
        meta["curation"] = {"source": os.path.basename(str(cols["source"][k])), "key": str(cols["key"][k]),
                            **{name: _json_value(cols[c][k]) for name, c in meta_columns.items() if c in cols}}
        samples.append({"key": output_key(str(cols["key"][k]), int(cols["index"][k])), "ext": str(cols["ext"][k]),
                        "media": cols["media"][k], "text": str(cols["text"][k]), "meta": meta})
    keys = [s["key"] for s in samples]
    if len(set(keys)) != len(keys):
        # A key repeated inside one input shard would merge two samples for the WebDataset
        # reader (consecutive members with one key are one sample): use row numbers instead.
        for s, k in zip(samples, [k for k in range(n) if not (cols["skip"][k] or removed_by[k])]):
            s["key"] = f"{int(cols['index'][k]):09d}"
    write_wds_shard(os.path.join(shards_dir, f"{shard_id:06d}.tar"), samples)
    if n:
        keep = {c: v for c, v in cols.items()
                if c not in _NOT_IN_SAMPLES and not c.endswith(_NOT_IN_SAMPLES_SUFFIXES) and v.ndim == 1}
        table = pa.table({**{c: to_arrow(v) for c, v in keep.items()}, "removed_by": to_arrow(removed_by),
                          "reason": to_arrow(reason), "dup_of": to_arrow(dup_of)})
        write_parquet_atomic(table, os.path.join(samples_dir, f"{shard_id:06d}.parquet"))
    return {"shard_id": shard_id, "kept": len(samples)}


def write_outputs(cfg: CurationConfig, n_shards: int, corpus: Corpus, decisions: Decisions, layout: OutputLayout,
                  progress: bool) -> int:
    """Step 3 as a Ray Data job over the shards; returns the number of samples written."""
    import ray.data

    layout.shards.mkdir(parents=True, exist_ok=True)
    layout.samples.mkdir(parents=True, exist_ok=True)
    shard_of = corpus.gid >> 32
    hit = np.flatnonzero(decisions.removed_by != "")
    items = []
    for shard_id in range(n_shards):
        mine = hit[shard_of[hit] == shard_id]
        items.append({"shard_id": shard_id, "decisions": json.dumps({
            "removed": (corpus.gid[mine] & 0xFFFFFFFF).tolist(), "removed_by": decisions.removed_by[mine].tolist(),
            "reason": decisions.reason[mine].tolist(),
            "dup_of": [sample_ref(d) if d >= 0 else "" for d in decisions.dup_of[mine]]})})
    meta_columns = {k: v for s in cfg.stages for k, v in metadata_columns(s).items()}
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 1024)).map(
        write_output_shard, fn_kwargs={"work": str(layout.work), "shards_dir": str(layout.shards),
                                       "samples_dir": str(layout.samples), "meta_columns": meta_columns})
    kept = 0
    with progress_bar(n_shards, "write", progress) as bar:
        for row in ds.iter_rows():
            kept += int(row["kept"])
            bar.update(1)
    return kept
