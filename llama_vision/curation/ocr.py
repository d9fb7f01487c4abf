"""OCR with tesseract (Debian package ``tesseract-ocr``), many images per process.

Starting tesseract costs ~0.1 s (it loads its LSTM model), more than reading a small
picture, so a batch of images is written to a temporary folder and handed to ONE tesseract
process as a list file; its TSV output has a ``page_num`` column that maps each word back
to its image. Words come with their box and confidence; only words of at least
``min_confidence`` with two or more letters/digits are kept: tesseract reads texture and
shapes as short words of low confidence (on the test corpora 90% of them below 80, median
~33; real overlaid words ~95). The few that score higher are mostly large shapes, which
the text_overlay stage tells apart by their height.

**Binarisation.** Tesseract is a document reader: it binarises a page with one global
(Otsu) threshold and finds text only as dark ink on the page's light background -- not
light text on dark (its documentation: "for 4.x use dark text on light background"), and
not text inside a region that binarises to a dark blob. Text burnt into a picture is
usually neither: light or dark letters on a banner or a box, which sits on a busy picture.
So each picture is binarised here first, at the two thresholds of a three-class Otsu
split of its grey levels (picture / banner / letters, in whatever brightness order) and in
both polarities: up to four black-on-white pages, each with a white margin, on one of
which the letters are the ink and their banner is the page. Ink connected to the image
border is dropped from every page (the classic removal of dark scan borders): it is the
picture around a caption box, which would otherwise enclose the box as a dark blob, and
overlaid text keeps off the frame edge (a letter cut by the edge is lost with it). The
words of an image's pages are merged (a word found on two pages once, at its best
confidence). Reading the picture as it is, with a black margin, found text only where
its banner ran into the page edge (the margin then joined the banner into one page).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from llama_vision.config import ConfigError

TESSERACT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Word:
    text: str
    confidence: float
    left: int
    top: int
    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height


class OcrError(RuntimeError):
    """tesseract failed on a batch (the pipeline records it per sample, never raises it)."""


def check_tesseract(languages: str) -> str:
    """The tesseract binary's path; ConfigError when it or a language's data is missing."""
    binary = shutil.which("tesseract")
    if binary is None:
        raise ConfigError("OCR needs the tesseract binary: apt-get install tesseract-ocr")
    listed = subprocess.run([binary, "--list-langs"], capture_output=True, text=True, timeout=60)
    have = {line.strip() for line in (listed.stdout + listed.stderr).splitlines()[1:]}
    missing = [lang for lang in languages.split("+") if lang not in have]
    if missing:
        raise ConfigError(f"tesseract has no language data for {', '.join(missing)} "
                          f"(installed: {', '.join(sorted(have))}); apt-get install tesseract-ocr-<lang>")
    return binary


def otsu_levels(grey: np.ndarray) -> tuple[int, int]:
    """The thresholds t1 <= t2 of the three-class Otsu split of uint8 grey levels (classes
    [0, t1], (t1, t2], (t2, 255], maximising the between-class variance); an image of two
    grey levels gives t1 == t2 (the darker level), one of a single level (t, t)."""
    hist = np.bincount(np.asarray(grey, np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    w, s = np.cumsum(p), np.cumsum(p * np.arange(256))
    t1, t2 = np.arange(256)[:, None], np.arange(256)[None, :]
    w0, s0 = w[t1], s[t1]
    w1, s1 = w[t2] - w0, s[t2] - s0
    w2, s2 = 1.0 - w[t2], s[-1] - s[t2]
    valid = (t1 < t2) & (w0 > 1e-12) & (w1 > 1e-12) & (w2 > 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(valid, s0 * s0 / w0 + s1 * s1 / w1 + s2 * s2 / w2, -np.inf)
    if not np.isfinite(score).any():
        level = int(np.flatnonzero(hist)[0]) if hist.any() else 0
        return level, level
    i, j = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(i), int(j)


def _drop_border_ink(ink: np.ndarray) -> np.ndarray:
    """``ink`` without its connected components (8-neighbour) that touch the image border."""
    import cv2

    count, labels = cv2.connectedComponents(ink.astype(np.uint8), connectivity=8)
    if count <= 1:
        return ink
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ink & ~np.isin(labels, edge[edge > 0])


def binarized_pages(image: Image.Image) -> list[Image.Image]:
    """Black-on-white pages of one picture for tesseract (see the module docstring): grey
    levels at or below / above each of the two otsu_levels thresholds as ink, without the
    ink connected to the image border; pages that repeat another or have no ink are left
    out."""
    grey = np.asarray(image.convert("L"))
    t1, t2 = otsu_levels(grey)
    pages, seen = [], set()
    for t in dict.fromkeys((t1, t2)):
        dark = grey <= t
        if dark.all() or not dark.any():
            continue
        for ink in (dark, ~dark):
            ink = _drop_border_ink(ink)
            if not ink.any():
                continue
            key = np.packbits(ink).tobytes()
            if key not in seen:
                seen.add(key)
                pages.append(Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)))
    return pages


def ocr_images(images: Sequence[Image.Image], *, languages: str = "eng", psm: int = 11, min_confidence: float = 80.0,
               upscale: float = 1.0, border: float = 0.4, binary: str = "tesseract") -> list[list[Word]]:
    """Words found in each image (boxes in the image's own pixels).

    ``upscale`` scales the image first; it is then binarised into up to four pages
    (binarized_pages), and a white margin of ``border`` times its longer side is added
    around each: tesseract's page layout analysis misses text that runs to the image edge
    (a banner across a frame), a long-known tesseract trait. The words of an image's pages
    are merged (merge_words)."""
    if not images:
        return []
    with tempfile.TemporaryDirectory(prefix="curate-ocr-") as tmp:
        paths, margins, owner = [], [], []
        for i, image in enumerate(images):
            if upscale != 1.0:
                image = image.resize((max(1, round(image.width * upscale)), max(1, round(image.height * upscale))),
                                     Image.BICUBIC)
            margin = round(border * max(image.size))
            for page in binarized_pages(image):
                if margin:
                    page = ImageOps.expand(page, margin, fill=255)
                path = os.path.join(tmp, f"{len(paths):06d}.png")
                page.save(path)
                paths.append(path)
                margins.append(margin)
                owner.append(i)
        if not paths:
            return [[] for _ in images]
        listing = os.path.join(tmp, "images.txt")
        with open(listing, "w") as f:
            f.write("\n".join(paths) + "\n")
        # One thread per process: Ray runs several OCR actors side by side. The pages are
        # already in both polarities: tesseract's own retry of inverted lines is redundant.
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        proc = subprocess.run([binary, listing, "stdout", "-l", languages, "--psm", str(psm),
                               "-c", "tessedit_do_invert=0", "tsv"],
                              capture_output=True, text=True, env=env, timeout=TESSERACT_TIMEOUT_S)
    if proc.returncode != 0:
        raise OcrError(f"tesseract exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    pages = parse_tsv(proc.stdout, len(paths), min_confidence=min_confidence, scale=upscale, offsets=margins)
    found: list[list[Word]] = [[] for _ in images]
    for i, words in zip(owner, pages):
        found[i].extend(words)
    return [merge_words(words) for words in found]


def merge_words(words: Sequence[Word], min_overlap: float = 0.5) -> list[Word]:
    """One word per place: of words whose boxes overlap by more than ``min_overlap`` of the
    smaller box (the same letters read on two pages) the most confident is kept; the result
    in reading order (top to bottom by line, then left to right)."""
    kept: list[Word] = []
    for w in sorted(words, key=lambda w: -w.confidence):
        if all(_overlap(w, k) <= min_overlap * min(w.area, k.area) for k in kept):
            kept.append(w)
    line = max(1, int(np.median([w.height for w in kept]))) if kept else 1
    return sorted(kept, key=lambda w: ((w.top + w.height // 2) // line, w.left))


def _overlap(a: Word, b: Word) -> int:
    dx = min(a.left + a.width, b.left + b.width) - max(a.left, b.left)
    dy = min(a.top + a.height, b.top + b.height) - max(a.top, b.top)
    return max(0, dx) * max(0, dy)


def parse_tsv(tsv: str, n_pages: int, *, min_confidence: float, scale: float = 1.0,
              offsets: Sequence[int] | None = None) -> list[list[Word]]:
    """tesseract's TSV (level 5 rows are words; page_num is 1-based) -> words per page, boxes
    mapped back through each page's margin (``offsets``) and the ``scale``."""
    pages: list[list[Word]] = [[] for _ in range(n_pages)]
    for line in tsv.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) != 12 or cols[0] != "5":
            continue
        text = cols[11].strip()
        try:
            conf = float(cols[10])
            page = int(cols[1]) - 1
        except ValueError:
            continue
        if conf < min_confidence or sum(ch.isalnum() for ch in text) < 2 or not 0 <= page < n_pages:
            continue
        left, top, width, height = (int(v) for v in cols[6:10])
        offset = offsets[page] if offsets else 0
        left, top = round((left - offset) / scale), round((top - offset) / scale)
        width, height = round(width / scale), round(height / scale)
        pages[page].append(Word(text, conf, left, top, width, height))
    return pages


def text_area_fraction(words: Sequence[Word], width: int, height: int) -> float:
    """Fraction of the image covered by word boxes (overlaps counted once)."""
    if not words or width <= 0 or height <= 0:
        return 0.0
    mask = np.zeros((height, width), dtype=bool)
    for w in words:
        mask[max(0, w.top):max(0, w.top + w.height), max(0, w.left):max(0, w.left + w.width)] = True
    return float(mask.mean())
