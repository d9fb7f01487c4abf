"""Step 2 of a run: the stages' decisions in YAML order over the whole scanned corpus.

Per-sample stages contribute the verdicts the scan cached (``<stage>__reason``); the
corpus-wide ones decide here, over the rows still alive when their turn comes:
phash_dedup and concept_resample on the driver from compact per-sample columns,
semantic_dedup with a Ray Data job (k-means assignment + a per-cluster groupby), a
keep_fraction as a quantile. Nothing here is cached: a resumed run recomputes it from the
cached signals, so it always sees every shard.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import parts as cache
from .batches import column, reason_column
from .config import CurationConfig
from .dedup import every_nth, phash_duplicates, semantic_duplicates
from .image_stages import EMBEDDING
from .layout import OutputLayout
from .resample import balanced_keep
from .stages import compact_columns, decides_per_sample, score_column


@dataclass
class StageOutcome:
    """What one stage did in the decide step."""

    name: str
    decides: str  # "sample", "corpus" or "metadata"
    input: int = 0
    removed: int = 0
    reasons: Counter = field(default_factory=Counter)
    removed_gids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seconds: float = 0.0  # driver/global time
    details: dict = field(default_factory=dict)


@dataclass
class Corpus:
    """The compact columns of every scanned row, in corpus order (gid ascending)."""

    gid: np.ndarray  # int64: shard_id << 32 | index
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.gid)

    def get(self, name: str, default: Any = None) -> np.ndarray:
        return self.columns.get(name, default)


def gid_of(shard_id: np.ndarray, index: np.ndarray) -> np.ndarray:
    return (np.asarray(shard_id, np.int64) << 32) | np.asarray(index, np.int64)


def load_corpus(cfg: CurationConfig, layout: OutputLayout, n_shards: int) -> Corpus:
    import pyarrow as pa

    wanted = compact_columns(cfg)
    tables = [cache.read_shard_table(layout.work, i, wanted) for i in range(n_shards)]
    tables = [t for t in tables if t.num_rows]
    table = pa.concat_tables(tables, promote_options="default")
    cols = {name: cache.column_numpy(table, name) for name in table.column_names}
    gid = gid_of(cols["shard_id"], cols["index"])
    order = np.argsort(gid, kind="stable")
    return Corpus(gid[order], {k: v[order] for k, v in cols.items()})


def _embedding_sample(layout: OutputLayout, gids: np.ndarray) -> np.ndarray:
    """float32 [m, d]: the cached CLIP embeddings of ``gids`` (read shard by shard)."""
    shard_of = gids >> 32
    out = []
    for shard_id in np.unique(shard_of):
        want = np.sort(gids[shard_of == shard_id] & 0xFFFFFFFF)
        table = cache.read_shard_table(layout.work, int(shard_id), ["index", EMBEDDING])
        index = cache.column_numpy(table, "index")
        emb = cache.column_numpy(table, EMBEDDING)
        out.append(emb[np.isin(index, want)])
    return np.concatenate(out).astype(np.float32)


def _read_embeddings(batch: dict[str, np.ndarray], work: str) -> dict[str, np.ndarray]:
    """map_batches over shard ids: the cached (gid, CLIP embedding) rows of those shards."""
    gids, embs = [], []
    for shard_id in batch["shard_id"]:
        table = cache.read_shard_table(Path(work), int(shard_id), ["index", EMBEDDING])
        if table.num_rows and EMBEDDING in table.column_names:
            gids.append(gid_of(np.full(table.num_rows, int(shard_id)), cache.column_numpy(table, "index")))
            embs.append(cache.column_numpy(table, EMBEDDING).astype(np.float32))
    if not gids:
        return {"gid": np.zeros(0, np.int64), EMBEDDING: np.zeros((0, 1), np.float32)}
    return {"gid": np.concatenate(gids), EMBEDDING: np.concatenate(embs)}


def _embedding_dataset(layout: OutputLayout, n_shards: int):
    """() -> Ray Dataset of (gid, embedding) rows of every scanned shard, read by Ray tasks
    (one per shard) straight from the scan cache."""
    import ray.data

    def make():
        shards = ray.data.from_items([{"shard_id": i} for i in range(n_shards)], override_num_blocks=n_shards)
        return shards.map_batches(_read_embeddings, batch_size=1, batch_format="numpy",
                                  fn_kwargs={"work": str(layout.work)})

    return make


def _keep_fraction(corpus: Corpus, live: np.ndarray, stage) -> tuple[np.ndarray, dict]:
    """Remove all but the best ``keep_fraction`` of the live rows by score (ties: corpus
    order)."""
    scores = corpus.get(score_column(stage))
    idx = np.flatnonzero(live)
    order = np.lexsort((corpus.gid[idx], -np.nan_to_num(scores[idx], nan=-np.inf)))
    n_keep = math.ceil(stage.keep_fraction * len(idx))
    cut = float(scores[idx[order[n_keep - 1]]]) if n_keep else float("inf")
    return idx[order[n_keep:]], {"score_cut": cut}


def sample_ref(gid: int) -> str:
    """A sample's readable id: ``"<input shard>:<row>"`` (``"000003:17"``)."""
    return f"{int(gid) >> 32:06d}:{int(gid) & 0xFFFFFFFF}"


