"""Test corpora for the curation pipeline (tests/test_curation.py), with known faults.

Scenes are diverse enough that clean samples are not near-duplicates of each other: a random
background (plain, gradient, stripes, checks, dots or clouds, in random muted colours, angles
and periods) under 1-3 objects of 5 shapes x 6 saturated colours at random sizes and places.
The caption names the objects (left to right) and the background.

Faults are injected here from parameters the curation code never sees: the generator's RNG
and the frozen dataclasses :class:`ImageFaultParams` / :class:`VideoFaultParams` (with
:class:`SceneParams`, :class:`OverlayParams`, :class:`JunkParams`), whose defaults make the
*tuning* corpus the configs' defaults were checked on, and :data:`HELD_OUT_IMAGES` /
:data:`HELD_OUT_VIDEOS`, a second corpus from another seed and other fault parameters that
no threshold was ever looked at against. Each sample carries its ground truth in
``Truth.fault`` (``""`` for a clean sample), which only the test reads. The tuning corpus:

images  junk_caption (empty, too short/long, URL, file name, boilerplate, repetition, symbols),
        swapped_caption (another scene's caption, no (colour, shape) in common), exact_dup
        (byte copy of an earlier sample), resized_dup / recompressed_dup / cropped_dup (near
        duplicates: rescaled, JPEG quality 25-50, 5% of width and height cut off), always in
        a later shard than their original; bad_resolution (tiny, or extreme aspect), corrupt
        (truncated JPEG, random bytes, empty file), bad_json (a broken metadata member),
        plus a missing shard in the range and a truncated tar; and clean images with a word
        burnt in (the OCR metadata check).
videos  junk_caption, swapped_caption (differs in shape or colour: a direction-only swap is
        invisible to a mean-frame embedding), static (no motion at all), text_overlay (a
        caption banner on every frame), too_short (under the duration limit), low_resolution,
        corrupt (truncated / random bytes).

The held-out corpus draws the same kinds of fault with other parameters (see HELD_OUT_*).
A corpus is a function of its parameters: the same pixels and captions on every run (the
MP4 bytes of a tiny clip can differ now and then: libx264 is not bit-exact at 32 x 32).

Also here: the clean *training split* (other scenes from the same generator) and the tiny
open_clip model trained on it (:func:`train_tiny_clip`), whose weights file the CLIP stages
load through the config like any other open_clip checkpoint.
"""
from __future__ import annotations

import io
import json
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 85, 245),
    "yellow": (245, 225, 40),
    "purple": (165, 50, 215),
    "orange": (250, 140, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "dotted", "cloudy")
DIRECTIONS = ("left", "right", "up", "down")
OVERLAY_WORDS = ("SALE", "LIVE", "HOT DEAL", "TOP 10", "NEWS", "SHOP NOW", "FREE", "WIN")


# --------------------------------------------------------------------------- parameters


def _draw(rng: np.random.Generator, value: float | tuple[float, float]) -> float:
    """A fixed value, or uniform in a (low, high) range (only a range draws from ``rng``)."""
    return float(rng.uniform(*value)) if isinstance(value, tuple) else float(value)


@dataclass(frozen=True)
class SceneParams:
    """The scene generator's mix (the curated corpora and the training split share it)."""

    object_size: tuple[float, float] = (0.3, 0.42)  # side, fraction of the canvas's shorter side
    n_objects_p: tuple[float, float, float] = (0.2, 0.5, 0.3)  # P(1, 2, 3 objects)
    background_p: tuple[float, ...] | None = None  # over BACKGROUNDS; None: uniform


@dataclass(frozen=True)
class OverlayParams:
    """A caption banner burnt into a picture (text-overlaid frames, OCR'd images)."""

    words: tuple[str, ...] = OVERLAY_WORDS
    font_size: tuple[float, float] = (0.18, 0.24)  # of the shorter side
    place: str = "anywhere"  # banner top uniform over the height; "top" / "bottom": within 12% of that edge
    align: str = "left"  # text 3 px from the left; "centre"; "right"
    banner: str = "full"  # a dark band across the width; "box": a dark box just behind the text
    banner_level: int = 45  # banner colour channels uniform in [0, banner_level)
    text_colour: tuple[int, int, int] = (255, 255, 255)


@dataclass(frozen=True)
class JunkParams:
    """What junk captions are made of (one of eight kinds per caption, uniformly)."""

    placeholders: tuple[str, ...] = ("img", "photo", "image", "untitled", "pic")
    # Format fields: n (1000-99998), a = n % 9, b = n * 7, d = 20190000 + n, s = n * 3 % 999999.
    url: str = "https://cdn{a}.example-shop.com/images/{n}/product_{b}.jpg"
    filename: str = "IMG_{d}_{s:06d}.JPG"
    boilerplate: tuple[str, ...] = (
        "Click here to buy now! Free shipping on all orders",
        "stock photo - all rights reserved",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit",
        "Subscribe to our newsletter for more great deals",
    )
    repeat_word: str = "colour"  # the first object's "colour" or "shape", repeated
    repeats: tuple[int, int] = (8, 16)  # rng.integers range
    symbols: str = "#$%&*@!?~^+=<>|{}[]¥©®™§¶•"
    symbol_count: tuple[int, int] = (12, 30)
    long_words: tuple[int, int] | int = 90  # words of a far too long caption (a range draws)


