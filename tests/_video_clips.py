"""Palette video clips for tests/test_video_io.py, written by PyAV only.

Run as a script (`python _video_clips.py DIR`) it writes every clip of CLIPS into DIR. The
tests call it in a subprocess because decord bundles its own FFmpeg: once decord is loaded
in a process, PyAV's libvpx VP9 encoder no longer opens (avcodec_open2 returns EINVAL), so
the clips are written in a process that never loads decord. (Decoding is unaffected.)
"""
from __future__ import annotations

import fractions
import sys
from pathlib import Path

import av
import numpy as np

NTSC = fractions.Fraction(30000, 1001)


def palette(i: int) -> np.ndarray:
    """Distinct RGB colour for frame i (0 <= i < 100)."""
    return np.array([32 + 48 * (i % 5), 32 + 48 * ((i // 5) % 5), 40 + 60 * ((i // 25) % 4)], dtype=np.uint8)


PALETTE = np.stack([palette(i) for i in range(100)]).astype(np.int32)


def frame_image(i: int, width: int, height: int) -> np.ndarray:
    image = np.empty((height, width, 3), np.uint8)
    image[:] = palette(i)
    image[: max(1, height // 4), : max(1, width // 4)] = 255  # orientation marker
    return image


def write_clip(path, num_frames, width, height, codec="libx264", pix_fmt="yuv420p", fps=25, pts=None, rotation=None,
               options=None):
    """Palette clip in any container (by extension), pixel format, rate or display rotation;
    ``pts`` (ms) gives variable-frame-rate timestamps, ``options`` the muxer's (faststart)."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)  # counter-clockwise degrees
        if pts is not None:
            stream.codec_context.time_base = stream.time_base = fractions.Fraction(1, 1000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


VFR_PTS = [10 * i if i < 10 else 100 + 200 * (i - 10) for i in range(20)]  # 10 ms, then 200 ms apart
# name -> (frames, width, height, writer kwargs, counter-clockwise display rotation)
CLIPS = {
    "h264_16x16.mp4": (10, 16, 16, {}, 0),  # decord 0.6: 6-channel frames
    # yuv420p halves the chroma planes, so libx264 refuses odd sizes; yuv444p takes them.
    "h264_17x13_yuv444p.mp4": (12, 17, 13, {"pix_fmt": "yuv444p"}, 0),
    "one_frame.mp4": (1, 64, 48, {}, 0),
    "vfr.mp4": (20, 64, 48, {"pts": VFR_PTS}, 0),
    "vfr.mkv": (20, 64, 48, {"pts": VFR_PTS}, 0),
    "vp9.webm": (20, 64, 48, {"codec": "libvpx-vp9"}, 0),
    "h264.mkv": (37, 64, 48, {"fps": NTSC}, 0),
    "rot180.mp4": (6, 64, 48, {"rotation": 180}, 180),
    "rot90.mp4": (6, 64, 48, {"rotation": 90}, 90),  # decord 0.6: 4-channel frames
}




def write_all(root: str | Path) -> dict[str, str]:
    root = Path(root)
    return {name: write_clip(root / name, n, w, h, **kw) for name, (n, w, h, kw, _) in CLIPS.items()}


if __name__ == "__main__":
    write_all(sys.argv[1])