EXAMPLES_IN_REPORT = 20


@dataclass
class Decisions:
    """Every row's fate in corpus order: ``removed_by`` (stage name or ""), ``reason``
    ("" or why) and ``dup_of`` (gid of the earlier sample a duplicate repeats, or -1)."""

    removed_by: np.ndarray
    reason: np.ndarray
    dup_of: np.ndarray


def decide(cfg: CurationConfig, corpus: Corpus, layout: OutputLayout, n_shards: int) -> tuple[Decisions, list[StageOutcome]]:
    """Step 2: apply the stages in YAML order to the rows still alive."""
    n = len(corpus)
    live = np.asarray([s == "" for s in corpus.get("skip")], dtype=bool)
    removed_by = np.empty(n, dtype=object)
    removed_by[:] = ""
    reason = removed_by.copy()
    dup_of = np.full(n, -1, np.int64)
    outcomes = []
    for stage in cfg.stages:
        start = time.perf_counter()
        out = StageOutcome(stage.name, "sample" if decides_per_sample(stage) else "corpus", input=int(live.sum()))
        hits = np.zeros(0, np.int64)
        why: np.ndarray | str = ""
        idx = np.flatnonzero(live)
        if decides_per_sample(stage):
            verdict = corpus.get(reason_column(stage.name))
            hits = np.flatnonzero(live & np.asarray([r != "" for r in verdict], dtype=bool))
            why = verdict[hits]
        elif stage.name in ("clip_score", "video_text_similarity"):
            hits, out.details = _keep_fraction(corpus, live, stage)
            why = "below_keep_fraction"
        elif stage.name == "phash_dedup":
            r, first, dist = phash_duplicates(corpus.get(column("phash_dedup", "phash"))[idx],
                                              corpus.get(column("phash_dedup", "digest"))[idx], stage.max_distance)
            found = np.flatnonzero(r != "")
            hits, why = idx[found], r[found]
            dup_of[hits] = corpus.gid[idx[first[found]]]
            out.details = {"examples": [[sample_ref(corpus.gid[h]), sample_ref(dup_of[h]), int(d)]
                                        for h, d in zip(hits[:EXAMPLES_IN_REPORT], dist[found][:EXAMPLES_IN_REPORT])]}
        elif stage.name == "semantic_dedup":
            sample = _embedding_sample(layout, every_nth(corpus.gid[idx], stage.kmeans_sample))
            found = semantic_duplicates(_embedding_dataset(layout, n_shards), sample, live, corpus.gid,
                                        stage.num_clusters, stage.kmeans_iterations, stage.epsilon, cfg.seed)
            hits = idx[np.isin(corpus.gid[idx], np.fromiter(found, np.int64, len(found)))]
            why = "semantic_duplicate"
            dup_of[hits] = [found[int(g)][0] for g in corpus.gid[hits]]
            out.details = {"examples": [[sample_ref(g), sample_ref(found[int(g)][0]), round(found[int(g)][1], 4)]
                                        for g in corpus.gid[hits][:EXAMPLES_IN_REPORT]]}
        elif stage.name == "concept_resample":
            concepts = corpus.get(column("concept_resample", "concepts"))[idx]
            keep, counts = balanced_keep(list(concepts), corpus.get("uid")[idx], stage.cap, cfg.seed,
                                         stage.keep_unmatched, len(stage.concepts))
            hits = idx[~keep]
            why = np.asarray(["unmatched" if len(concepts[j]) == 0 else "over_cap" for j in np.flatnonzero(~keep)],
                             dtype=object)
            top = np.argsort(-counts, kind="stable")[:100]
            out.details = {"concepts": len(stage.concepts), "matched": int((counts > 0).sum()),
                           "over_cap": int((counts > stage.cap).sum()),
                           "concept_counts": {stage.concepts[c]: int(counts[c]) for c in top if counts[c]}}
        else:  # ocr: metadata only
            out.decides = "metadata"
        removed_by[hits] = stage.name
        reason[hits] = why
        live[hits] = False
        out.removed = len(hits)
        out.reasons = Counter(reason[hits].tolist())
        out.removed_gids = corpus.gid[hits]
        out.seconds = time.perf_counter() - start
        outcomes.append(out)
    return Decisions(removed_by, reason, dup_of), outcomes