@dataclass(frozen=True)
class ImageFaultParams:
    """Everything the image corpus and its faults are drawn from (defaults: the tuning corpus)."""

    seed: int = 0
    n_clean: int = 240  # clean-sample slots (some then get a junk or swapped caption)
    n_shards: int = 6  # plus a missing shard and a truncated one after them
    side: tuple[int, int] = (68, 101)  # clean image width and height, integers in [low, high)
    jpeg_quality: int = 92  # of every image but the recompressed copies
    scene: SceneParams = SceneParams()
    n_text: int = 12  # clean images with a word burnt in (OCR metadata), resized to text_side first
    text_side: int = 128
    overlay: OverlayParams = OverlayParams()
    n_junk: int = 20  # junk / swapped caption slots (slots that got a burnt-in word stay clean)
    n_swap: int = 20
    junk: JunkParams = JunkParams()
    duplicates: tuple[tuple[str, int], ...] = (("byte copy", 10), ("resized", 7), ("recompressed", 7), ("cropped", 12))
    resize_up: tuple[float, float] = (1.2, 1.5)  # factor of an upscaled copy ...
    resize_down: tuple[float, float] = (0.7, 0.85)  # ... or a downscaled one (shorter side kept >= 66)
    resize_up_p: float = 0.5
    recompress_quality: tuple[int, int] = (25, 50)  # JPEG quality of a recompressed copy, in [low, high)
    crop_fraction: float = 0.05  # of the width and of the height cut off a cropped copy
    crop_place: str = "random"  # the cut split at a random place; "edges": all of it off one side per axis
    n_bad_resolution: int = 8  # alternately tiny and extreme aspect
    tiny_side: tuple[int, int] = (16, 26)
    extreme_long: tuple[int, int] = (200, 260)
    extreme_short: tuple[int, int] = (36, 50)
    extreme_tall_p: float = 0.0  # chance an extreme-aspect image is tall rather than wide


@dataclass(frozen=True)
class VideoFaultParams:
    """Everything the video corpus and its faults are drawn from (defaults: the tuning corpus)."""

    seed: int = 1
    n_clean: int = 64
    width: int = 128
    height: int = 128
    num_frames: int = 12
    fps: int = 8
    crf: int = 18  # libx264
    scene: SceneParams = SceneParams()
    object_max_size: float = 0.3  # of the frame's shorter side: objects stay inside along their travel
    n_objects_p: tuple[float, float] = (0.6, 0.4)  # P(1, 2 objects)
    travel: float | tuple[float, float] = 0.35  # of the frame, over the clip
    pan: tuple[float, float] = (0.1, 0.25)  # background pan of half the clips, of the width over the clip
    faults: tuple[tuple[str, int], ...] = (("static", 10), ("text_overlay", 10), ("swapped_caption", 10),
                                           ("junk_caption", 6), ("too_short", 4))
    too_short_frames: int = 2
    n_low_resolution: int = 3
    low_resolution: tuple[int, int] = (32, 32)  # width, height
    sensor_noise: float = 0.0  # sigma of per-frame Gaussian noise on every clip: 0 = a static clip is bit-identical
    overlay: OverlayParams = OverlayParams()
    junk: JunkParams = JunkParams()
    n_shards: int = 2


# The held-out corpus: another seed and fault parameters no threshold was chosen against,
# each a plausible variant of the same fault (not an adversarial one).
HELD_OUT_SCENE = SceneParams(object_size=(0.27, 0.42), n_objects_p=(0.15, 0.45, 0.4),
                             background_p=(0.1, 0.1, 0.25, 0.25, 0.15, 0.15))  # more textured backgrounds
HELD_OUT_OVERLAY = OverlayParams(
    words=("BREAKING", "GOAL", "REPLAY", "PROMO", "VOTE", "SOLD OUT", "50% OFF", "TRAILER"),
    font_size=(0.13, 0.19), place="bottom", align="centre", banner="box", banner_level=70,
    text_colour=(255, 230, 60))  # lower-third captions in yellow on a box behind the text
HELD_OUT_JUNK = JunkParams(
    placeholders=("thumbnail", "no title", "dsc", "preview", "banner"),
    url="www.{a}-photo-hub.net/gallery?id={n}&ref=feed",
    filename="PXL_{d}_{s:06d}.jpg",
    boilerplate=(
        "Copyright 2021 Example Media Ltd. Reproduction prohibited",
        "Download free vector art and photos for your next project",
        "Buy now and save 30 percent on every order today",
        "Royalty free stock image, licensed for editorial use only",
    ),
    repeat_word="shape", repeats=(5, 10), symbols="«»¿¡†‡°±×÷‰※◆▲■●★☆→←", symbol_count=(8, 24),
    long_words=(70, 120))
