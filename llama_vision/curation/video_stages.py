"""Video-text stages: per-batch functions and Ray actor classes (see image_stages).

decode_videos reads each clip once (llama_vision.data.video.load_video: decord, PyAV
fallback), samples ``frames.num_frames`` frames uniformly and resizes them to
``frames.size`` squared; the frame-based stages (text_overlay, video_text_similarity,
motion) share those frames (column ``frames``, uint8 [B, F, S, S, 3], dropped before
anything is written). A clip neither decoder reads is ``skip = bad_video``.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image

from .batches import column, live_rows, object_array, reason_column, text_column, timed
from .clip_model import ClipModel, clip_device, set_actor_threads
from .config import ClipConfig, FramesConfig, MotionConfig, TextOverlayConfig, VideoLimitsConfig
from .io import sniff_video_ext
from .ocr import OcrError, check_tesseract, ocr_images, text_area_fraction

BAD_VIDEO = "bad_video"
FRAME_COLUMNS = ("frames",)  # in-flight only


def decode_videos(batch: dict[str, np.ndarray], frames: FramesConfig) -> dict[str, np.ndarray]:
    """Adds ``frames`` (uint8 [B, F, S, S, 3], zeros for unreadable rows), ``thumb`` (JPEG
    of the middle frame, for contact sheets), ``width``/``height`` (int32, as encoded),
    ``fps``, ``duration_s``, ``frame_step_s`` (float32: mean time between sampled frames),
    ``num_frames`` (int32, in the container) and ``ext``."""
    import cv2

    from llama_vision.data.video import VideoLoadError, load_video

    n, f, s = len(batch["skip"]), frames.num_frames, frames.size
    out = np.zeros((n, f, s, s, 3), np.uint8)
    thumb = np.empty(n, dtype=object)
    thumb[:] = [b""] * n
    width, height, total = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
    fps, duration, step = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    ext = text_column(n, "mp4")
    skip, message = object_array(batch["skip"]), object_array(batch["message"])
    with timed(batch, "decode"), tempfile.TemporaryDirectory(prefix="curate-video-") as tmp:
        for i in np.flatnonzero(live_rows(batch)):
            data = batch["media"][i]
            ext[i] = sniff_video_ext(data)
            path = os.path.join(tmp, f"clip.{ext[i]}")  # decord reads files, not bytes
            with open(path, "wb") as fh:
                fh.write(data)
            try:
                clip, info = load_video(path, f)
            except VideoLoadError as exc:
                skip[i], message[i] = BAD_VIDEO, str(exc).replace(path, f"<{batch['key'][i]}>")
                continue
            arr = clip.numpy()
            for k in range(f):
                out[i, k] = cv2.resize(arr[k], (s, s), interpolation=cv2.INTER_AREA)
            width[i], height[i], total[i] = info.width, info.height, info.total_frames
            fps[i], duration[i] = info.fps, info.duration_s
            idx = np.asarray(info.frame_indices, np.float64)
            step[i] = float(np.mean(np.diff(idx)) / info.fps) if len(idx) > 1 and info.fps > 0 else 0.0
            buf = io.BytesIO()
            Image.fromarray(out[i, f // 2]).save(buf, format="JPEG", quality=85)
            thumb[i] = buf.getvalue()
    batch.update(frames=out, thumb=thumb, width=width, height=height, fps=fps, duration_s=duration,
                 frame_step_s=step, num_frames=total, ext=ext, skip=skip, message=message)
    return batch


def video_limits(batch: dict[str, np.ndarray], cfg: VideoLimitsConfig, prior: Sequence[str] = ()) -> dict:
    """``video_limits__reason``: too_short / too_long / low_fps / high_fps /
    low_resolution / bad_aspect from the container's metadata."""
    reasons = text_column(len(batch["skip"]))
    with timed(batch, cfg.name):
        for i in np.flatnonzero(live_rows(batch, prior)):
            short, long = sorted((int(batch["width"][i]), int(batch["height"][i])))
            dur, fps = float(batch["duration_s"][i]), float(batch["fps"][i])
            if dur < cfg.min_duration_s:
                reasons[i] = "too_short"
            elif dur > cfg.max_duration_s:
                reasons[i] = "too_long"
            elif fps < cfg.min_fps:
                reasons[i] = "low_fps"
            elif fps > cfg.max_fps:
                reasons[i] = "high_fps"
            elif short < cfg.min_side:
                reasons[i] = "low_resolution"
            elif long > cfg.max_aspect * short:
                reasons[i] = "bad_aspect"
    batch[reason_column(cfg.name)] = reasons
    return batch


