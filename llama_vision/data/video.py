"""Video reading for the video adapter: uniform frame sampling with decord.

The Llama 3 video adapter sees up to 64 frames sampled uniformly over the whole clip, each
frame tiled like an image. This module turns a video file into those frames.

Frame sampling (``sampling="uniform"``)
---------------------------------------
A clip of ``T`` frames (the count the container reports, ``len(decord.VideoReader)``) is cut
into ``N = num_frames`` equal segments and the frame at the centre of each segment is taken::

    index_k = floor((k + 0.5) * T / N) = ((2k + 1) * T) // (2N),   k = 0 .. N-1

computed with integers, so it is exact. Indices are frame numbers, not timestamps: a
variable-frame-rate clip is sampled evenly in frames, never by seeking to times.

Short clips (``T < N``)
-----------------------
* ``short="repeat"`` (default): the same formula, which then repeats indices in order
  (T=5, N=8 -> 0 0 1 2 2 3 4 4). Every returned frame is real; ``info.valid == N``.
* ``short="pad"``: all ``T`` frames in order (0 .. T-1), then ``N - T`` black (all-zero)
  frames at the end; ``info.valid == T`` and ``info.frame_indices`` lists the T real ones.

With ``T >= N`` both modes are identical and ``info.valid == N``.

Errors
------
Every failure to read a file (missing, empty, corrupt, truncated, no video stream, codec the
decoder cannot handle) raises :class:`VideoLoadError` (a ``ValueError``) that names the file
and the cause; decord's own exceptions and C++ traces are never passed on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "VideoInfo",
    "VideoLoadError",
    "VideoProcessor",
    "frames_to_pil",
    "load_video",
    "uniform_indices",
]

# FFmpeg error codes decord embeds in its "cannot find video stream" message. They tell an
# audio-only file (no video stream at all) from a video stream FFmpeg has no decoder for.
_AVERROR_STREAM_NOT_FOUND = -1381258232  # FFERRTAG(0xF8, 'S', 'T', 'R')
_AVERROR_DECODER_NOT_FOUND = -1128613112  # FFERRTAG(0xF8, 'D', 'E', 'C')


class VideoLoadError(ValueError):
    """A video file could not be read; the message names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"cannot load video {self.path!r}: {cause}")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`load_video` read.

    Attributes:
        path: the file, as given.
        total_frames: frames in the video stream (``T``, from the container's index).
        fps: average frame rate the container reports.
        duration_s: end time of the last frame in seconds (``T / fps`` for constant rate).
        frame_indices: source frame index of each returned real frame, in order
            (length ``valid``; repeats in ``short="repeat"`` mode for short clips).
        valid: number of real frames at the front of the returned tensor; the rest
            (only with ``short="pad"``) are black padding.
        height, width: frame size in pixels.
    """

    path: str
    total_frames: int
    fps: float
    duration_s: float
    frame_indices: tuple[int, ...]
    valid: int
    height: int
    width: int


def uniform_indices(total_frames: int, num_frames: int) -> list[int]:
    """Centres of ``num_frames`` equal segments of ``range(total_frames)``.

    ``index_k = ((2k + 1) * total_frames) // (2 * num_frames)``. Strictly increasing when
    ``total_frames >= num_frames``; non-decreasing with repeats otherwise.
    """
    if total_frames < 1 or num_frames < 1:
        raise ValueError(f"need total_frames >= 1 and num_frames >= 1, got {total_frames}, {num_frames}")
    return [((2 * k + 1) * total_frames) // (2 * num_frames) for k in range(num_frames)]


def _import_decord():
    try:
        import decord
    except ImportError as exc:  # keep the package importable without decord
        raise ImportError(
            "llama_vision.data.video.load_video needs decord to read videos: pip install decord"
        ) from exc
    return decord


def _clean_decord_message(exc: BaseException) -> str:
    """decord messages start with '[hh:mm:ss] /path/file.cc:123: '; keep only the text."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text)


def _probe_streams(path: str) -> str | None:
    """Describe the file's streams with PyAV (e.g. "audio (aac)"), or None if unavailable.

    Only used to make error messages precise; decord does the actual decoding.
    """
    try:
        import av

        with av.open(path) as container:
            # canonical_name is the format ("av1"), name the decoder PyAV picked ("libdav1d")
            parts = [
                f"{s.type} ({getattr(s.codec_context.codec, 'canonical_name', s.codec_context.name)})"
                for s in container.streams
            ]
        return ", ".join(parts) if parts else "no streams"
    except Exception as exc:  # a probe must never replace the real error
        reason = getattr(exc, "strerror", None) or str(exc)
        return f"FFmpeg: {reason}" if reason else None


def _open_error(path: str, exc: BaseException) -> VideoLoadError:
    """Translate a failure of decord.VideoReader(path) into a VideoLoadError."""
    message = _clean_decord_message(exc)
    if "cannot find video stream" in message:
        if str(_AVERROR_DECODER_NOT_FOUND) in message:
            cause = "unsupported video codec (decord's FFmpeg has no decoder for it)"
        else:
            cause = "no video stream (audio-only or data-only file?)"
        streams = _probe_streams(path)
        if streams and not streams.startswith("FFmpeg:"):
            cause += f"; streams found: {streams}"
        return VideoLoadError(path, cause)
    if not message.startswith("Error reading"):
        # The container opened but building the frame index failed part-way.
        return VideoLoadError(path, f"corrupt or truncated video data ({message})")
    # decord says only "Error reading <file>..." here; FFmpeg's reason went to stderr.
    detail = _probe_streams(path)
    cause = "not a readable video container (corrupt, truncated or not a video file)"
    if detail and detail.startswith("FFmpeg:"):
        cause += f"; {detail}"
    return VideoLoadError(path, cause)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoLoadError(path, "file not found")
    if os.path.isdir(path):
        raise VideoLoadError(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoLoadError(path, "file is empty (0 bytes)")


def _make_context(decord, ctx: str):
    if ctx == "cpu":
        return decord.cpu(0)
    if ctx == "gpu":
        return decord.gpu(0)
    raise ValueError(f"ctx must be 'cpu' or 'gpu', got {ctx!r}")


def load_video(
    path: str | os.PathLike,
    num_frames: int,
    sampling: str = "uniform",
    short: str = "repeat",
    ctx: str = "cpu",
) -> tuple[torch.Tensor, VideoInfo]:
    """Read ``num_frames`` frames sampled uniformly over a video (see the module docstring).

    Args:
        path: video file (anything FFmpeg inside decord reads: mp4, mkv, webm, ...).
        num_frames: N, frames to return (>= 1).
        sampling: only ``"uniform"`` (centre of N equal segments).
        short: ``"repeat"`` or ``"pad"``: what to do when the clip has fewer than N frames.
        ctx: ``"cpu"`` or ``"gpu"`` (NVDEC via ``decord.gpu(0)``; needs decord built with
            CUDA). Frames are always returned on the CPU.

    Returns:
        frames: uint8 tensor ``[num_frames, H, W, 3]`` (RGB).
        info: :class:`VideoInfo`.

    Raises:
        VideoLoadError: the file is missing, empty, corrupt, truncated, has no video
            stream or uses a codec decord cannot decode.
        RuntimeError: ``ctx="gpu"`` but this decord has no CUDA support.
        ValueError: bad arguments.
        ImportError: decord is not installed.
    """
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    num_frames = int(num_frames)
    if sampling != "uniform":
        raise ValueError(f"sampling must be 'uniform', got {sampling!r}")
    if short not in ("repeat", "pad"):
        raise ValueError(f"short must be 'repeat' or 'pad', got {short!r}")
    path = os.fspath(path)
    decord = _import_decord()
    context = _make_context(decord, ctx)
    _check_file(path)

    decode_errors = (RuntimeError, decord.DECORDError)
    try:
        reader = decord.VideoReader(path, ctx=context)
    except decode_errors as exc:
        if "CUDA not enabled" in str(exc):
            raise RuntimeError(
                "ctx='gpu' needs decord built with CUDA (NVDEC); the installed decord has no "
                "CUDA support. Use ctx='cpu' or build decord with -DUSE_CUDA=ON."
            ) from None
        raise _open_error(path, exc) from None

    total = len(reader)
    if total < 1:
        raise VideoLoadError(path, "the video stream has no frames")
    fps = float(reader.get_avg_fps())

    if total < num_frames and short == "pad":
        indices = list(range(total))
    else:
        indices = uniform_indices(total, num_frames)

    # Decode each distinct frame once; repeats (short clips) are gathered afterwards.
    unique = sorted(set(indices))
    try:
        decoded = reader.get_batch(unique).asnumpy()
        duration_s = float(reader.get_frame_timestamp(total - 1)[1])
    except decode_errors as exc:
        raise VideoLoadError(
            path, f"decoding failed, the file is truncated or corrupt ({_clean_decord_message(exc)})"
        ) from None
    finally:
        del reader  # release the FFmpeg context now, not at garbage collection

    position = {index: row for row, index in enumerate(unique)}
    real = torch.from_numpy(np.ascontiguousarray(decoded[[position[i] for i in indices]]))
    height, width = int(real.shape[1]), int(real.shape[2])
    if real.shape[0] < num_frames:  # short="pad": black frames at the end
        pad = torch.zeros((num_frames - real.shape[0], height, width, 3), dtype=torch.uint8)
        frames = torch.cat([real, pad], dim=0)
    else:
        frames = real
    if duration_s <= 0 and fps > 0:  # containers without usable timestamps
        duration_s = total / fps
    info = VideoInfo(
        path=path,
        total_frames=total,
        fps=fps,
        duration_s=duration_s,
        frame_indices=tuple(indices),
        valid=len(indices),
        height=height,
        width=width,
    )
    return frames, info


def frames_to_pil(frames: torch.Tensor | np.ndarray) -> list:
    """uint8 frames ``[F, H, W, 3]`` (tensor or array) -> list of F RGB ``PIL.Image``."""
    from PIL import Image

    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must have shape [F, H, W, 3], got {tuple(array.shape)}")
    if array.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {array.dtype}")
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in array]  # uint8 HxWx3 -> RGB


class VideoProcessor:
    """Video file -> tiled frames for the image encoder.

    Each sampled frame goes through an image processor (by default
    ``llama_vision.data.image.ImageProcessor(tile_size, max_num_tiles)``), which returns
    ``(tiles [n, 3, S, S], (h_tiles, w_tiles))``. All frames of a clip share one size, so
    they share one tile grid.

    ``__call__(path)`` returns:
        video_tiles: float32 ``[num_frames, max_num_tiles, 3, S, S]``; tile slots beyond the
            grid and the padded frames of ``short="pad"`` are exact zeros (like missing
            image tiles).
        aspect_ratio: ``(h_tiles, w_tiles)``.
        info: :class:`VideoInfo` (``info.valid`` real frames first).
    """

    def __init__(
        self,
        num_frames: int,
        tile_size: int,
        max_num_tiles: int = 1,
        image_processor: Any | None = None,
        sampling: str = "uniform",
        short: str = "repeat",
        ctx: str = "cpu",
    ):
        if tile_size < 1 or max_num_tiles < 1:
            raise ValueError(f"need tile_size >= 1 and max_num_tiles >= 1, got {tile_size}, {max_num_tiles}")
        self.num_frames = num_frames
        self.tile_size = tile_size
        self.max_num_tiles = max_num_tiles
        self.sampling = sampling
        self.short = short
        self.ctx = ctx
        if image_processor is None:
            # Imported here so this module does not depend on the image pipeline at import.
            from llama_vision.data.image import ImageProcessor

            image_processor = ImageProcessor(tile_size, max_num_tiles)
        self.image_processor = image_processor

    def __call__(self, path: str | os.PathLike) -> tuple[torch.Tensor, tuple[int, int], VideoInfo]:
        frames, info = load_video(path, self.num_frames, self.sampling, self.short, self.ctx)
        size = self.tile_size
        out = torch.zeros((self.num_frames, self.max_num_tiles, 3, size, size), dtype=torch.float32)
        aspect_ratio: tuple[int, int] | None = None
        for i, image in enumerate(frames_to_pil(frames[: info.valid])):
            tiles, grid = self.image_processor(image)
            grid = (int(grid[0]), int(grid[1]))
            tiles = torch.as_tensor(tiles)
            if tiles.shape[0] > self.max_num_tiles or tuple(tiles.shape[1:]) != (3, size, size):
                raise ValueError(
                    f"image processor returned tiles of shape {tuple(tiles.shape)}; expected at most "
                    f"{self.max_num_tiles} tiles of shape (3, {size}, {size})"
                )
            if aspect_ratio is not None and grid != aspect_ratio:
                raise ValueError(f"frames of {info.path!r} were tiled differently: {aspect_ratio} vs {grid}")
            aspect_ratio = grid
            out[i, : tiles.shape[0]] = tiles.to(torch.float32)
        assert aspect_ratio is not None  # load_video returns at least one real frame
        return out, aspect_ratio, info
