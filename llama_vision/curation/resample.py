"""MetaCLIP-style concept balancing (Xu et al. 2023, "Demystifying CLIP Data", Algorithm 1).

1. Match (per sample, in parallel): the concept vocabulary entries that occur in the
   caption, as lowercase word n-grams (a dict lookup per n-gram, so a 500k-entry
   vocabulary costs the same as a small one).
2. Count (global): ``count[c]`` = live samples matching concept ``c``.
3. Sample: for each matched concept a uniform draw ``u(sample, c)``; the sample is kept if
   ``u < cap / count[c]`` for ANY of its concepts. Concepts under the cap keep all their
   samples; a concept over it keeps about ``cap`` of those matching only it, so head
   concepts no longer drown tail ones. Samples matching nothing are kept or dropped by
   ``keep_unmatched``.

The draws are a hash of (seed, sample uid, concept id) -- not a random stream -- so they do
not depend on the order samples are processed in or on how the corpus was split.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from .batches import column, live_rows, object_array, timed
from .config import ConceptResampleConfig

_WORDS = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


class ConceptMatcher:
    """Concept vocabulary -> ids; ``match(text)`` gives the sorted ids found in a text."""

    def __init__(self, concepts: Sequence[str]):
        self.concepts = list(dict.fromkeys(c.strip().lower() for c in concepts if c.strip()))
        self.index = {tuple(_WORDS.findall(c)): i for i, c in enumerate(self.concepts)}
        self.max_n = max((len(k) for k in self.index), default=0)

    def match(self, text: str) -> list[int]:
        words = _WORDS.findall((text or "").lower())
        found = set()
        for n in range(1, self.max_n + 1):
            for start in range(len(words) - n + 1):
                hit = self.index.get(tuple(words[start:start + n]))
                if hit is not None:
                    found.add(hit)
        return sorted(found)


def match_concepts(batch: dict[str, np.ndarray], cfg: ConceptResampleConfig, prior: Sequence[str] = ()) -> dict:
    """``concept_resample__concepts``: list[int] of matched concept ids per row."""
    matcher = _matcher(tuple(cfg.concepts))
    n = len(batch["skip"])
    out = [[] for _ in range(n)]
    with timed(batch, cfg.name):
        for i in np.flatnonzero(live_rows(batch, prior)):
            out[i] = matcher.match(batch["text"][i])
    batch[column(cfg.name, "concepts")] = object_array(out)
    return batch


_MATCHERS: dict[tuple[str, ...], ConceptMatcher] = {}


def _matcher(concepts: tuple[str, ...]) -> ConceptMatcher:
    """One matcher per worker process and vocabulary (building it is O(vocabulary))."""
    if concepts not in _MATCHERS:
        _MATCHERS.clear()
        _MATCHERS[concepts] = ConceptMatcher(concepts)
    return _MATCHERS[concepts]


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed uint64 -> uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def uniform_draws(uid: np.ndarray, concept: np.ndarray, seed: int) -> np.ndarray:
    """float64 in [0, 1): one draw per (sample uid, concept id) pair for this seed."""
    with np.errstate(over="ignore"):
        key = _mix(uid.astype(np.uint64) ^ _mix(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + concept.astype(np.uint64)))
    return (key >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def concept_counts(concepts: Sequence[Sequence[int]], vocabulary_size: int) -> np.ndarray:
    """int64 [V]: samples matching each concept."""
    flat = np.fromiter((c for row in concepts for c in row), dtype=np.int64)
    return np.bincount(flat, minlength=vocabulary_size)


def balanced_keep(concepts: Sequence[Sequence[int]], uid: np.ndarray, cap: int, seed: int, keep_unmatched: bool,
                  vocabulary_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampling decision for n live samples.

    Args:
        concepts: per sample, its matched concept ids.
        uid: uint64 [n] sample uids (curation.io.sample_uid).

    Returns:
        keep: bool [n]; counts: int64 [V] concept counts before sampling.
    """
    counts = concept_counts(concepts, vocabulary_size)
    prob = np.minimum(1.0, cap / np.maximum(counts, 1))
    lengths = np.fromiter((len(c) for c in concepts), dtype=np.int64, count=len(concepts))
    flat = np.fromiter((c for row in concepts for c in row), dtype=np.int64, count=int(lengths.sum()))
    owner = np.repeat(np.arange(len(concepts)), lengths)
    hit = uniform_draws(np.asarray(uid, np.uint64)[owner], flat, seed) < prob[flat]
    keep = np.zeros(len(concepts), dtype=bool)
    np.logical_or.at(keep, owner[hit], True)
    keep[lengths == 0] = keep_unmatched
    return keep, counts