def motion(batch: dict[str, np.ndarray], cfg: MotionConfig, prior: Sequence[str] = ()) -> dict:
    """``motion__score`` and ``motion__reason`` (``low_motion`` below ``min_motion``).

    diff: per pixel the largest change over the three colour channels (a red shape moving
    over a grey background of the same brightness changes colour, not grey level), minus
    ``noise_floor`` (sensor and compression noise), averaged (0-1) and divided by the time
    between the sampled frames. flow: dense optical flow (cv2.calcOpticalFlowFarneback)
    between consecutive sampled frames, mean magnitude in frame diagonals per second. Both
    are per second, so independent of how many frames were sampled; flow also of the
    resolution."""
    import cv2

    n = len(batch["skip"])
    score = np.full(n, np.nan, np.float32)
    reasons = text_column(n)
    with timed(batch, cfg.name):
        for i in np.flatnonzero(live_rows(batch, prior)):
            frames = batch["frames"][i]
            dt = max(float(batch["frame_step_s"][i]), 1e-3)
            per_pair = []
            if cfg.method == "flow":
                grey = [cv2.cvtColor(fr, cv2.COLOR_RGB2GRAY) for fr in frames]
                diag = float(np.hypot(*grey[0].shape))
                for a, b in zip(grey, grey[1:]):
                    flow = cv2.calcOpticalFlowFarneback(a, b, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3,
                                                        poly_n=5, poly_sigma=1.2, flags=0)
                    per_pair.append(float(np.linalg.norm(flow, axis=-1).mean()) / diag)
            else:
                rgb = frames.astype(np.float32)
                for a, b in zip(rgb, rgb[1:]):
                    change = np.abs(a - b).max(axis=-1) - cfg.noise_floor
                    per_pair.append(float(np.maximum(change, 0).mean()) / 255.0)
            score[i] = float(np.mean(per_pair)) / dt if per_pair else 0.0
            if score[i] < cfg.min_motion:
                reasons[i] = "low_motion"
    batch[column(cfg.name, "score")] = score
    batch[reason_column(cfg.name)] = reasons
    return batch


def _pick_frames(num_frames: int, k: int) -> list[int]:
    """k of the sampled frames, spread evenly (centres of k equal segments)."""
    k = max(1, min(k, num_frames))
    return [((2 * j + 1) * num_frames) // (2 * k) for j in range(k)]


class TextOverlayOcr:
    """Ray actor: ``text_overlay__fraction`` (mean over ``ocr_frames`` frames of the area of
    tesseract's word boxes / frame area), ``text_overlay__text`` (words of the first such
    frame with text) and ``text_overlay__reason`` = ``overlaid_text`` above
    ``max_text_fraction``. All frames of a batch go to one tesseract process."""

    def __init__(self, cfg: TextOverlayConfig, prior: Sequence[str] = ()):
        self.cfg, self.prior = cfg, tuple(prior)
        self.binary = check_tesseract(cfg.languages)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg, n = self.cfg, len(batch["skip"])
        fraction = np.full(n, np.nan, np.float32)
        text, reasons, error = text_column(n), text_column(n), text_column(n)
        with timed(batch, cfg.name):
            live = np.flatnonzero(live_rows(batch, self.prior))
            if len(live):
                picks = _pick_frames(batch["frames"].shape[1], cfg.ocr_frames)
                images = [Image.fromarray(batch["frames"][i, k]) for i in live for k in picks]
                try:
                    found = ocr_images(images, languages=cfg.languages, psm=cfg.psm, min_confidence=cfg.min_confidence,
                                       upscale=cfg.upscale, border=cfg.border, binary=self.binary)
                except (OcrError, OSError) as exc:
                    found = None
                    for i in live:
                        error[i] = str(exc)
                if found is not None:
                    size = batch["frames"].shape[2:4]
                    tallest = cfg.max_word_height * size[0]
                    for j, i in enumerate(live):
                        pages = [[w for w in page if w.height <= tallest]
                                 for page in found[j * len(picks):(j + 1) * len(picks)]]
                        fraction[i] = float(np.mean([text_area_fraction(w, size[1], size[0]) for w in pages]))
                        text[i] = next((" ".join(x.text for x in w) for w in pages if w), "")
                        if fraction[i] > cfg.max_text_fraction:
                            reasons[i] = "overlaid_text"
        batch[column(cfg.name, "fraction")] = fraction
        batch[column(cfg.name, "text")] = text
        batch[column(cfg.name, "error")] = error
        batch[reason_column(cfg.name)] = reasons
        return batch


class ClipVideoScorer:
    """Ray actor: ``video_text_similarity__score``, the cosine of the mean of the frames'
    CLIP image embeddings (re-normalised) and the caption's embedding, and its verdict
    ``low_similarity`` below a fixed threshold."""

    def __init__(self, clip: ClipConfig, stage: str, threshold: float | None, prior: Sequence[str] = ()):
        set_actor_threads(clip.num_cpus)
        self.model = ClipModel(clip, device=clip_device(clip))
        self.stage, self.threshold, self.prior = stage, threshold, tuple(prior)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["skip"])
        score = np.full(n, np.nan, np.float32)
        reasons = text_column(n)
        with timed(batch, self.stage):
            live = np.flatnonzero(live_rows(batch, self.prior))
            if len(live):
                f = batch["frames"].shape[1]
                frames = [Image.fromarray(batch["frames"][i, k]) for i in live for k in range(f)]
                emb = self.model.embed_images(frames).reshape(len(live), f, -1).mean(axis=1)
                emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
                text = self.model.embed_texts([batch["text"][i] for i in live])
                score[live] = np.sum(emb * text, axis=1)
                if self.threshold is not None:
                    for i in live:
                        if score[i] < self.threshold:
                            reasons[i] = "low_similarity"
        batch[column(self.stage, "score")] = score
        batch[reason_column(self.stage)] = reasons
        return batch
