"""Tests for llama_vision.data.video on real mp4 files written with PyAV.

Each test video's frame ``i`` is filled with a palette colour that encodes ``i`` (100
colours, >= 48 levels apart in some channel), plus a white block at the top-left corner, so
a decoded frame tells WHICH source frame it is despite lossy compression.

libx264 with yuv420p cannot encode odd frame sizes (the chroma planes are half size; the
encoder refuses to open), so the odd 33x17 size is tested with mpeg4 only.
"""

from __future__ import annotations

import fractions
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

av = pytest.importorskip("av")
pytest.importorskip("decord")

from _video_clips import CLIPS, NTSC, PALETTE, frame_image, palette, write_clip  # noqa: E402, F401
from llama_vision.data.video import (  # noqa: E402
    VideoInfo,
    VideoLoadError,
    VideoProcessor,
    frames_to_pil,
    load_video,
    uniform_indices,
)

TOLERANCE = 20  # max per-channel error on a flat region after lossy coding


def write_video(path, num_frames, width, height, codec="libx264", fps=25, pts=None, options=None):
    """Write a yuv420p palette video (see _video_clips.write_clip)."""
    return write_clip(path, num_frames, width, height, codec, fps=fps, pts=pts, options=options)


def write_audio(path, codec):
    """Write one second of a mono sine tone: a file with an audio stream and no video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=44100)
        stream.layout = "mono"
        fmt = stream.codec_context.codec.audio_formats[0].name
        dtype = {"flt": np.float32, "s16": np.int16, "s32": np.int32}[fmt.rstrip("p")]
        size = stream.codec_context.frame_size or 1024
        for k in range(44100 // size):
            wave = 0.3 * np.sin(np.arange(k * size, (k + 1) * size) / 10.0)
            if dtype is not np.float32:
                wave = wave * np.iinfo(dtype).max
            frame = av.AudioFrame.from_ndarray(wave.astype(dtype)[None], format=fmt, layout="mono")
            frame.sample_rate, frame.pts = 44100, k * size
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def identify(frame: torch.Tensor) -> int:
    """Which source frame a decoded frame shows; asserts the marker and colour are intact."""
    image = frame.numpy().astype(np.int32)
    h, w = image.shape[:2]
    body = image[h // 2 :, w // 2 :].reshape(-1, 3)  # away from the marker and its ringing
    colour = np.median(body, axis=0)
    distances = np.abs(PALETTE - colour).max(axis=1)
    index = int(distances.argmin())
    assert distances[index] <= TOLERANCE, f"colour {colour} matches no palette entry"
    assert np.abs(body - PALETTE[index]).max() <= 2 * TOLERANCE
    if h >= 8 and w >= 8:  # marker is white and at the top-left (no flip or transpose)
        assert image[: h // 8, : w // 8].mean(axis=-1).min() >= 255 - 2 * TOLERANCE  # brightness: chroma bleeds at odd sizes
    return index


# ---- the sampling formula ---------------------------------------------------------------


def test_uniform_indices_examples():
    assert uniform_indices(100, 4) == [12, 37, 62, 87]
    assert uniform_indices(37, 8) == [2, 6, 11, 16, 20, 25, 30, 34]
    assert uniform_indices(8, 8) == list(range(8))
    assert uniform_indices(5, 8) == [0, 0, 1, 2, 2, 3, 4, 4]
    assert uniform_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        uniform_indices(0, 3)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 128))
def test_uniform_indices_properties(total, n):
    indices = uniform_indices(total, n)
    assert len(indices) == n
    assert all(0 <= i < total for i in indices)
    assert indices == sorted(indices)
    if total >= n:
        assert len(set(indices)) == n
    # index k is the frame containing the centre of segment k: floor((k + 1/2) * T / N)
    for k, i in enumerate(indices):
        centre = (k + fractions.Fraction(1, 2)) * total / n
        assert i <= centre < i + 1


# ---- real files, several codecs, sizes, lengths and rates --------------------------------

SIZES = [(64, 48), (160, 90), (33, 17)]
LENGTHS = [1, 5, 37, 100]
RATES = [10, 25, NTSC]
CASES = [
    (codec, size, length, RATES[n % 3])
    for n, (codec, size, length) in enumerate(itertools.product(["libx264", "mpeg4"], SIZES, LENGTHS))
    if not (codec == "libx264" and size[0] % 2)  # see module docstring
]


@pytest.mark.parametrize("codec,size,length,fps", CASES, ids=lambda v: str(v))
def test_load_video_samples_the_right_frames(tmp_path, codec, size, length, fps):
    width, height = size
    path = write_video(tmp_path / f"clip_{codec}.mp4", length, width, height, codec, fps)

    frames, info = load_video(path, 8)
    expected = uniform_indices(length, 8)
    assert frames.dtype == torch.uint8 and frames.shape == (8, height, width, 3)
    assert isinstance(info, VideoInfo)
    assert info.path == path and info.total_frames == length and info.valid == 8
    assert info.frame_indices == tuple(expected)
    assert (info.height, info.width) == (height, width)
    assert info.fps == pytest.approx(float(fps), rel=1e-3)
    assert info.duration_s == pytest.approx(length / float(fps), rel=1e-2, abs=1e-3)
    assert [identify(f) for f in frames] == expected

    every, info_all = load_video(path, length)  # N == T: every frame, once, in order
    assert info_all.frame_indices == tuple(range(length))
    assert [identify(f) for f in every] == list(range(length))


def test_pathlike_and_large_n(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 100, 64, 48)
    frames, info = load_video(path, 64)  # os.PathLike accepted; 64 frames like the paper
    assert info.path == str(path) and frames.shape[0] == 64
    assert [identify(f) for f in frames] == uniform_indices(100, 64)


def test_variable_frame_rate_uses_indices(tmp_path):
    # 10 frames 10 ms apart then 10 frames 200 ms apart: timestamps are very uneven.
    pts = [10 * i if i < 10 else 100 + 200 * (i - 10) for i in range(20)]
    path = write_video(tmp_path / "vfr.mp4", 20, 64, 48, pts=pts)
    frames, info = load_video(path, 4)
    assert info.total_frames == 20
    assert info.frame_indices == (2, 7, 12, 17)  # evenly spaced in frames, not in time
    assert [identify(f) for f in frames] == [2, 7, 12, 17]
    assert info.duration_s >= 1.9  # last frame starts at 1.9 s


# ---- short clips ---------------------------------------------------------------------------


def test_short_video_repeat(tmp_path):
    path = write_video(tmp_path / "short.mp4", 5, 64, 48, "mpeg4")
    frames, info = load_video(path, 8, short="repeat")
    assert frames.shape == (8, 48, 64, 3)
    assert info.frame_indices == (0, 0, 1, 2, 2, 3, 4, 4) and info.valid == 8
    assert [identify(f) for f in frames] == [0, 0, 1, 2, 2, 3, 4, 4]
    assert torch.equal(frames[0], frames[1])  # a repeat is the same decoded frame


def test_short_video_pad(tmp_path):
    path = write_video(tmp_path / "short.mp4", 5, 64, 48)
    frames, info = load_video(path, 8, short="pad")
    assert frames.shape == (8, 48, 64, 3)
    assert info.valid == 5 and info.frame_indices == (0, 1, 2, 3, 4)
    assert [identify(f) for f in frames[:5]] == [0, 1, 2, 3, 4]
    assert torch.count_nonzero(frames[5:]) == 0
    # a long enough clip is unaffected by the mode
    long_path = write_video(tmp_path / "long.mp4", 37, 64, 48)
    a, info_a = load_video(long_path, 8, short="pad")
    b, info_b = load_video(long_path, 8, short="repeat")
    assert torch.equal(a, b) and info_a == info_b and info_a.valid == 8


def test_single_frame_video(tmp_path):
    path = write_video(tmp_path / "one.mp4", 1, 64, 48)
    frames, info = load_video(path, 4)
    assert info.frame_indices == (0, 0, 0, 0)
    assert all(identify(f) == 0 for f in frames)
    padded, info_pad = load_video(path, 4, short="pad")
    assert info_pad.valid == 1 and identify(padded[0]) == 0 and torch.count_nonzero(padded[1:]) == 0


# ---- broken files ---------------------------------------------------------------------------


def assert_clean_error(excinfo, path, *words):
    error = excinfo.value
    assert isinstance(error, ValueError)
    assert str(path) in str(error) and error.path == str(path)
    message = str(error).lower()
    assert any(word in message for word in words), message
    # decord's exception and its C++ trace are not chained onto ours
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert "video_reader.cc" not in message and "decorderror" not in message


@pytest.fixture(scope="module")
def good_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("good") / "good.mp4", 100, 160, 90)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoLoadError) as excinfo:
        load_video(path, 4)
    assert_clean_error(excinfo, path, "not found")


def test_directory(tmp_path):
    with pytest.raises(VideoLoadError) as excinfo:
        load_video(tmp_path, 4)
    assert_clean_error(excinfo, tmp_path, "directory")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoLoadError) as excinfo:
        load_video(path, 4)
    assert_clean_error(excinfo, path, "empty")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(20_000))
    with pytest.raises(VideoLoadError) as excinfo:
        load_video(path, 4)
    assert_clean_error(excinfo, path, "corrupt")


def test_truncated_file(tmp_path, good_video):
    # mp4 writers put the index (moov) at the end: half a file has no index at all.
    data = open(good_video, "rb").read()
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoLoadError) as excinfo:
        load_video(path, 4)
    assert_clean_error(excinfo, path, "truncated")


def test_truncated_faststart_file(tmp_path):
    # With the index moved to the front the file opens, and decoding the missing half fails.
    full = write_video(tmp_path / "fs.mp4", 100, 160, 90, options={"movflags": "faststart"})
    data = open(full, "rb").read()
    path = tmp_path / "fs_half.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoLoadError) as excinfo:
        load_video(path, 8)
    assert_clean_error(excinfo, path, "truncated")


@pytest.mark.parametrize("codec,name", [("aac", "tone.m4a"), ("aac", "tone.mp4"), ("mp3", "tone_mp3.mp4")])
def test_audio_only_file(tmp_path, codec, name):
    if codec not in av.codecs_available:
        pytest.skip(f"PyAV has no {codec} encoder")
    path = write_audio(tmp_path / name, codec)
    with pytest.raises(VideoLoadError) as excinfo:
        load_video(path, 4)
    assert_clean_error(excinfo, path, "no video stream")
    assert "audio" in str(excinfo.value)


def test_unsupported_codec(tmp_path):
    # decord's bundled FFmpeg has no AV1 decoder; PyAV's FFmpeg may have an AV1 encoder.
    encoder = next((c for c in ("libsvtav1", "libaom-av1") if c in av.codecs_available), None)
    if encoder is None:
        pytest.skip("PyAV has no AV1 encoder")
    try:
        path = write_video(tmp_path / "av1.mp4", 4, 64, 48, encoder)
    except Exception as exc:  # the encoder is listed but cannot open on this build
        pytest.skip(f"cannot write AV1 here: {exc}")
    try:
        load_video(path, 2)
    except VideoLoadError as error:
        assert str(path) in str(error) and "unsupported video codec" in str(error)
        assert error.__cause__ is None
    else:
        pytest.skip("decord or its PyAV fallback decodes AV1 here (test_av1_via_fallback checks it)")


# ---- arguments, contexts, imports ---------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"num_frames": 0}, {"num_frames": 2.5}, {"sampling": "random"}, {"short": "drop"}, {"ctx": "tpu"}],
)
def test_bad_arguments(good_video, kwargs):
    args = {"num_frames": 4, **kwargs}
    with pytest.raises(ValueError) as excinfo:
        load_video(good_video, **args)
    assert not isinstance(excinfo.value, VideoLoadError)


def test_gpu_context(good_video):
    try:
        frames, info = load_video(good_video, 4, ctx="gpu")
    except RuntimeError as error:  # decord wheels from PyPI are built without CUDA
        assert "ctx='cpu'" in str(error) and "CUDA" in str(error)
        assert error.__cause__ is None
    else:
        assert frames.device.type == "cpu"
        assert [identify(f) for f in frames] == list(info.frame_indices)


def test_clear_import_error_without_decord(monkeypatch, good_video):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` fail
    with pytest.raises(ImportError, match="pip install decord"):
        load_video(good_video, 4)


# ---- conversions and the video processor ----------------------------------------------------


def test_frames_to_pil(good_video):
    frames, _ = load_video(good_video, 3)
    images = frames_to_pil(frames)
    assert len(images) == 3
    assert all(im.mode == "RGB" and im.size == (160, 90) for im in images)
    assert all(np.array_equal(np.asarray(im), f.numpy()) for im, f in zip(images, frames))
    assert len(frames_to_pil(frames.numpy())) == 3
    with pytest.raises(ValueError, match="shape"):
        frames_to_pil(frames[0])
    with pytest.raises(ValueError, match="uint8"):
        frames_to_pil(frames.float())


class StandInImageProcessor:
    """Minimal tiler for the tests: 1x2 grid for wide images, else 1x1; resize + normalise."""

    def __init__(self, tile_size):
        self.tile_size = tile_size

    def __call__(self, image):
        rows, cols = (1, 2) if image.width >= 1.5 * image.height else (1, 1)
        size = self.tile_size
        resized = image.resize((cols * size, rows * size))
        pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255.0 - 0.5
        tiles = pixels.reshape(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
        return tiles, (rows, cols)


def test_video_processor_with_stand_in(tmp_path, good_video):
    stand_in = StandInImageProcessor(32)
    processor = VideoProcessor(6, 32, max_num_tiles=4, image_processor=stand_in)
    tiles, aspect, info = processor(good_video)
    assert tiles.dtype == torch.float32 and tiles.shape == (6, 4, 3, 32, 32)
    assert aspect == (1, 2)  # 160x90 is wide
    assert torch.count_nonzero(tiles[:, 2:]) == 0  # tile slots beyond the grid are zero
    frames, _ = load_video(good_video, 6)
    for i, image in enumerate(frames_to_pil(frames)):
        expected, _ = stand_in(image)
        assert torch.equal(tiles[i, :2], expected)

    short = write_video(tmp_path / "short.mp4", 3, 64, 48)
    padded = VideoProcessor(6, 32, max_num_tiles=2, image_processor=stand_in, short="pad")
    tiles, aspect, info = padded(short)
    assert aspect == (1, 1) and info.valid == 3
    assert torch.count_nonzero(tiles[:3, :1]) > 0 and torch.count_nonzero(tiles[3:]) == 0


def test_video_processor_rejects_oversized_tiles(good_video):
    processor = VideoProcessor(2, 32, max_num_tiles=1, image_processor=StandInImageProcessor(32))
    with pytest.raises(ValueError, match="at most 1 tiles"):
        processor(good_video)


def test_video_processor_with_real_image_processor(good_video):
    image_module = pytest.importorskip("llama_vision.data.image")
    processor = VideoProcessor(4, 56, max_num_tiles=4)
    tiles, aspect, info = processor(good_video)
    assert tiles.shape == (4, 4, 3, 56, 56) and tiles.dtype == torch.float32
    assert 1 <= aspect[0] * aspect[1] <= 4
    reference = image_module.ImageProcessor(56, 4)
    frames, _ = load_video(good_video, 4)
    for i, image in enumerate(frames_to_pil(frames)):
        expected, grid = reference(image)
        assert tuple(int(g) for g in grid) == aspect
        n = expected.shape[0]
        assert torch.allclose(tiles[i, :n], torch.as_tensor(expected, dtype=torch.float32))
        assert torch.count_nonzero(tiles[i, n:]) == 0


# ---- the PyAV fallback (issue #14) ----------------------------------------------------------
#
# decord 0.6 hands back 6-channel frames for a valid 16x16 H.264 clip (and 4-channel ones for
# a 90-degree display rotation); load_video then reads the file with PyAV. The clips below are
# valid files of several kinds; each must decode whichever decoder reads it, and with decord
# made to fail in each way the loader guards against, PyAV must give decord's result.

import decord  # noqa: E402  (importorskip'd above)
from types import SimpleNamespace  # noqa: E402


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Every clip of CLIPS, written in a process without decord (see _video_clips.py)."""
    root = tmp_path_factory.mktemp("clips")
    subprocess.run([sys.executable, str(Path(__file__).with_name("_video_clips.py")), str(root)], check=True)
    return {name: str(root / name) for name in CLIPS}


