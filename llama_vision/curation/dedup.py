"""Corpus-wide de-duplication decisions (run after every shard was scanned).

Both stages keep the first sample in *corpus order* (input shard, then position) and remove
every later sample that duplicates ANY earlier one, kept or not -- SemDeDup's rule (the
maximum similarity to an earlier point), which needs no sequential pass, so it parallelises
and does not depend on how the work was split. A chain a ~ b ~ c with a !~ c keeps only a.

* :func:`phash_duplicates`: exact copies (same SHA-256 prefix) and near duplicates
  (perceptual hashes within ``max_distance`` bits). Candidate pairs come from
  multi-index hashing: the 64 bits are cut into ``max_distance + 1`` bands, and two hashes
  within ``max_distance`` bits agree exactly on at least one band (pigeonhole), so only
  hashes sharing a band value are compared. Runs on the driver over the (n, 8-byte hash)
  arrays: ~16 bytes per sample.
* :func:`semantic_duplicates`: SemDeDup. k-means (faiss) on a sample of the CLIP image
  embeddings, then a Ray Data job: assign every embedding to its nearest centroid
  (map_batches), group by cluster and prune inside each cluster (groupby().map_groups),
  returning only the removed samples. Embeddings never pass through the driver beyond the
  k-means sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of max_distance + 1 bit bands covering the 64 bits."""
    k = max_distance + 1
    edges = [round(j * 64 / k) for j in range(k + 1)]
    return [(edges[j], edges[j + 1] - edges[j]) for j in range(k)]


