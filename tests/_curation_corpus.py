"""Test corpora for the curation pipeline (tests/test_curation.py), with known faults.

Scenes are diverse enough that clean samples are not near-duplicates of each other: a random
background (plain, gradient, stripes, checks, dots or clouds, in random muted colours, angles
and periods) under 1-3 objects of 5 shapes x 6 saturated colours at random sizes and places.
The caption names the objects (left to right) and the background.

Faults are injected here from parameters the curation code never sees (the generator's RNG
and the tables below); each sample carries its ground truth in ``Truth.fault`` (``""`` for a
clean sample), which only the test reads:

images  junk_caption (empty, too short/long, URL, file name, boilerplate, repetition, symbols),
        swapped_caption (another scene's caption, no (colour, shape) in common), exact_dup
        (byte copy of an earlier sample), resized_dup / recompressed_dup / cropped_dup (near
        duplicates: rescaled, JPEG quality 25-50, 5% of width and height cut off), always in
        a later shard than their original; bad_resolution (tiny, or extreme aspect), corrupt
        (truncated JPEG, random bytes, empty file), bad_json (a broken metadata member),
        plus a missing shard in the range and a truncated tar.
videos  junk_caption, swapped_caption (differs in shape or colour: a direction-only swap is
        invisible to a mean-frame embedding), static (no motion at all), text_overlay (a
        caption banner on every frame), too_short (under the duration limit), low_resolution,
        corrupt (truncated / random bytes).

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


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """1-3 objects with distinct (colour, shape), placed without much overlap."""
    n = n_objects or int(rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3]))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), n, replace=False)]
    objects: list[Obj] = []
    for colour, shape in chosen:
        for _ in range(50):
            size = rng.uniform(0.3, 0.42)
            cx, cy = rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02, 2)
            if all(abs(cx - o.cx) > (size + o.size) / 2.2 or abs(cy - o.cy) > (size + o.size) / 2.2 for o in objects):
                break
        objects.append(Obj(colour, shape, float(cx), float(cy), float(size)))
    return Scene(str(rng.choice(BACKGROUNDS)), tuple(sorted(objects, key=lambda o: o.cx)), int(rng.integers(1 << 31)))


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


def overlay_text(image: Image.Image, rng: np.random.Generator, word: str) -> Image.Image:
    """Burn a caption banner into the image (as broadcast overlays and memes do)."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    w, h = image.size
    size = max(10, int(min(w, h) * rng.uniform(0.18, 0.24)))
    font = ImageFont.load_default(size=size)
    y0 = int(rng.integers(0, max(1, h - int(size * 1.35))))
    draw.rectangle([0, y0, w - 1, y0 + int(size * 1.3)], fill=tuple(int(v) for v in rng.integers(0, 45, 3)))
    draw.text((3, y0 + 1), word, font=font, fill=(255, 255, 255))
    return image


def encode_jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- junk captions


def junk_caption(rng: np.random.Generator, scene: Scene) -> str:
    """A caption that a caption rule should reject (drawn from kinds the rules never see)."""
    kind = int(rng.integers(8))
    n = int(rng.integers(1000, 99999))
    if kind == 0:
        return ""
    if kind == 1:
        return str(rng.choice(["img", "photo", "image", "untitled", "pic"]))
    if kind == 2:
        return f"https://cdn{n % 9}.example-shop.com/images/{n}/product_{n * 7}.jpg"
    if kind == 3:
        return f"IMG_{20190000 + n}_{n * 3 % 999999:06d}.JPG"
    if kind == 4:
        return str(rng.choice([
            "Click here to buy now! Free shipping on all orders",
            "stock photo - all rights reserved",
            "Lorem ipsum dolor sit amet, consectetur adipiscing elit",
            "Subscribe to our newsletter for more great deals",
        ]))
    if kind == 5:
        word = scene.objects[0].colour
        return " ".join([word] * int(rng.integers(8, 16)))
    if kind == 6:
        return "".join(rng.choice(list("#$%&*@!?~^+=<>|{}[]¥©®™§¶•")) for _ in range(int(rng.integers(12, 30))))
    words = [str(rng.choice(list(COLOURS) + list(SHAPES) + ["a", "and", "on", "the", "big", "small"])) for _ in range(90)]
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