HELD_OUT_IMAGES = ImageFaultParams(
    seed=7, n_clean=120, n_shards=4, side=(76, 121), jpeg_quality=85, scene=HELD_OUT_SCENE, n_text=12,
    text_side=112, overlay=HELD_OUT_OVERLAY, n_junk=13, n_swap=13, junk=HELD_OUT_JUNK,
    duplicates=(("byte copy", 10), ("resized", 10), ("recompressed", 10), ("cropped", 12)),
    resize_up=(1.4, 1.9), resize_down=(0.6, 0.8), recompress_quality=(30, 60), crop_place="edges",
    n_bad_resolution=10, tiny_side=(30, 60), extreme_long=(270, 380), extreme_short=(64, 86), extreme_tall_p=0.5)
HELD_OUT_VIDEOS = VideoFaultParams(
    seed=11, n_clean=40, width=160, height=120, num_frames=18, fps=12, scene=HELD_OUT_SCENE, object_max_size=0.27,
    n_objects_p=(0.5, 0.5), travel=(0.25, 0.45), pan=(0.05, 0.2),
    faults=(("static", 10), ("text_overlay", 10), ("swapped_caption", 10), ("junk_caption", 10), ("too_short", 5)),
    too_short_frames=6, n_low_resolution=5, low_resolution=(48, 36), sensor_noise=2.0, overlay=HELD_OUT_OVERLAY,
    junk=HELD_OUT_JUNK)

# --------------------------------------------------------------------------- drawing


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A background colour: darker and less saturated than any object colour."""
    grey = rng.uniform(25, 120)
    return np.clip(grey + rng.uniform(-30, 30, 3), 0, 255)


def draw_background(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3] background of one of BACKGROUNDS with random parameters."""
    c1, c2 = _muted(rng), _muted(rng)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "plain":
        out = np.broadcast_to(c1, (height, width, 3)) + rng.normal(0, 3, (height, width, 3))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(1e-6, np.ptp(t))
        out = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == "striped":
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 18)
        t = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period + rng.uniform(0, 6.3)) > 0
        out = np.where(t[..., None], c1, c2)
    elif kind == "checkered":
        period = rng.uniform(6, 16)
        t = ((np.floor((x + rng.uniform(0, 16)) / period) + np.floor((y + rng.uniform(0, 16)) / period)) % 2) == 0
        out = np.where(t[..., None], c1, c2)
    elif kind == "dotted":
        period, radius = rng.uniform(8, 16), rng.uniform(1.5, 3.5)
        ox, oy = rng.uniform(0, period, 2)
        dx, dy = (x + ox) % period - period / 2, (y + oy) % period - period / 2
        t = dx * dx + dy * dy < radius * radius
        out = np.where(t[..., None], c2, c1)
    elif kind == "cloudy":
        coarse = rng.uniform(0, 1, (5, 5, 3)).astype(np.float32)
        smooth = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
        t = smooth.astype(np.float32) / 255.0
        out = c1 * (1 - t) + c2 * t
    else:
        raise ValueError(kind)
    return np.clip(out, 0, 255).astype(np.uint8)


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    h = size / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * 0.45
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = size * 0.17
        draw.rectangle([cx - h, cy - w, cx + h, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
    else:
        raise ValueError(shape)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cx: float  # centre, as a fraction of the canvas width / height
    cy: float
    size: float  # side, as a fraction of the canvas's shorter side


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]
    seed: int  # of the background's random parameters

    @property
    def concepts(self) -> frozenset[tuple[str, str]]:
        return frozenset((o.colour, o.shape) for o in self.objects)


def random_scene(rng: np.random.Generator, n_objects: int | None = None, params: SceneParams = SceneParams()) -> Scene:
    """1-3 objects with distinct (colour, shape), placed without much overlap."""
    n = n_objects or int(rng.choice([1, 2, 3], p=list(params.n_objects_p)))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), n, replace=False)]
    objects: list[Obj] = []
    for colour, shape in chosen:
        for _ in range(50):
            size = rng.uniform(*params.object_size)
            cx, cy = rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02, 2)
            if all(abs(cx - o.cx) > (size + o.size) / 2.2 or abs(cy - o.cy) > (size + o.size) / 2.2 for o in objects):
                break
        objects.append(Obj(colour, shape, float(cx), float(cy), float(size)))
    background = (rng.choice(BACKGROUNDS) if params.background_p is None
                  else rng.choice(BACKGROUNDS, p=list(params.background_p)))
    return Scene(str(background), tuple(sorted(objects, key=lambda o: o.cx)), int(rng.integers(1 << 31)))


