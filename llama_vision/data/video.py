"""Video reading for the video adapter: uniform frame sampling with decord (PyAV fallback).

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

Decoders
--------
decord reads the file first. When it cannot open or decode it, or hands back malformed
frames (decord 0.6 returns 6-channel frames for a valid 16x16 H.264 clip and 4-channel ones
for a clip with a 90-degree display rotation), the file is read again with PyAV under the
same contract: the frame count is the number of packets of the best video stream (decord
indexes one frame per packet), frames are ordered by pts, the same indices are sampled, RGB
frames are scaled to the stream's size and turned by its display rotation as decord does,
``fps`` is the stream's average rate and ``duration_s`` the end time of the last frame.
``info.decoder`` says which decoder produced the frames.

Errors
------
Every failure to read a file (missing, empty, corrupt, truncated, no video stream, codec the
decoder cannot handle) raises :class:`VideoLoadError` (a ``ValueError``) that names the file
and the cause, once both decoders failed; decord's and PyAV's own exceptions and C++ traces
are never passed on.
"""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)

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
        decoder: ``"decord"``, or ``"pyav"`` when decord failed on the file and PyAV
            read it instead (see the module docstring).
    """

    path: str
    total_frames: int
    fps: float
    duration_s: float
    frame_indices: tuple[int, ...]
    valid: int
    height: int
    width: int
    decoder: str = "decord"


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

    Only used to make decord's error messages precise (the PyAV fallback decodes separately).
    """
    try:
        import av
    except ImportError:
        return None
    try:
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
        path: video file (anything FFmpeg inside decord or PyAV reads: mp4, mkv, webm, ...).
        num_frames: N, frames to return (>= 1).
        sampling: only ``"uniform"`` (centre of N equal segments).
        short: ``"repeat"`` or ``"pad"``: what to do when the clip has fewer than N frames.
        ctx: ``"cpu"`` or ``"gpu"`` (NVDEC via ``decord.gpu(0)``; needs decord built with
            CUDA). Frames are always returned on the CPU. The PyAV fallback always decodes
            on the CPU.

    Returns:
        frames: uint8 tensor ``[num_frames, H, W, 3]`` (RGB).
        info: :class:`VideoInfo`.

    Raises:
        VideoLoadError: the file is missing, empty, corrupt, truncated, has no video
            stream or uses a codec neither decord nor PyAV can decode.
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

    try:
        decoded = _read_with_decord(decord, context, path, num_frames, short)
    except VideoLoadError as decord_error:
        try:
            decoded = _read_with_pyav(path, num_frames, short)
        except _PyAVFailed as pyav_error:
            raise VideoLoadError(path, _both_failed(decord_error.cause, str(pyav_error))) from None
        logger.info("decord could not read %r (%s); decoded it with PyAV", path, decord_error.cause)

    real = torch.from_numpy(np.ascontiguousarray(decoded.frames))
    height, width = int(real.shape[1]), int(real.shape[2])
    if real.shape[0] < num_frames:  # short="pad": black frames at the end
        pad = torch.zeros((num_frames - real.shape[0], height, width, 3), dtype=torch.uint8)
        frames = torch.cat([real, pad], dim=0)
    else:
        frames = real
    duration_s = decoded.duration_s
    if duration_s <= 0 and decoded.fps > 0:  # containers without usable timestamps
        duration_s = decoded.total / decoded.fps
    info = VideoInfo(
        path=path,
        total_frames=decoded.total,
        fps=decoded.fps,
        duration_s=duration_s,
        frame_indices=tuple(decoded.indices),
        valid=len(decoded.indices),
        height=height,
        width=width,
        decoder=decoded.decoder,
    )
    return frames, info


@dataclass
class _Decoded:
    """What one decoder read: ``frames[j]`` is source frame ``indices[j]`` (uint8 RGB)."""

    decoder: str
    total: int
    fps: float
    duration_s: float  # <= 0 when the container has no usable timestamps
    indices: list[int]
    frames: np.ndarray  # [len(indices), H, W, 3]


class _PyAVFailed(Exception):
    """The PyAV fallback could not read the file; the message is the cause, for users."""