def make_image_corpus(root: Path, seed: int = 0, n_clean: int = 240, n_shards: int = 6) -> dict:
    """~290 image-caption samples in ``n_shards`` tar shards plus a missing shard and a
    truncated one: ``{"pattern", "truth": {key: Truth}, "dup_pairs": [(original key, copy
    key)], "n_shards", "scenes"}``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    scenes = [random_scene(rng) for _ in range(n_clean)]
    sizes = [(int(rng.integers(68, 101)), int(rng.integers(68, 101))) for _ in scenes]  # a 5% crop stays >= 64
    images = [render_scene(s, w, h) for s, (w, h) in zip(scenes, sizes)]
    ocr_words: dict[int, str] = {}
    for i in rng.choice(n_clean, 12, replace=False):
        word = str(rng.choice(OVERLAY_WORDS))
        images[i] = overlay_text(images[i].resize((128, 128)), rng, word)
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

    # Clean samples spread over all shards; faults are drawn per clean-sample slot.
    n_junk, n_swap = 20, 20
    fault_slots = rng.permutation(n_clean)
    junk_ids, swap_ids = set(fault_slots[:n_junk].tolist()), set(fault_slots[n_junk:n_junk + n_swap].tolist())
    junk_ids -= set(ocr_words)
    swap_ids -= set(ocr_words)
    keys: dict[int, str] = {}
    jpeg: dict[int, bytes] = {}
    for i in range(n_clean):
        shard = i * n_shards // n_clean
        jpeg[i] = encode_jpeg(images[i])
        if i in junk_ids:
            cap, fault, detail = junk_caption(rng, scenes[i]), "junk_caption", ""
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
    originals = rng.choice(clean_ids, 36, replace=False)
    kinds = ["byte copy"] * 10 + ["resized"] * 7 + ["recompressed"] * 7 + ["cropped"] * 12
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
                f = rng.uniform(1.2, 1.5) if rng.random() < 0.5 else max(rng.uniform(0.7, 0.85), 66 / min(img.size))
                data = encode_jpeg(img.resize((round(img.width * f), round(img.height * f)), Image.BICUBIC))
            elif kind == "recompressed":
                data = encode_jpeg(img, quality=int(rng.integers(25, 50)))
            else:  # 5% of the width and of the height cut off, at a random place
                dx, dy = round(img.width * 0.05), round(img.height * 0.05)
                ox, oy = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
                data = encode_jpeg(img.crop((ox, oy, ox + img.width - dx, oy + img.height - dy)))
        dup_key = put(shard, {"jpg": data, "txt": captions[i].encode(), "json": meta(i, img)}, fault, detail=kind,
                      original=keys[i])
        dup_pairs.append((keys[i], dup_key))

    # Resolution faults: tiny, or extreme aspect ratio (clean captions).
    for k in range(8):
        scene = random_scene(rng)
        w, h = ((int(rng.integers(16, 26)), int(rng.integers(16, 26))) if k % 2 == 0
                else (int(rng.integers(200, 260)), int(rng.integers(36, 50))))
        img = render_scene(scene, w, h)
        put(int(rng.integers(n_shards)), {"jpg": encode_jpeg(img), "txt": image_caption(scene, rng).encode(),
                                          "json": meta(-1, img)}, "bad_resolution", detail=f"{w}x{h}")

    # Corrupt media and a broken metadata member.
    good = encode_jpeg(render_scene(random_scene(rng), 80, 80))
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
    tail_scene = random_scene(rng)
    tail = [{"key": f"t_{j}", "members": {"jpg": encode_jpeg(render_scene(tail_scene, 70, 70)),
                                          "txt": image_caption(tail_scene, rng).encode()}} for j in range(3)]
    write_tar(truncated, tail)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: 512 * 2 + len(tail[0]["members"]["jpg"]) // 2])
    pattern = str(root / f"{{000000..{n_shards + 1:06d}}}.tar")
    return {"pattern": pattern, "truth": truth, "dup_pairs": dup_pairs, "n_shards": n_shards + 2,
            "scenes": scenes}


# --------------------------------------------------------------------------- videos


def video_frames(scene: Scene, direction: str, num_frames: int, width: int, height: int, static: bool = False,
                 pan: float = 0.0) -> list[Image.Image]:
    """Objects travelling ~35% of the frame in ``direction`` (and the background panning by
    ``pan`` of the width), or every frame identical when ``static``."""
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    frames = []
    for t in range(num_frames):
        s = 0.0 if static else 0.35 * (t / max(1, num_frames - 1) - 0.5)
        frames.append(render_scene(scene, width, height, shift=(dx * s, dy * s),
                                   background_shift=0.0 if static else pan * t / max(1, num_frames - 1)))
    return frames


VIDEO_OBJECT_MAX_SIZE = 0.3  # of the frame's side: the object stays inside along its travel


def moving_scene(rng: np.random.Generator, direction: str) -> Scene:
    """A scene whose objects stay inside the frame along their ~35% travel."""
    base = random_scene(rng, n_objects=int(rng.choice([1, 2], p=[0.6, 0.4])))
    objects = []
    for k, o in enumerate(base.objects):
        size = min(o.size, VIDEO_OBJECT_MAX_SIZE)
        along = 0.5 if direction in ("left", "right") else None
        cx = 0.5 if along is not None else (0.28 if k == 0 else 0.72) if len(base.objects) > 1 else 0.5
        cy = (0.28 if k == 0 else 0.72) if (along is not None and len(base.objects) > 1) else 0.5
        objects.append(Obj(o.colour, o.shape, cx + rng.uniform(-0.05, 0.05), cy + rng.uniform(-0.05, 0.05), size))
    return Scene(base.background, tuple(sorted(objects, key=lambda o: o.cx)), base.seed)


def encode_mp4(frames: Sequence[Image.Image], fps: int = 8) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_video_corpus(root: Path, seed: int = 1, n_clean: int = 64, size: int = 128, num_frames: int = 12,
                      fps: int = 8) -> dict:
    """~110 video-caption samples in two tar shards: ``{"pattern", "truth"}``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth: dict[str, Truth] = {}
    shards: list[list[dict]] = [[], []]
    specs = []
    for _ in range(n_clean + 43):  # clean clips, 40 faulty ones, 3 low-resolution ones
        direction = str(rng.choice(DIRECTIONS))
        specs.append((moving_scene(rng, direction), direction))
    scenes = [s for s, _ in specs]

    def put(members: dict, fault: str, detail: str = "") -> None:
        shard = int(rng.integers(2))
        key = f"v{shard}_{len(shards[shard]):04d}"
        shards[shard].append({"key": key, "members": members})
        truth[key] = Truth(key, shard, fault, detail)

    faults = ["static"] * 10 + ["text_overlay"] * 10 + ["swapped_caption"] * 10 + ["junk_caption"] * 6
    faults += ["too_short"] * 4
    plan = [""] * n_clean + faults
    for i, fault in enumerate(plan):
        scene, direction = specs[i]
        pan = float(rng.choice([0.0, rng.uniform(0.1, 0.25)]))
        frames = video_frames(scene, direction, 2 if fault == "too_short" else num_frames, size, size,
                              static=fault == "static", pan=pan)
        if fault == "text_overlay":
            word = str(rng.choice(OVERLAY_WORDS))
            banner_rng_seed = int(rng.integers(1 << 31))
            frames = [overlay_text(f, np.random.default_rng(banner_rng_seed), word) for f in frames]
        caption = video_caption(scene, direction, rng)
        if fault == "swapped_caption":
            donor = swapped_caption_donor(rng, scene, scenes)
            caption = video_caption(scenes[donor], direction, rng)
        elif fault == "junk_caption":
            caption = junk_caption(rng, scene)
        put({"mp4": encode_mp4(frames, fps), "txt": caption.encode()}, fault)
    for k in range(3):  # low resolution
        scene, direction = specs[len(plan) + k]
        put({"mp4": encode_mp4(video_frames(scene, direction, num_frames, 32, 32), fps),
             "txt": video_caption(scene, direction, rng).encode()}, "low_resolution")
    ok = encode_mp4(video_frames(scenes[0], "left", num_frames, size, size), fps)
    for data, detail in [(ok[: len(ok) // 2], "truncated"), (bytes(rng.integers(0, 256, 5000, dtype=np.uint8)), "random bytes"),
                         (ok[:64], "header only")]:
        put({"mp4": data, "txt": b"a red circle moves left over a plain background."}, "corrupt", detail)
    for shard, samples in enumerate(shards):
        order = rng.permutation(len(samples))
        write_tar(root / f"{shard:06d}.tar", [samples[j] for j in order])
    return {"pattern": str(root / "{000000..000001}.tar"), "truth": truth}


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
