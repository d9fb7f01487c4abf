"""Checks of the files a curation run needs, before anything runs (its own module: the
CLIP and OCR modules read the config's dataclasses, so config.py cannot import them)."""
from __future__ import annotations

from .config import CLIP_STAGES, CurationConfig


def validate_files(cfg: CurationConfig) -> None:
    """Errors the user must fix, before anything runs: the CLIP model files of the selected
    CLIP stages (present, and fitting the architecture), and the tesseract binary and
    language data of the OCR stages."""
    if any(s.name in CLIP_STAGES for s in cfg.stages):
        from .clip_model import check_clip_files

        check_clip_files(cfg.clip)
    for stage in cfg.stages:
        if stage.name in ("ocr", "text_overlay"):
            from .ocr import check_tesseract

            check_tesseract(stage.languages)
