"""OCR with tesseract (Debian package ``tesseract-ocr``), many images per process.

Starting tesseract costs ~0.1 s (it loads its LSTM model), more than reading a small
picture, so a batch of images is written to a temporary folder and handed to ONE tesseract
process as a list file; its TSV output has a ``page_num`` column that maps each word back
to its image. Words come with their box and confidence; only words of at least
``min_confidence`` with two or more letters/digits are kept: tesseract reads texture and
shapes as short words of low confidence (30-70 on the test corpus, real overlaid words
88-96).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Sequence

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


def ocr_images(images: Sequence[Image.Image], *, languages: str = "eng", psm: int = 11, min_confidence: float = 80.0,
               upscale: float = 1.0, border: float = 0.4, binary: str = "tesseract") -> list[list[Word]]:
    """Words found in each image (boxes in the image's own pixels).

    ``upscale`` scales the image first; a black margin of ``border`` times its longer side
    is then added around it: tesseract's page layout analysis misses text that runs to the
    image edge (a banner across a frame), a long-known tesseract trait."""
    if not images:
        return []
    with tempfile.TemporaryDirectory(prefix="curate-ocr-") as tmp:
        paths, margins = [], []
        for i, image in enumerate(images):
            if upscale != 1.0:
                image = image.resize((max(1, round(image.width * upscale)), max(1, round(image.height * upscale))),
                                     Image.BICUBIC)
            margin = round(border * max(image.size))
            if margin:
                image = ImageOps.expand(image.convert("RGB"), margin, fill=(0, 0, 0))
            margins.append(margin)
            path = os.path.join(tmp, f"{i:06d}.png")
            image.save(path)
            paths.append(path)
        listing = os.path.join(tmp, "images.txt")
        with open(listing, "w") as f:
            f.write("\n".join(paths) + "\n")
        # One thread per process: Ray runs several OCR actors side by side.
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        proc = subprocess.run([binary, listing, "stdout", "-l", languages, "--psm", str(psm), "tsv"],
                              capture_output=True, text=True, env=env, timeout=TESSERACT_TIMEOUT_S)
    if proc.returncode != 0:
        raise OcrError(f"tesseract exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return parse_tsv(proc.stdout, len(images), min_confidence=min_confidence, scale=upscale, offsets=margins)


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
    import numpy as np

    mask = np.zeros((height, width), dtype=bool)
    for w in words:
        mask[max(0, w.top):max(0, w.top + w.height), max(0, w.left):max(0, w.left + w.width)] = True
    return float(mask.mean())