def _both_failed(decord_cause: str, pyav_cause: str) -> str:
    """One cause for a file neither decoder read: decord's (it names the case precisely),
    then PyAV's unless it only repeats it (decord's message already quotes FFmpeg through a
    PyAV probe when the container cannot be opened at all)."""
    same_no_stream = decord_cause.startswith("no video stream") and pyav_cause.startswith("no video stream")
    if pyav_cause in decord_cause or same_no_stream:
        return f"{decord_cause}; PyAV cannot read it either"
    return f"{decord_cause}; the PyAV fallback failed too: {pyav_cause}"


def _sample(total: int, num_frames: int, short: str) -> list[int]:
    if total < num_frames and short == "pad":
        return list(range(total))
    return uniform_indices(total, num_frames)


def _malformed(decoded: Any, count: int) -> str | None:
    """Why a decoded batch breaks the ``[count, H, W, 3]`` uint8 contract, or None."""
    shape = tuple(getattr(decoded, "shape", ()))
    if getattr(decoded, "dtype", None) != np.uint8:
        return f"dtype {getattr(decoded, 'dtype', type(decoded).__name__)}, expected uint8"
    if len(shape) != 4:
        return f"shape {shape}, expected [frames, height, width, 3]"
    if shape[0] != count:
        return f"{shape[0]} frames for the {count} asked for"
    if shape[3] != 3:
        return f"{shape[3]} channels per pixel, expected 3 (RGB)"
    if shape[1] < 1 or shape[2] < 1:
        return f"empty frames of shape {shape[1:]}"
    return None


def _read_with_decord(decord, context, path: str, num_frames: int, short: str) -> _Decoded:
    """decord's reading; every failure on the file itself is a VideoLoadError (so the caller
    can try PyAV), a decord without CUDA for ``ctx="gpu"`` a RuntimeError."""
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

    try:
        total = len(reader)
        if total < 1:
            raise VideoLoadError(path, "the video stream has no frames")
        fps = float(reader.get_avg_fps())
        indices = _sample(total, num_frames, short)
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

    # decord can return a wrong buffer without raising (6 channels at 16x16 H.264): such
    # frames are garbage, not a smaller image, so they must go to the fallback.
    problem = _malformed(decoded, len(unique))
    if problem is not None:
        raise VideoLoadError(path, f"decord returned malformed frames ({problem})")
    position = {index: row for row, index in enumerate(unique)}
    return _Decoded("decord", total, fps, duration_s, indices, decoded[[position[i] for i in indices]])


def _ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's own words for a PyAV exception, without PyAV's errno/function decoration."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"FFmpeg: {reason}"


def _best_video_stream(container):
    """The stream decord picks: FFmpeg's av_find_best_stream for video."""
    stream = container.streams.best("video")
    if stream is None:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise _PyAVFailed(f"no video stream (streams: {kinds})")
    if stream.codec_context is None:  # PyAV opens streams it has no decoder for without one
        name = getattr(stream.codec, "name", None) or "unknown codec"
        raise _PyAVFailed(f"PyAV's FFmpeg has no decoder for the video codec ({name}) either")
    return stream


