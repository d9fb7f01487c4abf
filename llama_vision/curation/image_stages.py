"""Image-text stages: per-batch functions (and Ray actor classes for the model-backed ones).

Each takes a batch (curation.io columns plus those of earlier stages) and returns it with its
own ``<stage>__*`` columns (curation.batches). The global stages (phash_dedup,
semantic_dedup, concept_resample, a clip_score keep_fraction) compute their per-sample
signals here and decide in curation.dedup / curation.resample once the whole corpus is
scanned.
"""

from __future__ import annotations

import hashlib
import io
from typing import Sequence

import numpy as np
from PIL import Image

from llama_vision.data.image_io import ImageLoadError, load_image

from .batches import chunks, column, live_rows, object_array, reason_column, text_column, timed
from .clip_model import ClipModel, clip_device, set_actor_threads
from .config import ClipConfig, OcrConfig, PhashDedupConfig, ResolutionConfig
from .io import IMAGE_FORMAT_EXT
from .ocr import OcrError, check_tesseract, ocr_images, text_area_fraction

BAD_IMAGE = "bad_image"
EMBEDDING = "clip__image_embedding"  # shared by clip_score and semantic_dedup
OCR_IMAGES_PER_PROCESS = 256  # one tesseract process per this many images (its ~0.1 s start-up)


def open_image(data: bytes) -> Image.Image:
    """Decoded RGB image of bytes that decode_images already validated."""
    return load_image(data)