def render_scene(scene: Scene, width: int, height: int, shift: tuple[float, float] = (0.0, 0.0),
                 background_shift: float = 0.0) -> Image.Image:
    """The scene on a width x height canvas; ``shift`` moves the objects and
    ``background_shift`` pans the background (fractions of the canvas), for video frames."""
    rng = np.random.default_rng(scene.seed)
    pad = int(round(abs(background_shift) * width)) + 1
    bg = draw_background(rng, scene.background, width + pad, height)
    offset = int(round(background_shift * width)) % pad if pad > 1 else 0
    image = Image.fromarray(np.ascontiguousarray(bg[:, offset:offset + width]))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for o in scene.objects:
        _draw_object(draw, o.shape, (o.cx + shift[0]) * width, (o.cy + shift[1]) * height, o.size * side, COLOURS[o.colour])
    return image


def _names(objects: Sequence[Obj]) -> list[str]:
    return [f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape}" for o in objects]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def image_caption(scene: Scene, rng: np.random.Generator) -> str:
    things = _join(_names(scene.objects))
    bg = {"plain": "a plain", "gradient": "a gradient", "striped": "a striped", "checkered": "a checkered",
          "dotted": "a dotted", "cloudy": "a cloudy"}[scene.background]
    template = int(rng.integers(4))
    if template == 0:
        return f"{things} on {bg} background."
    if template == 1:
        return f"a picture of {things} on {bg} background"
    if template == 2:
        return f"{things[0].upper()}{things[1:]}, drawn over {bg} backdrop."
    return f"a photo showing {things} in front of {bg} background"


def video_caption(scene: Scene, direction: str, rng: np.random.Generator) -> str:
    things = _join(_names(scene.objects))
    verb = "moves" if len(scene.objects) == 1 else "move"
    if int(rng.integers(2)):
        return f"{things} {verb} {direction} over a {scene.background} background."
    return f"a video of {things} that {verb} {direction} across a {scene.background} background"


def overlay_text(image: Image.Image, rng: np.random.Generator, word: str,
                 params: OverlayParams = OverlayParams()) -> Image.Image:
    """Burn a caption banner into the image (as broadcast overlays and memes do)."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    w, h = image.size
    size = max(10, int(min(w, h) * rng.uniform(*params.font_size)))
    font = ImageFont.load_default(size=size)
    band = int(size * 1.3)
    if params.place == "anywhere":
        y0 = int(rng.integers(0, max(1, h - int(size * 1.35))))
    elif params.place == "top":
        y0 = int(rng.integers(0, max(1, int(0.12 * h))))
    elif params.place == "bottom":
        low = max(0, h - band - 1 - int(0.12 * h))
        y0 = int(rng.integers(low, max(low + 1, h - band - 1)))
    else:
        raise ValueError(params.place)
    text_w = draw.textlength(word, font=font)
    x = {"left": 3, "centre": (w - text_w) / 2, "right": w - text_w - 3}[params.align]
    x = max(0, int(round(x)))
    colour = tuple(int(v) for v in rng.integers(0, params.banner_level, 3))
    if params.banner == "full":
        draw.rectangle([0, y0, w - 1, y0 + band], fill=colour)
    elif params.banner == "box":
        draw.rectangle([max(0, x - 4), y0, min(w - 1, x + int(text_w) + 4), y0 + band], fill=colour)
    else:
        raise ValueError(params.banner)
    draw.text((x, y0 + 1), word, font=font, fill=params.text_colour)
    return image


def encode_jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- junk captions


def junk_caption(rng: np.random.Generator, scene: Scene, params: JunkParams = JunkParams()) -> str:
    """A caption that a caption rule should reject (drawn from kinds the rules never see)."""
    kind = int(rng.integers(8))
    n = int(rng.integers(1000, 99999))
    fields = {"n": n, "a": n % 9, "b": n * 7, "d": 20190000 + n, "s": n * 3 % 999999}
    if kind == 0:
        return ""
    if kind == 1:
        return str(rng.choice(list(params.placeholders)))
    if kind == 2:
        return params.url.format(**fields)
    if kind == 3:
        return params.filename.format(**fields)
    if kind == 4:
        return str(rng.choice(list(params.boilerplate)))
    if kind == 5:
        word = getattr(scene.objects[0], params.repeat_word)
        return " ".join([word] * int(rng.integers(*params.repeats)))
    if kind == 6:
        return "".join(rng.choice(list(params.symbols)) for _ in range(int(rng.integers(*params.symbol_count))))
    count = int(rng.integers(*params.long_words)) if isinstance(params.long_words, tuple) else params.long_words
    vocabulary = list(COLOURS) + list(SHAPES) + ["a", "and", "on", "the", "big", "small"]
    words = [str(rng.choice(vocabulary)) for _ in range(count)]
    return " ".join(words)  # far too long


def swapped_caption_donor(rng: np.random.Generator, scene: Scene, others: Sequence[Scene]) -> int:
    """Index of a scene whose objects differ from ``scene``'s in shape or colour: no
    (colour, shape) pair in common."""
    order = rng.permutation(len(others))
    for i in order:
        if not (others[i].concepts & scene.concepts):
            return int(i)
    raise RuntimeError("no donor scene")


# --------------------------------------------------------------------------- shards


@dataclass
class Truth:
    key: str
    shard: int
    fault: str  # "" for a clean sample, else the injected fault
    detail: str = ""  # e.g. which near-duplicate transform, which junk kind
    original: str = ""  # key of the sample a duplicate copies
    ocr_word: str = ""  # the word burnt into an image (OCR metadata check)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[dict]) -> None:
    """samples: {"key", "members": {ext: bytes}} in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in s["members"].items():
                _add(tar, f"{s['key']}.{ext}", data)