def _frame_rgb(frame, width: int, height: int) -> np.ndarray:
    """One decoded frame as decord returns it: RGB24 scaled to the stream's size, then turned
    by the display rotation (decord applies 90, 180 and 270 degrees, nothing else)."""
    if width > 0 and height > 0 and (frame.width, frame.height) != (width, height):
        # decord's filter graph scales every frame to the stream size (FFmpeg's default: bicubic).
        array = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="BICUBIC")
    else:
        array = frame.to_ndarray(format="rgb24")
    # frame.rotation is the display matrix's counter-clockwise angle, as np.rot90 turns.
    rotation = int(getattr(frame, "rotation", 0) or 0)
    if rotation % 90 == 0 and rotation % 360:
        array = np.rot90(array, k=(rotation // 90) % 4)
    return array


def _read_with_pyav(path: str, num_frames: int, short: str) -> _Decoded:
    """The same frames as :func:`_read_with_decord`, read with PyAV (see module docstring)."""
    try:
        import av
    except ImportError:
        raise _PyAVFailed("PyAV is not installed (pip install av)") from None
    errors = (av.FFmpegError, OSError, ValueError)

    # Pass 1, demuxing only (cheap): the frame index decord would build, one frame per
    # packet of the video stream, in pts order. The count must be known before any frame
    # is chosen, so decoding waits for pass 2.
    try:
        with av.open(path) as container:
            stream = _best_video_stream(container)
            declared = stream.frames  # the container's own count (0 when it keeps none)
            time_base, start = stream.time_base, stream.start_time or 0
            rate = stream.average_rate or stream.guessed_rate
            width, height = stream.codec_context.width, stream.codec_context.height
            # PyAV ends each stream with an empty flush packet that is no frame.
            packets = [(p.pts, p.duration or 0) for p in container.demux(stream) if p.size > 0]
    except errors as exc:
        raise _PyAVFailed(_ffmpeg_reason(exc)) from None

    total = len(packets)
    if declared > 0 and total < declared:
        raise _PyAVFailed(f"truncated: the container indexes {declared} frames, only {total} can be read")
    if total < 1:
        raise _PyAVFailed("the video stream has no frames")
    fps = float(rate) if rate else 0.0
    indices = _sample(total, num_frames, short)

    all_pts = [pts for pts, _ in packets]
    by_pts = None not in all_pts and len(set(all_pts)) == total
    if by_pts:
        # decord numbers frames by sorted pts and reports the last one's end as the duration.
        index_of = {pts: i for i, pts in enumerate(sorted(all_pts))}
        last_pts, last_duration = max(packets)
        duration_s = float((last_pts + last_duration - start) * time_base) if time_base else 0.0
    else:
        index_of, duration_s = {}, 0.0  # no timestamps: frames are numbered in decoding order

    # Pass 2: decode from the start and keep the wanted frames. Sequential decoding (no
    # seeking) cannot land on the wrong frame in containers whose seeking is inexact.
    wanted = set(indices)
    found: dict[int, np.ndarray] = {}
    count = 0
    try:
        with av.open(path) as container:
            stream = _best_video_stream(container)
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                # a frame is known by its pts; one without (or with an unindexed one) by position
                index = index_of.get(frame.pts, count) if by_pts and frame.pts is not None else count
                count += 1
                if index in wanted and index not in found:
                    found[index] = _frame_rgb(frame, width, height)
                    if len(found) == len(wanted):
                        break
    except errors as exc:
        raise _PyAVFailed(f"decoding failed after {count} of {total} frames ({_ffmpeg_reason(exc)})") from None
    if len(found) < len(wanted):
        missing = sorted(wanted - found.keys())
        raise _PyAVFailed(
            f"decoding ended after {count} of {total} frames (truncated or corrupt); "
            f"frame{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing[:5]))}"
            f"{' ...' if len(missing) > 5 else ''} never came out"
        )
    shapes = {found[i].shape for i in wanted}
    if len(shapes) != 1:  # only with no stream size to scale to (width/height unknown)
        raise _PyAVFailed(f"frames of different sizes {sorted(shapes)}")
    return _Decoded("pyav", total, fps, duration_s, indices, np.stack([found[i] for i in indices]))


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
        video_tiles: float32 ``[num_frames, max_num_tiles, 3, S, S]`` (uint8 pixels when the
            image processor has ``output="uint8"``: its ``tile_dtype``); tile slots beyond
            the grid and the padded frames of ``short="pad"`` are exact zeros (like missing
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
        dtype = getattr(self.image_processor, "tile_dtype", torch.float32)  # a custom processor: float32
        out = torch.zeros((self.num_frames, self.max_num_tiles, 3, size, size), dtype=dtype)
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
            if (tiles.dtype == torch.uint8) != (dtype == torch.uint8):
                # A cast would turn uint8 pixels into unnormalised floats (or floats into pixels).
                raise ValueError(f"image processor returned {tiles.dtype} tiles, expected {dtype}")
            out[i, : tiles.shape[0]] = tiles.to(dtype)
        assert aspect_ratio is not None  # load_video returns at least one real frame
        return out, aspect_ratio, info