def decode_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate every image strictly (llama_vision.data.image_io.load_image): corrupt,
    truncated or empty files become ``skip = bad_image`` with the decoder's message. Adds
    ``width``, ``height`` (int32) and ``ext`` (member extension for the output shard)."""
    n = len(batch["skip"])
    width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
    ext = text_column(n, "jpg")
    skip, message = object_array(batch["skip"]), object_array(batch["message"])
    with timed(batch, "decode"):
        for i in np.flatnonzero(live_rows(batch)):
            try:
                image = load_image(batch["media"][i])  # strict: its messages name no memory address
                fmt = Image.open(io.BytesIO(batch["media"][i])).format
            except (ImageLoadError, OSError, ValueError) as exc:
                skip[i], message[i] = BAD_IMAGE, str(exc)
                continue
            width[i], height[i] = image.size
            ext[i] = IMAGE_FORMAT_EXT.get(fmt or "", "jpg")
    batch.update(width=width, height=height, ext=ext, skip=skip, message=message)
    return batch


def resolution(batch: dict[str, np.ndarray], cfg: ResolutionConfig, prior: Sequence[str] = ()) -> dict:
    """``resolution__reason``: too_small / too_large / bad_aspect from the decoded size."""
    reasons = text_column(len(batch["skip"]))
    with timed(batch, cfg.name):
        for i in np.flatnonzero(live_rows(batch, prior)):
            short, long = sorted((int(batch["width"][i]), int(batch["height"][i])))
            if short < cfg.min_side:
                reasons[i] = "too_small"
            elif long > cfg.max_side:
                reasons[i] = "too_large"
            elif long > cfg.max_aspect * short:
                reasons[i] = "bad_aspect"
    batch[reason_column(cfg.name)] = reasons
    return batch


def phash_signals(batch: dict[str, np.ndarray], cfg: PhashDedupConfig, prior: Sequence[str] = ()) -> dict:
    """``phash_dedup__phash`` (uint64, imagehash.phash: 8x8 DCT of the 32x32 greyscale) and
    ``phash_dedup__digest`` (uint64 prefix of the bytes' SHA-256, for exact copies); both 0
    on rows the stage does not see (``phash_dedup__valid`` False)."""
    import imagehash

    n = len(batch["skip"])
    phash, digest, valid = np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n, bool)
    with timed(batch, cfg.name):
        for i in np.flatnonzero(live_rows(batch, prior)):
            bits = imagehash.phash(open_image(batch["media"][i])).hash.flatten()
            phash[i] = np.packbits(bits).view(">u8")[0]
            digest[i] = int.from_bytes(hashlib.sha256(batch["media"][i]).digest()[:8], "big")
            valid[i] = True
    batch[column(cfg.name, "phash")] = phash
    batch[column(cfg.name, "digest")] = digest
    batch[column(cfg.name, "valid")] = valid
    return batch


class ClipImageEmbedder:
    """Ray actor (one model load per actor): ``clip__image_embedding`` float32 [B, D] of
    the live rows, and with ``score_stage`` the CLIP score ``<score_stage>__score``
    (cosine of image and caption embeddings; NaN elsewhere) and, for a fixed threshold,
    its verdict ``<score_stage>__reason`` = ``low_clip_score``."""

    def __init__(self, clip: ClipConfig, score_stage: str | None = None, threshold: float | None = None,
                 prior: Sequence[str] = ()):
        set_actor_threads(clip.num_cpus)
        self.model = ClipModel(clip, device=clip_device(clip))
        self.score_stage, self.threshold, self.prior = score_stage, threshold, tuple(prior)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["skip"])
        with timed(batch, "clip"):
            live = np.flatnonzero(live_rows(batch, self.prior))
            emb = np.zeros((n, self.model.dim), np.float32)
            # Decode one model batch at a time: Ray may hand over a whole shard's block.
            for rows in chunks(live, self.model.batch_size):
                emb[rows] = self.model.embed_images([open_image(batch["media"][i]) for i in rows])
            batch[EMBEDDING] = emb
            if self.score_stage:
                score = np.full(n, np.nan, np.float32)
                if len(live):
                    text = self.model.embed_texts([batch["text"][i] for i in live])
                    score[live] = np.sum(emb[live] * text, axis=1)
                reasons = text_column(n)
                if self.threshold is not None:
                    for i in live:
                        if score[i] < self.threshold:
                            reasons[i] = "low_clip_score"
                batch[column(self.score_stage, "score")] = score
                batch[reason_column(self.score_stage)] = reasons
        return batch


class TesseractOcr:
    """Ray actor: ``ocr__text`` (recognised words, reading order, space-joined),
    ``ocr__words`` (count) and ``ocr__text_fraction`` (area of the word boxes / image
    area); ``ocr__error`` when tesseract failed on the batch. Nothing is removed."""

    def __init__(self, cfg: OcrConfig, prior: Sequence[str] = ()):
        self.cfg, self.prior = cfg, tuple(prior)
        self.binary = check_tesseract(cfg.languages)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg, n = self.cfg, len(batch["skip"])
        text, error = text_column(n), text_column(n)
        words_n, fraction = np.zeros(n, np.int32), np.zeros(n, np.float32)
        with timed(batch, cfg.name):
            for rows in chunks(np.flatnonzero(live_rows(batch, self.prior)), OCR_IMAGES_PER_PROCESS):
                images = [open_image(batch["media"][i]) for i in rows]
                try:
                    found = ocr_images(images, languages=cfg.languages, psm=cfg.psm,
                                       min_confidence=cfg.min_confidence, upscale=cfg.upscale, border=cfg.border,
                                       binary=self.binary)
                except (OcrError, OSError) as exc:  # recorded per sample; the samples are kept
                    found = [[] for _ in images]
                    error[rows] = str(exc)
                for i, image, words in zip(rows, images, found):
                    text[i] = " ".join(w.text for w in words)
                    words_n[i] = len(words)
                    fraction[i] = text_area_fraction(words, image.width, image.height)
        batch[column(cfg.name, "text")] = text
        batch[column(cfg.name, "words")] = words_n
        batch[column(cfg.name, "text_fraction")] = fraction
        batch[column(cfg.name, "error")] = error
        return batch


__all__ = [
    "BAD_IMAGE",
    "EMBEDDING",
    "ClipImageEmbedder",
    "TesseractOcr",
    "decode_images",
    "phash_signals",
    "resolution",
]