def make_image_corpus(root: Path, params: ImageFaultParams = ImageFaultParams()) -> dict:
    """Image-caption samples in ``params.n_shards`` tar shards plus a missing shard and a
    truncated one (the defaults: ~290 samples in 6 + 2 shards): ``{"pattern", "truth": {key:
    Truth}, "dup_pairs": [(original key, copy key)], "n_shards", "scenes", "params"}``."""
    p = params
    n_clean, n_shards = p.n_clean, p.n_shards
    rng = np.random.default_rng(p.seed)
    root.mkdir(parents=True, exist_ok=True)
    scenes = [random_scene(rng, params=p.scene) for _ in range(n_clean)]
    sizes = [(int(rng.integers(*p.side)), int(rng.integers(*p.side))) for _ in scenes]  # a 5% crop stays >= 64
    images = [render_scene(s, w, h) for s, (w, h) in zip(scenes, sizes)]
    ocr_words: dict[int, str] = {}
    for i in rng.choice(n_clean, p.n_text, replace=False):
        word = str(rng.choice(list(p.overlay.words)))
        images[i] = overlay_text(images[i].resize((p.text_side, p.text_side)), rng, word, p.overlay)
        ocr_words[int(i)] = word
    captions = [image_caption(s, rng) for s in scenes]

    shards: list[list[dict]] = [[] for _ in range(n_shards)]
    truth: dict[str, Truth] = {}

    def put(shard: int, members: dict, fault: str, **kw) -> str:
        key = f"s{shard}_{len(shards[shard]):04d}"
        shards[shard].append({"key": key, "members": members})
        truth[key] = Truth(key, shard, fault, **kw)
        return key

    def meta(i: int, image: Image.Image, extra: dict | None = None) -> bytes:
        return json.dumps({"url": f"https://example.org/{i}.jpg", "width": image.width, "height": image.height,
                           **(extra or {})}).encode()

    def jpg(image: Image.Image) -> bytes:
        return encode_jpeg(image, p.jpeg_quality)

    # Clean samples spread over all shards; faults are drawn per clean-sample slot.
    n_junk, n_swap = p.n_junk, p.n_swap
    fault_slots = rng.permutation(n_clean)
    junk_ids, swap_ids = set(fault_slots[:n_junk].tolist()), set(fault_slots[n_junk:n_junk + n_swap].tolist())
    junk_ids -= set(ocr_words)
    swap_ids -= set(ocr_words)
    keys: dict[int, str] = {}
    jpeg: dict[int, bytes] = {}
    for i in range(n_clean):
        shard = i * n_shards // n_clean
        jpeg[i] = jpg(images[i])
        if i in junk_ids:
            cap, fault, detail = junk_caption(rng, scenes[i], p.junk), "junk_caption", ""
        elif i in swap_ids:
            donor = swapped_caption_donor(rng, scenes[i], scenes)
            cap, fault, detail = captions[donor], "swapped_caption", f"from {donor}"
        else:
            cap, fault, detail = captions[i], "", ""
        keys[i] = put(shard, {"jpg": jpeg[i], "txt": cap.encode(), "json": meta(i, images[i])}, fault, detail=detail,
                      ocr_word=ocr_words.get(i, ""))

    # Duplicates of clean samples (not of faulty or text ones), always in a later shard.
    clean_ids = [i for i in range(n_clean) if truth[keys[i]].fault == "" and i not in ocr_words
                 and i * n_shards // n_clean < n_shards - 1]
    kinds = [kind for kind, count in p.duplicates for _ in range(count)]
    originals = rng.choice(clean_ids, len(kinds), replace=False)
    dup_pairs = []
    for kind, i in zip(kinds, originals):
        i = int(i)
        src_shard = i * n_shards // n_clean
        shard = int(rng.integers(src_shard + 1, n_shards))
        img = images[i]
        if kind == "byte copy":
            data, fault = jpeg[i], "exact_dup"
        else:
            fault = f"{kind}_dup"
            if kind == "resized":  # up, or down but staying above the resolution stage's limit
                f = (rng.uniform(*p.resize_up) if rng.random() < p.resize_up_p
                     else max(rng.uniform(*p.resize_down), 66 / min(img.size)))
                data = jpg(img.resize((round(img.width * f), round(img.height * f)), Image.BICUBIC))
            elif kind == "recompressed":
                data = encode_jpeg(img, quality=int(rng.integers(*p.recompress_quality)))
            elif kind == "cropped":  # crop_fraction of the width and of the height cut off
                dx, dy = round(img.width * p.crop_fraction), round(img.height * p.crop_fraction)
                if p.crop_place == "random":  # split between the two sides at a random place
                    ox, oy = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
                elif p.crop_place == "edges":  # all of it off one side (left or right, top or bottom)
                    ox, oy = dx * int(rng.integers(2)), dy * int(rng.integers(2))
                else:
                    raise ValueError(p.crop_place)
                data = jpg(img.crop((ox, oy, ox + img.width - dx, oy + img.height - dy)))
            else:
                raise ValueError(kind)
        dup_key = put(shard, {"jpg": data, "txt": captions[i].encode(), "json": meta(i, img)}, fault, detail=kind,
                      original=keys[i])
        dup_pairs.append((keys[i], dup_key))

    # Resolution faults: tiny, or extreme aspect ratio (clean captions).
    for k in range(p.n_bad_resolution):
        scene = random_scene(rng, params=p.scene)
        if k % 2 == 0:
            w, h = int(rng.integers(*p.tiny_side)), int(rng.integers(*p.tiny_side))
        else:
            w, h = int(rng.integers(*p.extreme_long)), int(rng.integers(*p.extreme_short))
            if p.extreme_tall_p and rng.random() < p.extreme_tall_p:
                w, h = h, w
        img = render_scene(scene, w, h)
        put(int(rng.integers(n_shards)), {"jpg": jpg(img), "txt": image_caption(scene, rng).encode(),
                                          "json": meta(-1, img)}, "bad_resolution", detail=f"{w}x{h}")

    # Corrupt media and a broken metadata member.
    good = jpg(render_scene(random_scene(rng, params=p.scene), 80, 80))
    noise = bytes(rng.integers(0, 256, 3000, dtype=np.uint8))
    for data, detail in [(good[: len(good) // 2], "truncated"), (noise, "random bytes"), (b"", "empty"),
                         (good[: len(good) // 3], "truncated")]:
        put(int(rng.integers(n_shards)), {"jpg": data, "txt": b"a red circle on a plain background."}, "corrupt",
            detail=detail)
    put(int(rng.integers(n_shards)), {"jpg": good, "txt": b"a red circle.", "json": b"{not json"}, "bad_json")

    # Shuffle within each shard (originals may then follow copies inside a shard, but a copy
    # is always in a later shard than its original, so "earliest wins" keeps the original).
    for shard, samples in enumerate(shards):
        order = rng.permutation(len(samples))
        write_tar(root / f"{shard:06d}.tar", [samples[j] for j in order])
    # A missing shard in the range, and a shard that breaks off mid-member.
    truncated = root / f"{n_shards + 1:06d}.tar"
    tail_scene = random_scene(rng, params=p.scene)
    tail = [{"key": f"t_{j}", "members": {"jpg": jpg(render_scene(tail_scene, 70, 70)),
                                          "txt": image_caption(tail_scene, rng).encode()}} for j in range(3)]
    write_tar(truncated, tail)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: 512 * 2 + len(tail[0]["members"]["jpg"]) // 2])
    pattern = str(root / f"{{000000..{n_shards + 1:06d}}}.tar")
    return {"pattern": pattern, "truth": truth, "dup_pairs": dup_pairs, "n_shards": n_shards + 2,
            "scenes": scenes, "params": p}


# --------------------------------------------------------------------------- videos


def video_frames(scene: Scene, direction: str, num_frames: int, width: int, height: int, static: bool = False,
                 pan: float = 0.0, travel: float = 0.35) -> list[Image.Image]:
    """Objects travelling ``travel`` of the frame in ``direction`` (and the background panning
    by ``pan`` of the width), or every frame identical when ``static``."""
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    frames = []
    for t in range(num_frames):
        s = 0.0 if static else travel * (t / max(1, num_frames - 1) - 0.5)
        frames.append(render_scene(scene, width, height, shift=(dx * s, dy * s),
                                   background_shift=0.0 if static else pan * t / max(1, num_frames - 1)))
    return frames


VIDEO_OBJECT_MAX_SIZE = 0.3  # of the frame's side: the object stays inside along its travel


def moving_scene(rng: np.random.Generator, direction: str, params: SceneParams = SceneParams(),
                 max_size: float = VIDEO_OBJECT_MAX_SIZE, n_objects_p: tuple[float, float] = (0.6, 0.4)) -> Scene:
    """A scene whose objects stay inside the frame along their travel (up to ~45%)."""
    base = random_scene(rng, n_objects=int(rng.choice([1, 2], p=list(n_objects_p))), params=params)
    objects = []
    for k, o in enumerate(base.objects):
        size = min(o.size, max_size)
        along = 0.5 if direction in ("left", "right") else None
        cx = 0.5 if along is not None else (0.28 if k == 0 else 0.72) if len(base.objects) > 1 else 0.5
        cy = (0.28 if k == 0 else 0.72) if (along is not None and len(base.objects) > 1) else 0.5
        objects.append(Obj(o.colour, o.shape, cx + rng.uniform(-0.05, 0.05), cy + rng.uniform(-0.05, 0.05), size))
    return Scene(base.background, tuple(sorted(objects, key=lambda o: o.cx)), base.seed)


def add_sensor_noise(frames: Sequence[Image.Image], rng: np.random.Generator, sigma: float) -> list[Image.Image]:
    """Independent Gaussian noise of ``sigma`` (8-bit levels) on every frame: what a real
    camera gives even when nothing moves."""
    return [Image.fromarray(np.clip(np.asarray(f, np.float32) + rng.normal(0, sigma, (f.height, f.width, 3)), 0, 255)
                            .round().astype(np.uint8)) for f in frames]


def encode_mp4(frames: Sequence[Image.Image], fps: int = 8, crf: int = 18) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_video_corpus(root: Path, params: VideoFaultParams = VideoFaultParams()) -> dict:
    """Video-caption samples in ``params.n_shards`` tar shards (the defaults: ~110 in two):
    ``{"pattern", "truth", "params"}``."""
    p = params
    rng = np.random.default_rng(p.seed)
    root.mkdir(parents=True, exist_ok=True)
    truth: dict[str, Truth] = {}
    shards: list[list[dict]] = [[] for _ in range(p.n_shards)]
    faults = [fault for fault, count in p.faults for _ in range(count)]
    specs = []
    for _ in range(p.n_clean + len(faults) + p.n_low_resolution):
        direction = str(rng.choice(DIRECTIONS))
        specs.append((moving_scene(rng, direction, p.scene, p.object_max_size, p.n_objects_p), direction))
    scenes = [s for s, _ in specs]

    def put(members: dict, fault: str, detail: str = "") -> None:
        shard = int(rng.integers(p.n_shards))
        key = f"v{shard}_{len(shards[shard]):04d}"
        shards[shard].append({"key": key, "members": members})
        truth[key] = Truth(key, shard, fault, detail)

    def noisy(frames: list[Image.Image]) -> list[Image.Image]:
        if not p.sensor_noise:
            return frames
        return add_sensor_noise(frames, np.random.default_rng(int(rng.integers(1 << 31))), p.sensor_noise)

    plan = [""] * p.n_clean + faults
    for i, fault in enumerate(plan):
        scene, direction = specs[i]
        pan = float(rng.choice([0.0, rng.uniform(*p.pan)]))
        travel = _draw(rng, p.travel)
        frames = video_frames(scene, direction, p.too_short_frames if fault == "too_short" else p.num_frames,
                              p.width, p.height, static=fault == "static", pan=pan, travel=travel)
        frames = noisy(frames)
        if fault == "text_overlay":
            word = str(rng.choice(list(p.overlay.words)))
            banner_rng_seed = int(rng.integers(1 << 31))  # the same banner on every frame
            frames = [overlay_text(f, np.random.default_rng(banner_rng_seed), word, p.overlay) for f in frames]
        caption = video_caption(scene, direction, rng)
        if fault == "swapped_caption":
            donor = swapped_caption_donor(rng, scene, scenes)
            caption = video_caption(scenes[donor], direction, rng)
        elif fault == "junk_caption":
            caption = junk_caption(rng, scene, p.junk)
        put({"mp4": encode_mp4(frames, p.fps, p.crf), "txt": caption.encode()}, fault)
    for k in range(p.n_low_resolution):
        scene, direction = specs[len(plan) + k]
        frames = noisy(video_frames(scene, direction, p.num_frames, *p.low_resolution, travel=_draw(rng, p.travel)))
        put({"mp4": encode_mp4(frames, p.fps, p.crf), "txt": video_caption(scene, direction, rng).encode()},
            "low_resolution")
    ok = encode_mp4(video_frames(scenes[0], "left", p.num_frames, p.width, p.height), p.fps, p.crf)
    for data, detail in [(ok[: len(ok) // 2], "truncated"), (bytes(rng.integers(0, 256, 5000, dtype=np.uint8)), "random bytes"),
                         (ok[:64], "header only")]:
        put({"mp4": data, "txt": b"a red circle moves left over a plain background."}, "corrupt", detail)
    for shard, samples in enumerate(shards):
        order = rng.permutation(len(samples))
        write_tar(root / f"{shard:06d}.tar", [samples[j] for j in order])
    return {"pattern": str(root / f"{{000000..{p.n_shards - 1:06d}}}.tar"), "truth": truth, "params": p}


# --------------------------------------------------------------------------- training split


def training_pairs(seed: int = 100, n_images: int = 900, n_videos: int = 300, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """The clean training split: (uint8 [N, size, size, 3] images, captions). Images are
    scenes at random sizes squashed to ``size``; video pairs are a random frame of a moving
    scene with its video caption. Other scenes than the curated splits (another seed)."""
    rng = np.random.default_rng(seed)
    arrays, captions = [], []
    for _ in range(n_images):
        scene = random_scene(rng)
        w, h = int(rng.integers(68, 101)), int(rng.integers(68, 101))
        img = render_scene(scene, w, h)
        if rng.random() < 0.1:
            img = overlay_text(img, rng, str(rng.choice(OVERLAY_WORDS)))
        arrays.append(np.asarray(img.resize((size, size), Image.BICUBIC)))
        captions.append(image_caption(scene, rng))
    for _ in range(n_videos):
        direction = str(rng.choice(DIRECTIONS))
        scene = moving_scene(rng, direction)
        s = 0.35 * (rng.random() - 0.5)
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        img = render_scene(scene, 128, 128, shift=(dx * s, dy * s))
        arrays.append(np.asarray(img.resize((size, size), Image.BICUBIC)))
        captions.append(video_caption(scene, direction, rng))
    return np.stack(arrays), captions


# ViT with 8-px patches on 48-px images (37 tokens), two layers: small enough to train in
# well under a minute on 2 CPUs, fine enough to tell the five shapes apart.
TINY_CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


MIN_VIEW_SCALE = 0.9  # SimCLR views keep 90-100% of each side (near-duplicate crops cut 5%)
SIMCLR_TEMPERATURE = 0.1


def _random_view(x, g):
    """A copy-detection view of each image in x [N, 3, S, S]: random crop of 85-100% of
    each side at a random place, scaled back to S (what a re-upload, thumbnail or crop does)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    scale = MIN_VIEW_SCALE + (1 - MIN_VIEW_SCALE) * torch.rand(n, 2, generator=g)
    shift = (1 - scale) * (2 * torch.rand(n, 2, generator=g) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale[:, 0], scale[:, 1]
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def train_tiny_clip(out_dir: Path, steps: int = 300, batch_size: int = 64, seed: int = 0, lr: float = 3e-3,
                    simclr_weight: float = 1.0, logit_scale: float = 10.0, config: dict | None = None) -> dict:
    """Fit a tiny open_clip CLIP (ViT + text transformer, TINY_CLIP_CONFIG) on the training
    split with the CLIP loss plus, SLIP-style, a SimCLR loss between each image and a crop
    of it (so that its image embedding also tells one picture from another, as the
    copy-detection descriptors used for de-duplication do). The logit scale is held at
    ``logit_scale``: a learnt one grows until matched and unmatched pairs are a few
    hundredths of cosine apart, which a fixed threshold could not use. Fixed step count and
    seed: the same model on every run. Writes ``tiny_clip.json`` (its open_clip model
    config) and ``tiny_clip.safetensors``; returns {"model_config", "weights", "seconds",
    "loss", "steps"}."""
    import torch

    threads = torch.get_num_threads()
    # One thread: beside Ray's processes on a 2-core machine, two OpenMP threads spin
    # against each other and run ~8x slower than one.
    torch.set_num_threads(1)
    try:
        return _fit(out_dir, steps, batch_size, seed, lr, simclr_weight, logit_scale, config or TINY_CLIP_CONFIG)
    finally:
        torch.set_num_threads(threads)


def _fit(out_dir: Path, steps: int, batch_size: int, seed: int, lr: float, simclr_weight: float, logit_scale: float,
         config: dict) -> dict:
    import open_clip
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "tiny_clip.json"
    config_path.write_text(json.dumps(config))
    torch.manual_seed(seed)
    open_clip.add_model_config(config_path)
    model = open_clip.create_model("tiny_clip", pretrained=None)
    tokenizer = open_clip.get_tokenizer("tiny_clip")
    images, captions = training_pairs(size=config["vision_cfg"]["image_size"])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    tokens = tokenizer(captions)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(logit_scale)))
    model.logit_scale.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch_size)
    start, loss = time.time(), float("nan")
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(captions), generator=g)[:batch_size]
        x = pixels[idx]
        views = torch.cat([x, _random_view(x, g)]) if simclr_weight else x
        emb = F.normalize(model.encode_image(views), dim=-1)
        img = emb[:batch_size]
        txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        logits = logit_scale * img @ txt.T
        loss_t = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        if simclr_weight:
            sim = emb @ emb.T / SIMCLR_TEMPERATURE
            sim.fill_diagonal_(float("-inf"))
            loss_t = loss_t + simclr_weight * F.cross_entropy(sim, torch.cat([labels + batch_size, labels]))
        opt.zero_grad()
        loss_t.backward()
        opt.step()
        sched.step()
        loss = loss_t.item()
    model.eval()
    weights = out_dir / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return {"model_config": str(config_path), "weights": str(weights), "seconds": time.time() - start,
            "loss": loss, "steps": steps}
