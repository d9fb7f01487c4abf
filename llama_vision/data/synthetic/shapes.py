"""The "shapes world": a synthetic captioning data set small enough to learn on a CPU.

Images
------
A canvas (one of four aspect ratios, so tiling yields 1-4 tiles) is split into a 2x2 grid of
named cells, in this canonical (row-major) order::

    "top left" | "top right"
    -----------+--------------
    "bottom left" | "bottom right"

Each of 1-3 shapes occupies its own cell, drawn large (about 85% of the cell's shorter
side, with random size and position jitter that keeps it at least 2 px inside the cell) on a
black background. Colours are far apart in RGB so a small model can tell them apart; shapes
this large keep circle, square and triangle apart at the demo's 28-px ViT patches (at 60%,
a 34-px shape, the tiny ViT confused circles with squares in about one shape in four).

The caption names every shape in cell order, with a fixed template::

    "a red circle at the top left and a blue square at the bottom right."
    "a green triangle at the top left, a yellow square at the top right and a red circle
     at the bottom right."

so :func:`parse_caption` recovers the exact set of ``(colour, kind, position)`` triples and
:func:`caption_accuracy` scores a prediction by exact match of that set.

Videos
------
One shape moves steadily across a 96x96 frame in one direction (left/right/up/down),
starting near the opposite edge; caption ``"the red circle moves left."``.

On disk (:func:`generate_shapes_world`)
---------------------------------------
::

    out_dir/manifest.json                 generation arguments + file list (written last)
    out_dir/images/train-000000.tar ...   WebDataset shards: key.jpg, key.txt, key.json
    out_dir/images/test.jsonl             {"image": "test/00000.png", "caption": ..., ...}
    out_dir/images/test/00000.png ...
    out_dir/videos/train.jsonl            {"video": "train/00000.mp4", "caption": ..., ...}
    out_dir/videos/test.jsonl
    out_dir/videos/{train,test}/00000.mp4 ...

Paths inside a JSONL file are relative to the JSONL file's folder.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

__all__ = [
    "ASPECT_RATIOS",
    "BACKGROUND",
    "COLOURS",
    "DIRECTIONS",
    "KINDS",
    "POSITIONS",
    "Shape",
    "ShapeSpec",
    "canvas_sizes",
    "caption_accuracy",
    "describe_shapes",
    "direction_accuracy",
    "draw_motion_video",
    "motion_path",
    "render_motion",
    "draw_shapes_image",
    "generate_shapes_world",
    "iter_shard_samples",
    "parse_caption",
    "parse_direction",
    "parse_video_caption",
    "random_shapes",
    "video_caption",
    "write_mp4",
]

# Saturated, mutually distant colours (each pair differs by >= 140 in some channel).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
# Canvas (width, height) at scale 1: 1:1, 2:1, 1:2 and 4:1, i.e. 1-4 tiles of 56-112 px.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (112, 112),
    "2:1": (224, 112),
    "1:2": (112, 224),
    "4:1": (448, 112),
}
FILL_FRACTION = 0.85  # shape side / shorter side of its cell
CELL_GAP = 2.0  # px kept free between a shape and its cell's border

_SPLIT_STREAMS = {"train_images": 0, "test_images": 1, "train_videos": 2, "test_videos": 3}
_MANIFEST_VERSION = 3  # bumped when the same arguments draw different data (3: video rows' centres)


@dataclass(frozen=True)
class Shape:
    """One shape of an image: ``Shape("red", "circle", "top left")``."""

    colour: str
    kind: str
    position: str

    def __post_init__(self):
        for value, allowed, what in (
            (self.colour, COLOURS, "colour"),
            (self.kind, KINDS, "kind"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose from {list(allowed)}")

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.colour, self.kind, self.position)


ShapeSpec = Shape  # the same record under the name used in the demo's design notes


def canvas_sizes(scale: float = 1.0) -> dict[str, tuple[int, int]]:
    """Canvas (width, height) per aspect ratio at ``scale`` (rounded to whole pixels)."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return {name: (max(8, round(w * scale)), max(8, round(h * scale))) for name, (w, h) in ASPECT_RATIOS.items()}


