"""Caption heuristics: which rule (if any) a caption breaks.

Rules, in the order they are checked (the first broken one is the reason):

* ``empty`` -- no caption, or only whitespace.
* ``url`` -- contains a URL or a bare domain name (``www.x.com``, ``cdn.shop.com/...``).
* ``filename`` -- contains a camera or file name (``IMG_1234.JPG``, ``DSC01234``,
  ``photo.png``).
* ``boilerplate`` -- matches one of the configured regular expressions.
* ``charset`` -- letters (of the allowed scripts) are fewer than ``min_alpha_fraction`` of
  the non-space characters: symbol soup, mojibake, other scripts.
* ``too_short`` / ``too_long`` -- word count outside [min_words, max_words].
* ``repetition`` -- the most frequent word is more than ``max_repeat_fraction`` of the
  words (captions of at least four words).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from typing import Sequence

import numpy as np

from .batches import live_rows, reason_column, text_column, timed
from .config import CaptionRulesConfig

_URL = re.compile(r"(https?://|www\.)\S+|\b[\w-]+(\.[\w-]+)*\.(com|org|net|io|co|de|uk|ru|jp|cn|info|biz)\b(/\S*)?",
                  re.IGNORECASE)
_FILENAME = re.compile(r"\b(IMG|DSC|DSCN|DCIM|PXL|VID|MVI|GOPR|Screenshot)[_-]?\d+"  # camera file names
                       r"|\b[\w-]+\.(jpe?g|png|gif|webp|bmp|tiff?|mp4|mov|avi)\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+", re.UNICODE)


@functools.lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


@functools.lru_cache(maxsize=4096)
def _letter_allowed(ch: str, scripts: tuple[str, ...]) -> bool:
    name = unicodedata.name(ch, "")
    return any(name.startswith(s) for s in scripts)


def caption_violation(text: str | None, cfg: CaptionRulesConfig) -> str:
    """The first rule ``text`` breaks (see the module docstring), or ``""``."""
    if text is None or not text.strip():
        return "empty"
    if cfg.reject_urls and _URL.search(text):
        return "url"
    if cfg.reject_filenames and _FILENAME.search(text):
        return "filename"
    for pattern in _compiled(tuple(cfg.boilerplate)):
        if pattern.search(text):
            return "boilerplate"
    chars = [c for c in text if not c.isspace()]
    scripts = tuple(cfg.allowed_scripts)
    letters = sum(1 for c in chars if c.isalpha() and _letter_allowed(c, scripts))
    if letters < cfg.min_alpha_fraction * len(chars):
        return "charset"
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < cfg.min_words:
        return "too_short"
    if len(words) > cfg.max_words:
        return "too_long"
    if len(words) >= 4 and Counter(words).most_common(1)[0][1] > cfg.max_repeat_fraction * len(words):
        return "repetition"
    return ""


def caption_rules(batch: dict[str, np.ndarray], cfg: CaptionRulesConfig, prior: Sequence[str] = ()) -> dict:
    """Stage function (images and videos): ``caption_rules__reason``, the first rule the
    caption breaks."""
    reasons = text_column(len(batch["skip"]))
    with timed(batch, cfg.name):
        for i in np.flatnonzero(live_rows(batch, prior)):
            reasons[i] = caption_violation(batch["text"][i], cfg)
    batch[reason_column(cfg.name)] = reasons
    return batch