def upright(frame: torch.Tensor, rotation: int) -> torch.Tensor:
    """Undo a display rotation that the loader applied (it turns frames counter-clockwise)."""
    return torch.from_numpy(np.ascontiguousarray(np.rot90(frame.numpy(), k=-(rotation // 90))))


def break_decord(monkeypatch, how):
    """Make decord fail on every file in one way: "open" raises in VideoReader(), "raise" in
    get_batch, "six_channels" doubles the channels (decord's 16x16 bug), "fewer" drops a frame."""
    real_reader = decord.VideoReader

    class BrokenReader:
        def __init__(self, path, *args, **kwargs):
            if how == "open":
                raise decord.DECORDError(f"[10:00:00] /src/video/video_reader.cc:83: ERROR opening: {path}")
            self._reader = real_reader(path, *args, **kwargs)

        def __len__(self):
            return len(self._reader)

        def __getattr__(self, name):
            return getattr(self._reader, name)

        def get_batch(self, indices):
            if how == "raise":
                raise decord.DECORDError("[10:00:00] /src/runtime/ndarray.cc:171: Check failed: from_size == to_size")
            array = self._reader.get_batch(indices).asnumpy()
            array = {"six_channels": np.concatenate([array, array], axis=-1), "fewer": array[:-1]}[how]
            return SimpleNamespace(asnumpy=lambda: array)

    monkeypatch.setattr(decord, "VideoReader", BrokenReader)


@pytest.mark.parametrize("name", list(CLIPS))
def test_valid_files_decode(clips, name):
    length, width, height, _, rotation = CLIPS[name]
    if rotation in (90, 270):
        width, height = height, width
    frames, info = load_video(clips[name], 8)
    expected = uniform_indices(length, 8)
    assert frames.dtype == torch.uint8 and frames.shape == (8, height, width, 3)
    assert info.total_frames == length and info.frame_indices == tuple(expected) and info.valid == 8
    assert (info.height, info.width) == (height, width) and info.decoder in ("decord", "pyav")
    assert [identify(upright(f, rotation)) for f in frames] == expected
    if rotation == 90:  # the white marker ends up at the bottom-left, as decord turns it
        assert frames[0, -height // 8 :, : width // 8].float().mean() > 200


@pytest.mark.parametrize(
    "name,how",
    [(name, "open") for name in CLIPS]
    + [(name, "six_channels") for name in CLIPS]
    + [("h264.mkv", "raise"), ("h264.mkv", "fewer"), ("vfr.mp4", "fewer")],
)
def test_pyav_fallback_matches_decord(monkeypatch, clips, name, how):
    length, _, _, _, rotation = CLIPS[name]
    path = clips[name]
    reference = None
    try:
        reference = load_video(path, 8)
    except VideoLoadError:
        pass
    if reference is not None and reference[1].decoder != "decord":
        reference = None  # this decord cannot read the clip; test_valid_files_decode covers it
    break_decord(monkeypatch, how)
    frames, info = load_video(path, 8)
    assert info.decoder == "pyav"
    assert info.frame_indices == tuple(uniform_indices(length, 8)) and info.total_frames == length
    assert [identify(upright(f, rotation)) for f in frames] == list(info.frame_indices)
    if reference is None:
        return
    ref_frames, ref_info = reference
    # the same contract: same indices, sizes, rate; decord's duration is a float32. The
    # duration is the last frame's pts + packet duration; in a VFR mp4 the FFmpeg inside
    # decord gives every packet the first frame spacing (1.9 s + 10 ms) where PyAV's gives
    # its own spacing (1.9 s + 200 ms), so there only the last frame's start is common.
    assert info.fps == ref_info.fps
    if name == "vfr.mp4":
        assert min(info.duration_s, ref_info.duration_s) > 1.9 - 1e-6
    else:
        assert info.duration_s == pytest.approx(ref_info.duration_s, rel=1e-6)
    same = {"decoder": "decord", "duration_s": ref_info.duration_s}
    assert VideoInfo(**{**info.__dict__, **same}) == ref_info
    # both run FFmpeg's decoder and swscale's RGB conversion: identical here (decord 0.6,
    # PyAV 18); a rounding step is allowed for other pairs of FFmpeg versions
    assert frames.shape == ref_frames.shape and frames.dtype == ref_frames.dtype
    assert (frames.int() - ref_frames.int()).abs().max() <= 1


def test_pyav_fallback_short_clip_modes(monkeypatch, clips):
    path = clips["vp9.webm"]  # 20 frames
    break_decord(monkeypatch, "open")
    frames, info = load_video(path, 24, short="pad")
    assert info.valid == 20 and info.frame_indices == tuple(range(20)) and info.decoder == "pyav"
    assert [identify(f) for f in frames[:20]] == list(range(20)) and torch.count_nonzero(frames[20:]) == 0
    frames, info = load_video(path, 24, short="repeat")
    assert info.frame_indices == tuple(uniform_indices(20, 24)) and info.valid == 24
    assert [identify(f) for f in frames] == uniform_indices(20, 24)


def test_tiny_h264_clip_is_read_despite_decord(clips):
    # The clip of the issue: a valid 16x16 H.264 file that decord mangles.
    path = clips["h264_16x16.mp4"]
    with av.open(path) as container:  # PyAV decodes every frame of it as RGB 16x16
        assert [f.to_ndarray(format="rgb24").shape for f in container.decode(video=0)] == [(16, 16, 3)] * 10
    frames, info = load_video(path, 4)
    assert frames.shape == (4, 16, 16, 3) and info.frame_indices == (1, 3, 6, 8)
    assert [identify(f) for f in frames] == [1, 3, 6, 8]


def test_av1_via_fallback(tmp_path):
    # decord's bundled FFmpeg has no AV1 decoder; PyAV's FFmpeg usually has libdav1d.
    encoder = next((c for c in ("libsvtav1", "libaom-av1") if c in av.codecs_available), None)
    if encoder is None:
        pytest.skip("PyAV has no AV1 encoder")
    try:
        path = write_clip(tmp_path / "av1.mp4", 6, 64, 48, encoder)
    except Exception as exc:  # the encoder is listed but cannot open on this build
        pytest.skip(f"cannot write AV1 here: {exc}")
    try:
        frames, info = load_video(path, 3)
    except VideoLoadError as error:  # neither FFmpeg decodes AV1: the precise cause is kept
        assert "unsupported video codec" in str(error) and "pyav" in str(error).lower()
        pytest.skip("neither decord nor PyAV decodes AV1 here")
    assert info.total_frames == 6 and [identify(f) for f in frames] == [1, 3, 5]


# -- broken files still give the clear error, after both decoders failed


def _truncated(tmp_path, good, name):
    data = open(good, "rb").read()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["truncated", "truncated_faststart", "garbage", "audio_only", "not_a_video"])
@pytest.mark.parametrize("decord_state", ["real", "broken"])
def test_broken_files_fail_in_both_decoders(monkeypatch, tmp_path, kind, decord_state):
    if kind == "truncated":  # no moov index at all
        path = _truncated(tmp_path, write_video(tmp_path / "full.mp4", 100, 160, 90), "half.mp4")
        words = ("truncated", "corrupt")
    elif kind == "truncated_faststart":  # the index opens and promises 100 frames
        full = write_video(tmp_path / "fs.mp4", 100, 160, 90, options={"movflags": "faststart"})
        path, words = _truncated(tmp_path, full, "fs_half.mp4"), ("truncated",)
    elif kind == "garbage":
        path, words = tmp_path / "noise.webm", ("corrupt", "not a readable")
        path.write_bytes(np.random.default_rng(1).bytes(30_000))
    elif kind == "audio_only":
        codec = next((c for c in ("aac", "mp3") if c in av.codecs_available), None)
        if codec is None:
            pytest.skip("PyAV has no audio encoder")
        path, words = write_audio(tmp_path / "tone.m4a", codec), ("no video stream",)
    else:
        path, words = tmp_path / "notes.mkv", ("corrupt", "not a readable")
        path.write_text("these are meeting notes, not a matroska file\n" * 50)
    if decord_state == "broken":
        break_decord(monkeypatch, "open")
    with pytest.raises(VideoLoadError) as excinfo:
        load_video(path, 4)
    assert_clean_error(excinfo, path, *words)
    assert "pyav" in str(excinfo.value).lower()  # the fallback was tried, and says so
    if kind == "audio_only":
        assert "audio" in str(excinfo.value)


def test_fallback_unavailable_keeps_decord_cause(monkeypatch, clips):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    break_decord(monkeypatch, "six_channels")
    with pytest.raises(VideoLoadError) as excinfo:
        load_video(clips["h264.mkv"], 4)
    assert_clean_error(excinfo, clips["h264.mkv"], "malformed")
    assert "6 channels" in str(excinfo.value) and "PyAV is not installed" in str(excinfo.value)