# ---- images ---------------------------------------------------------------------------------


def _cell_box(canvas: tuple[int, int], position: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a named cell of the 2x2 grid."""
    width, height = canvas
    row, col = divmod(POSITIONS.index(position), 2)
    return (col * width / 2, row * height / 2, (col + 1) * width / 2, (row + 1) * height / 2)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, side: float, fill) -> None:
    """Draw a shape whose bounding square of ``side`` pixels is centred on (cx, cy)."""
    half = side / 2
    box = [cx - half, cy - half, cx + half, cy + half]
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":  # apex up, base along the bottom of the box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown kind {kind!r}; choose from {list(KINDS)}")


def _canonical(shapes: Sequence[Shape]) -> list[Shape]:
    return sorted(shapes, key=lambda s: POSITIONS.index(s.position))


def draw_shapes_image(
    rng: np.random.Generator,
    canvas: tuple[int, int],
    shapes: Sequence[Shape],
    background: tuple[int, int, int] = BACKGROUND,
) -> Image.Image:
    """Draw ``shapes`` (at most one per cell) on a ``canvas = (width, height)`` RGB image.

    Each shape's side is ``FILL_FRACTION`` (x0.9-1.1) of its cell's shorter side, at most
    that side less ``CELL_GAP`` + 1 px each way, and its centre is jittered within the cell
    so that at least ``CELL_GAP`` px stay free on every side (shapes never touch or merge).
    ``rng`` draws happen in canonical cell order, so the same rng state gives the same image.
    """
    positions = [s.position for s in shapes]
    if not shapes or len(set(positions)) != len(positions):
        raise ValueError(f"need 1-4 shapes in distinct cells, got positions {positions}")
    width, height = canvas
    image = Image.new("RGB", (int(width), int(height)), background)
    draw = ImageDraw.Draw(image)
    for shape in _canonical(shapes):
        x0, y0, x1, y1 = _cell_box((width, height), shape.position)
        short = min(x1 - x0, y1 - y0)
        side = min(FILL_FRACTION * short * rng.uniform(0.9, 1.1), short - 2 * (CELL_GAP + 1))
        # 90% of the free room each side beyond the gap, so a shape keeps off the border.
        slack_x = 0.9 * max(0.0, (x1 - x0 - side) / 2 - CELL_GAP)
        slack_y = 0.9 * max(0.0, (y1 - y0 - side) / 2 - CELL_GAP)
        cx = (x0 + x1) / 2 + rng.uniform(-slack_x, slack_x)
        cy = (y0 + y1) / 2 + rng.uniform(-slack_y, slack_y)
        _draw_shape(draw, shape.kind, cx, cy, side, COLOURS[shape.colour])
    return image


def random_shapes(rng: np.random.Generator, max_shapes: int = 3) -> list[Shape]:
    """1..max_shapes shapes with random colours and kinds in distinct random cells."""
    if not 1 <= max_shapes <= len(POSITIONS):
        raise ValueError(f"max_shapes must be in 1..{len(POSITIONS)}, got {max_shapes}")
    count = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    colours = list(COLOURS)
    shapes = [
        Shape(colours[int(rng.integers(len(colours)))], KINDS[int(rng.integers(len(KINDS)))], POSITIONS[int(c)])
        for c in cells
    ]
    return _canonical(shapes)


def describe_shapes(shapes: Sequence[Shape]) -> str:
    """The caption: every shape in cell order, e.g. "a red circle at the top left."."""
    if not shapes:
        raise ValueError("need at least one shape to describe")
    parts = [f"a {s.colour} {s.kind} at the {s.position}" for s in _canonical(shapes)]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


_SHAPE_PATTERN = re.compile(
    r"\b({})\s+({})\s+at\s+the\s+({})\b".format(
        "|".join(COLOURS), "|".join(KINDS), "|".join(p.replace(" ", r"\s+") for p in POSITIONS)
    ),
    re.IGNORECASE,
)


def parse_caption(text: str) -> set[tuple[str, str, str]]:
    """All ``(colour, kind, position)`` triples a caption names (case and spacing ignored)."""
    return {
        (colour.lower(), kind.lower(), " ".join(position.lower().split()))
        for colour, kind, position in _SHAPE_PATTERN.findall(text)
    }


def _pairs(pred: str | Sequence[str], target: str | Sequence[str]) -> list[tuple[str, str]]:
    if isinstance(pred, str) != isinstance(target, str):
        raise TypeError("pred and target must both be strings or both be sequences of strings")
    if isinstance(pred, str):
        return [(pred, target)]
    if len(pred) != len(target) or not pred:
        raise ValueError(f"need equally long, non-empty lists, got {len(pred)} and {len(target)}")
    return list(zip(pred, target))


def caption_accuracy(pred: str | Sequence[str], target: str | Sequence[str]) -> float:
    """Fraction of predictions whose attribute set equals the target's (exact match).

    A prediction counts only if it names every shape of the target with the right colour,
    kind and position, and nothing else. Strings give 1.0 or 0.0; lists give the mean.
    """
    pairs = _pairs(pred, target)
    return sum(parse_caption(p) == parse_caption(t) for p, t in pairs) / len(pairs)


# ---- videos ---------------------------------------------------------------------------------


def video_caption(colour: str, kind: str, direction: str) -> str:
    """``"the red circle moves left."``"""
    Shape(colour, kind, POSITIONS[0])  # validates colour and kind
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose from {list(DIRECTIONS)}")
    return f"the {colour} {kind} moves {direction}."


_MOVE_PATTERN = re.compile(
    r"\b({})\s+({})\s+moves\s+({})\b".format("|".join(COLOURS), "|".join(KINDS), "|".join(DIRECTIONS)),
    re.IGNORECASE,
)
_DIRECTION_PATTERN = re.compile(r"\bmov(?:es|ing|e)\s+({})\b".format("|".join(DIRECTIONS)), re.IGNORECASE)


def parse_direction(text: str) -> str | None:
    """The direction a caption states ("... moves left." -> "left"), or None."""
    match = _DIRECTION_PATTERN.search(text)
    return match.group(1).lower() if match else None


def parse_video_caption(text: str) -> tuple[str, str, str] | None:
    """``(colour, kind, direction)`` from a video caption, or None if it does not parse."""
    match = _MOVE_PATTERN.search(text)
    return tuple(g.lower() for g in match.groups()) if match else None  # type: ignore[return-value]


def direction_accuracy(pred: str | Sequence[str], target: str | Sequence[str]) -> float:
    """Fraction of predictions whose stated direction equals the target's."""
    pairs = _pairs(pred, target)
    return sum(parse_direction(p) is not None and parse_direction(p) == parse_direction(t) for p, t in pairs) / len(
        pairs
    )


def draw_motion_video(
    rng: np.random.Generator,
    direction: str,
    num_frames: int = 12,
    size: tuple[int, int] = (96, 96),
    colour: str = "red",
    kind: str = "circle",
    background: tuple[int, int, int] = BACKGROUND,
) -> np.ndarray:
    """One shape moving at constant speed in ``direction``: uint8 ``[F, H, W, 3]``.

    ``size`` is (width, height). The shape (side ~30% of the shorter frame side) starts near
    the edge opposite to ``direction`` and travels 75-100% of the free width/height, at a
    random offset along the other axis (``motion_path``).
    """
    Shape(colour, kind, POSITIONS[0])  # validates colour and kind
    side, centres = motion_path(rng, direction, num_frames, size)
    return render_motion(side, centres, size, colour, kind, background)


def motion_path(rng: np.random.Generator, direction: str, num_frames: int, size: tuple[int, int]) -> tuple[float, np.ndarray]:
    """-> (the shape's side, its centre (x, y) in pixels per frame ``[F, 2]``) of
    ``draw_motion_video``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose from {list(DIRECTIONS)}")
    if num_frames < 2:
        raise ValueError(f"a motion needs at least 2 frames, got {num_frames}")
    width, height = size
    side = 0.3 * min(width, height) * rng.uniform(0.9, 1.1)
    horizontal = direction in ("left", "right")
    extent = width if horizontal else height  # along the motion
    across = height if horizontal else width
    low, high = side / 2 + 1, extent - side / 2 - 1  # centre range that keeps the shape inside
    travel = (high - low) * rng.uniform(0.75, 1.0)
    start = low + rng.uniform(0, high - low - travel)
    track = np.linspace(start, start + travel, num_frames)
    if direction in ("left", "up"):  # image x grows rightwards and y downwards
        track = track[::-1]
    offset = across / 2 + rng.uniform(-0.25, 0.25) * (across - side)
    centres = np.stack([track, np.full_like(track, offset)] if horizontal else [np.full_like(track, offset), track], 1)
    return side, centres


def render_motion(side: float, centres: np.ndarray, size: tuple[int, int], colour: str, kind: str,
                  background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """The frames of a shape of ``side`` px at ``centres`` ``[F, 2]`` (x, y): uint8 ``[F, H, W, 3]``."""
    width, height = size
    frames = np.empty((len(centres), height, width, 3), dtype=np.uint8)
    for i, (cx, cy) in enumerate(centres):
        image = Image.new("RGB", (width, height), background)
        _draw_shape(ImageDraw.Draw(image), kind, float(cx), float(cy), side, COLOURS[colour])
        frames[i] = np.asarray(image)
    return frames


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 8, codec: str = "mpeg4") -> str:
    """Encode uint8 frames ``[F, H, W, 3]`` (RGB) as an mp4 with PyAV, atomically.

    ``codec``: "mpeg4" (any size; 1 Mb/s, near lossless at demo sizes) or "libx264"
    (CRF 18; yuv420p needs even width and height). Written to a temporary file in the same
    folder, then renamed, so a crash never leaves a half-written video under ``path``.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    if codec == "libx264" and (width % 2 or height % 2):
        raise ValueError(f"libx264 with yuv420p needs even frame sizes, got {width}x{height}; use codec='mpeg4'")
    path = os.fspath(path)

    def encode(tmp: str) -> None:
        options = {"crf": "18"} if codec == "libx264" else {}
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec == "mpeg4":
                stream.bit_rate = 1_000_000  # FFmpeg's 200 kb/s default blurs colours
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():  # flush delayed frames
                container.mux(packet)

    _atomic_write(path, encode)
    return path


# ---- the data set on disk -------------------------------------------------------------------


def _atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, then rename tmp onto ``path`` (same folder, so atomic)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def _sample_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """Independent generator per sample: regenerating one sample never shifts the others."""
    return np.random.default_rng([seed, _SPLIT_STREAMS[stream], index])


def _image_sample(seed: int, stream: str, index: int, scale: float, max_shapes: int):
    """(image, metadata) for sample ``index``; aspect ratios cycle so each split has all four."""
    rng = _sample_rng(seed, stream, index)
    aspect = list(ASPECT_RATIOS)[index % len(ASPECT_RATIOS)]
    canvas = canvas_sizes(scale)[aspect]
    shapes = random_shapes(rng, max_shapes)
    image = draw_shapes_image(rng, canvas, shapes)
    meta = {
        "caption": describe_shapes(shapes),
        "shapes": [asdict(s) for s in shapes],
        "canvas": list(canvas),
        "aspect_ratio": aspect,
    }
    return image, meta


def _video_sample(seed: int, stream: str, index: int, size, frame_range) -> tuple[np.ndarray, dict]:
    rng = _sample_rng(seed, stream, index)
    direction = DIRECTIONS[index % len(DIRECTIONS)]  # balanced classes
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    kind = KINDS[int(rng.integers(len(KINDS)))]
    num_frames = int(rng.integers(frame_range[0], frame_range[1] + 1))
    side, centres = motion_path(rng, direction, num_frames, tuple(size))
    frames = render_motion(side, centres, tuple(size), colour, kind)
    meta = {
        "caption": video_caption(colour, kind, direction),
        "direction": direction,
        "colour": colour,
        "kind": kind,
        "num_frames": num_frames,
        # the shape's centre per frame as fractions of the width / height (where it is when)
        "centres": [[round(float(x) / size[0], 4), round(float(y) / size[1], 4)] for x, y in centres],
    }
    return frames, meta


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime 0, root, 0644) so shards are byte-identical for a seed.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _encode_image(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_shard(path: str, samples: list[tuple[str, Image.Image, dict]]) -> None:
    """WebDataset shard as img2dataset writes it: key.jpg, key.txt, key.json per sample."""

    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, image, meta in samples:
                _tar_member(tar, f"{key}.jpg", _encode_image(image, "JPEG"))
                _tar_member(tar, f"{key}.txt", meta["caption"].encode("utf-8"))
                _tar_member(tar, f"{key}.json", json.dumps({"key": key, **meta}, sort_keys=True).encode("utf-8"))

    _atomic_write(path, write)


def iter_shard_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Read a shard back: yields ``{"key", "image" (PIL RGB), "caption", "meta"}`` in order."""
    with tarfile.open(os.fspath(path)) as tar:
        current: dict[str, Any] = {}
        for member in tar:
            key, _, ext = member.name.partition(".")
            if current and current["key"] != key:
                yield current
                current = {}
            data = tar.extractfile(member).read()
            current["key"] = key
            if ext == "jpg":
                current["image"] = Image.open(io.BytesIO(data)).convert("RGB")
            elif ext == "txt":
                current["caption"] = data.decode("utf-8")
            elif ext == "json":
                current["meta"] = json.loads(data)
        if current:
            yield current


_GENERATED_PATTERNS = (
    "images/train-*.tar",
    "images/test/*.png",
    "images/test.jsonl",
    "videos/train/*.mp4",
    "videos/test/*.mp4",
    "videos/train.jsonl",
    "videos/test.jsonl",
)


def _summary(out_dir: str, manifest: dict, reused: bool) -> dict[str, Any]:
    files = manifest["files"]
    return {
        "out_dir": out_dir,
        "manifest": os.path.join(out_dir, "manifest.json"),
        "reused": reused,
        "image_shards": [os.path.join(out_dir, p) for p in files["image_shards"]],
        "test_images": os.path.join(out_dir, files["test_images"]),
        "train_videos": os.path.join(out_dir, files["train_videos"]),
        "test_videos": os.path.join(out_dir, files["test_videos"]),
        "counts": dict(manifest["counts"]),
    }


def generate_shapes_world(
    out_dir: str | os.PathLike,
    n_train_images: int,
    n_test_images: int,
    n_train_videos: int,
    n_test_videos: int,
    seed: int = 0,
    shard_size: int = 256,
    scale: float = 1.0,
    video_size: tuple[int, int] = (96, 96),
    video_frames: tuple[int, int] = (8, 16),
    fps: int = 8,
    video_codec: str = "mpeg4",
    max_shapes: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the shapes world to ``out_dir`` (layout in the module docstring); reuse it if done.

    Every sample is drawn from its own generator seeded by ``(seed, split, index)``, so the
    output is byte-identical for a seed. ``manifest.json`` is written last; if it exists with
    the same generation arguments the data are reused untouched (``summary["reused"]``).
    Otherwise earlier outputs are deleted and everything is regenerated.

    Args:
        n_*: sample counts per split (>= 0).
        shard_size: training images per tar shard.
        scale: canvas scale (1.0 -> 112x112, 224x112, 112x224, 448x112).
        video_size: (width, height) of the videos; video_frames: inclusive frame-count range.
        fps, video_codec: mp4 encoding (see :func:`write_mp4`).
        max_shapes: 1..4 shapes per image.
        progress: show a tqdm progress bar.

    Returns:
        ``{"out_dir", "manifest", "reused", "image_shards": [paths], "test_images",
        "train_videos", "test_videos", "counts": {...}}`` (JSONL manifests as paths).
    """
    counts = {
        "train_images": n_train_images,
        "test_images": n_test_images,
        "train_videos": n_train_videos,
        "test_videos": n_test_videos,
    }
    for name, value in counts.items():
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not (2 <= video_frames[0] <= video_frames[1]):
        raise ValueError(f"video_frames must be (min, max) with 2 <= min <= max, got {video_frames}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    args = {
        "counts": {k: int(v) for k, v in counts.items()},
        "seed": int(seed),
        "shard_size": int(shard_size),
        "scale": float(scale),
        "video_size": [int(v) for v in video_size],
        "video_frames": [int(v) for v in video_frames],
        "fps": int(fps),
        "video_codec": video_codec,
        "max_shapes": int(max_shapes),
    }
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                existing = json.load(f)
        except (OSError, ValueError):
            existing = None  # unreadable manifest: regenerate
        if existing and existing.get("version") == _MANIFEST_VERSION and existing.get("args") == args:
            return _summary(out_dir, existing, reused=True)

    # Remove the manifest first: a crash from here on must not leave data marked complete.
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    for pattern in _GENERATED_PATTERNS:
        for stale in glob.glob(os.path.join(out_dir, pattern)):
            os.remove(stale)

    shard_paths: list[str] = []
    with tqdm(total=sum(counts.values()), desc="shapes world", unit="sample", disable=not progress) as bar:
        batch: list[tuple[str, Image.Image, dict]] = []
        for index in range(n_train_images):
            image, meta = _image_sample(seed, "train_images", index, scale, max_shapes)
            batch.append((f"{index:09d}", image, meta))
            if len(batch) == shard_size or index == n_train_images - 1:
                shard = f"images/train-{len(shard_paths):06d}.tar"
                _write_shard(os.path.join(out_dir, shard), batch)
                shard_paths.append(shard)
                batch = []
            bar.update(1)

        rows = []
        for index in range(n_test_images):
            image, meta = _image_sample(seed, "test_images", index, scale, max_shapes)
            name = f"test/{index:05d}.png"
            target = os.path.join(out_dir, "images", name)
            _atomic_write(target, lambda tmp, image=image: image.save(tmp, format="PNG"))
            rows.append({"image": name, **meta})
            bar.update(1)
        _write_jsonl(os.path.join(out_dir, "images", "test.jsonl"), rows)

        for split in ("train", "test"):
            rows = []
            for index in range(counts[f"{split}_videos"]):
                frames, meta = _video_sample(seed, f"{split}_videos", index, video_size, video_frames)
                name = f"{split}/{index:05d}.mp4"
                write_mp4(frames, os.path.join(out_dir, "videos", name), fps=fps, codec=video_codec)
                rows.append({"video": name, "fps": int(fps), **meta})
                bar.update(1)
            _write_jsonl(os.path.join(out_dir, "videos", f"{split}.jsonl"), rows)

    manifest = {
        "format": "shapes_world",
        "version": _MANIFEST_VERSION,
        "args": args,
        "counts": args["counts"],
        "files": {
            "image_shards": shard_paths,
            "test_images": "images/test.jsonl",
            "train_videos": "videos/train.jsonl",
            "test_videos": "videos/test.jsonl",
        },
    }
    _write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return _summary(out_dir, manifest, reused=False)