def phash_duplicates(phash: np.ndarray, digest: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Duplicates among n samples given in corpus order.

    Args:
        phash, digest: uint64 [n] perceptual hashes and content-digest prefixes.
        max_distance: near duplicates differ in at most this many of the 64 hash bits.

    Returns:
        reasons: object [n], ``exact_duplicate`` / ``near_duplicate`` / ``""``;
        dup_of: int64 [n], the position of the earliest sample it duplicates (-1 if none);
        distance: int64 [n], Hamming distance to it (-1 if none).
    """
    n = len(phash)
    reasons = np.empty(n, dtype=object)
    reasons[:] = ""
    dup_of = np.full(n, -1, np.int64)
    distance = np.full(n, -1, np.int64)
    if n == 0:
        return reasons, dup_of, distance
    # Exact copies: later samples with the bytes of an earlier one.
    _, first = np.unique(digest, return_index=True)
    first_of = first[np.unique(digest, return_inverse=True)[1]]
    exact = first_of != np.arange(n)
    reasons[exact], dup_of[exact], distance[exact] = "exact_duplicate", first_of[exact], 0
    # Near duplicates among the remaining (unique-content) samples.
    rest = np.flatnonzero(~exact)
    best = np.full(len(rest), n, np.int64)  # earliest near-duplicate partner (position in rest)
    best_d = np.full(len(rest), -1, np.int64)
    h = phash[rest]
    for shift, width in _bands(max_distance):
        band = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(band, kind="stable")  # stable: a group lists its members in corpus order
        sorted_band = band[order]
        starts = np.flatnonzero(np.r_[True, sorted_band[1:] != sorted_band[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            _earliest_close(order[s:e], h, max_distance, best, best_d)
    near = best < n
    idx = rest[near]
    reasons[idx] = "near_duplicate"
    dup_of[idx] = rest[best[near]]
    distance[idx] = best_d[near]
    return reasons, dup_of, distance


def _earliest_close(members: np.ndarray, h: np.ndarray, max_distance: int, best: np.ndarray, best_d: np.ndarray,
                    chunk: int = 1024) -> None:
    """For each member (ascending positions), record the earliest earlier member within
    ``max_distance`` bits in ``best`` / ``best_d`` if it beats what other bands found."""
    hm = h[members]
    for start in range(1, len(members), chunk):
        stop = min(len(members), start + chunk)
        d = _hamming(hm[start:stop, None], hm[None, :stop])  # [b, stop]
        close = (d <= max_distance) & (np.arange(stop)[None, :] < np.arange(start, stop)[:, None])
        rows = np.flatnonzero(close.any(axis=1))
        first = close[rows].argmax(axis=1)
        for r, c in zip(rows, first):
            j, i = members[start + r], members[c]
            if i < best[j]:
                best[j], best_d[j] = i, d[r, c]


# --------------------------------------------------------------------------- SemDeDup


def kmeans_centroids(sample: np.ndarray, num_clusters: int, iterations: int, seed: int) -> np.ndarray:
    """faiss spherical k-means on L2-normalised float32 [m, d] -> centroids [k, d]; k is
    capped at one cluster per 40 samples (faiss wants 39 points per centroid)."""
    import faiss

    k = max(1, min(num_clusters, len(sample) // 40))
    if k == 1:
        c = sample.mean(axis=0, keepdims=True)
        return (c / max(np.linalg.norm(c), 1e-8)).astype(np.float32)
    km = faiss.Kmeans(sample.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, math.ceil(len(sample) / k)))
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return km.centroids.astype(np.float32)


@dataclass(frozen=True)
class LiveRows:
    """Which corpus rows reach a stage, compactly enough to ship to every worker: one bit
    per row in corpus order (``bits``, np.packbits; in Ray's object store as ``ref``) and
    each shard's first position (``offsets``; every row of a shard is in the corpus, so
    row ``index`` of shard ``s`` sits at ``offsets[s] + index``)."""

    ref: Any
    offsets: np.ndarray

    @classmethod
    def put(cls, live: np.ndarray, gid: np.ndarray) -> "LiveRows":
        import ray

        shards = gid >> 32
        offsets = np.searchsorted(shards, np.arange(int(shards.max()) + 2 if len(shards) else 1))
        return cls(ray.put(np.packbits(live)), offsets)

    def mask(self, gid: np.ndarray) -> np.ndarray:
        import ray

        bits = ray.get(self.ref)  # zero-copy from the node's object store
        pos = self.offsets[gid >> 32] + (gid & 0xFFFFFFFF)
        return ((bits[pos >> 3] >> (7 - (pos & 7))) & 1).astype(bool)


def assign_clusters(batch: dict[str, np.ndarray], centroids: np.ndarray, embedding: str, live: LiveRows) -> dict:
    """map_batches: keep the live rows, add ``cluster`` (nearest centroid by cosine)."""
    keep = live.mask(np.asarray(batch["gid"], np.int64))
    emb = np.asarray(batch[embedding], np.float32)[keep]
    cluster = np.argmax(emb @ centroids.T, axis=1).astype(np.int64) if len(emb) else np.zeros(0, np.int64)
    return {"gid": batch["gid"][keep], "cluster": cluster, "embedding": emb}


def prune_cluster(group: dict[str, np.ndarray], epsilon: float, chunk: int = 2048) -> dict[str, np.ndarray]:
    """map_groups: inside one cluster, every sample whose cosine similarity to an earlier
    one (smaller ``gid``) exceeds ``1 - epsilon`` is removed. Returns the removed samples:
    ``gid``, ``dup_of`` (gid of its most similar earlier sample) and ``similarity``.
    Memory: chunk x cluster size similarities at a time."""
    order = np.argsort(group["gid"], kind="stable")
    gid = np.asarray(group["gid"])[order]
    emb = np.asarray(group["embedding"], np.float32)[order]
    removed, dup_of, sims = [], [], []
    for start in range(1, len(gid), chunk):
        stop = min(len(gid), start + chunk)
        rows = np.arange(start, stop)
        block = emb[start:stop] @ emb[:stop].T  # [b, stop]: against every sample up to the block
        block[np.arange(stop)[None, :] >= rows[:, None]] = -np.inf  # earlier samples only
        best = block.argmax(axis=1)
        best_sim = block[np.arange(stop - start), best]
        hit = best_sim > 1.0 - epsilon
        removed.extend(gid[rows[hit]].tolist())
        dup_of.extend(gid[best[hit]].tolist())
        sims.extend(best_sim[hit].tolist())
    return {"gid": np.asarray(removed, np.int64), "dup_of": np.asarray(dup_of, np.int64),
            "similarity": np.asarray(sims, np.float32)}


def semantic_duplicates(read_embeddings: Callable, sample: np.ndarray, live: np.ndarray, gid: np.ndarray,
                        num_clusters: int, iterations: int, epsilon: float, seed: int) -> dict[int, tuple[int, float]]:
    """SemDeDup over the live samples.

    Args:
        read_embeddings: () -> a Ray Dataset with columns ``gid`` (int64 corpus-order id)
            and ``clip__image_embedding`` (float32 [d]) for every scanned sample.
        sample: float32 [m, d] k-means training sample (normalised embeddings).
        live: bool [n], the corpus rows (ascending ``gid`` [n]) that reach the stage.

    Returns:
        {removed gid: (gid of the earlier duplicate, cosine similarity)}.
    """
    import ray

    from .image_stages import EMBEDDING

    if live.sum() < 2:
        return {}
    centroids = kmeans_centroids(sample, num_clusters, iterations, seed)
    ds = read_embeddings().map_batches(assign_clusters, batch_format="numpy", fn_kwargs={
        "centroids": centroids, "embedding": EMBEDDING, "live": LiveRows.put(live, gid)})
    # One shuffle partition per CPU (Ray's default of 200 is for large clusters).
    partitions = max(1, min(len(centroids), int(ray.cluster_resources().get("CPU", 1))))
    pruned = ds.groupby("cluster", num_partitions=partitions).map_groups(
        prune_cluster, batch_format="numpy", fn_kwargs={"epsilon": epsilon})
    out: dict[int, tuple[int, float]] = {}
    for batch in pruned.iter_batches(batch_format="numpy", batch_size=None):
        for g, d, s in zip(batch["gid"], batch["dup_of"], batch["similarity"]):
            out[int(g)] = (int(d), float(s))
    return out


def every_nth(ids: Sequence[int], limit: int) -> np.ndarray:
    """A deterministic subsample of at most ``limit`` ids: every n-th in order."""
    ids = np.asarray(ids)
    if len(ids) <= limit:
        return ids
    return ids[:: math.ceil(len(ids) / limit)]
