"""Tests for the demo's shapes-world generator (llama_vision.data.synthetic.shapes)."""

from __future__ import annotations

import json
import os
import tarfile
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_vision.data.synthetic.shapes import (
    ASPECT_RATIOS,
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    FILL_FRACTION,
    KINDS,
    POSITIONS,
    Shape,
    ShapeSpec,
    canvas_sizes,
    caption_accuracy,
    describe_shapes,
    direction_accuracy,
    draw_motion_video,
    draw_shapes_image,
    generate_shapes_world,
    iter_shard_samples,
    parse_caption,
    parse_direction,
    parse_video_caption,
    random_shapes,
    video_caption,
    write_mp4,
)

decord = pytest.importorskip("decord")
pytest.importorskip("av")


def foreground(frame: np.ndarray) -> np.ndarray:
    """Mask of pixels that are clearly not the black background (robust to codec noise)."""
    return frame.astype(np.int32).max(axis=-1) > 80


def centroid(frame: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(foreground(frame))
    assert len(xs) > 0, "no shape in frame"
    return float(xs.mean()), float(ys.mean())


# ---- captions -----------------------------------------------------------------------------


def test_caption_templates_and_canonical_order():
    one = [Shape("red", "circle", "top left")]
    assert describe_shapes(one) == "a red circle at the top left."
    two = [Shape("blue", "square", "bottom right"), Shape("red", "circle", "top left")]
    assert describe_shapes(two) == "a red circle at the top left and a blue square at the bottom right."
    three = [
        Shape("red", "circle", "bottom right"),
        Shape("yellow", "square", "top right"),
        Shape("green", "triangle", "top left"),
    ]
    assert describe_shapes(three) == (
        "a green triangle at the top left, a yellow square at the top right and a red circle at the bottom right."
    )
    with pytest.raises(ValueError):
        describe_shapes([])
    assert ShapeSpec is Shape


def test_shape_validation():
    with pytest.raises(ValueError, match="colour"):
        Shape("pink", "circle", "top left")
    with pytest.raises(ValueError, match="kind"):
        Shape("red", "hexagon", "top left")
    with pytest.raises(ValueError, match="position"):
        Shape("red", "circle", "middle")


shape_sets = st.lists(
    st.tuples(st.sampled_from(sorted(COLOURS)), st.sampled_from(KINDS), st.sampled_from(POSITIONS)),
    min_size=1,
    max_size=4,
    unique_by=lambda t: t[2],
)


@settings(max_examples=200, deadline=None)
@given(shape_sets)
def test_caption_parse_round_trip(triples):
    shapes = [Shape(*t) for t in triples]
    caption = describe_shapes(shapes)
    assert parse_caption(caption) == set(triples)
    assert parse_caption(caption.upper().replace(" ", "  ")) == set(triples)  # case and spacing
    assert caption_accuracy(caption, caption) == 1.0


def test_caption_accuracy():
    target = "a red circle at the top left and a blue square at the bottom right."
    reordered = "a blue square at the bottom right and a red circle at the top left."
    assert caption_accuracy(reordered, target) == 1.0  # a set: order does not matter
    assert caption_accuracy("a red circle at the top left.", target) == 0.0  # missing shape
    assert caption_accuracy(target.replace("blue", "green"), target) == 0.0  # wrong colour
    assert caption_accuracy(target.replace("square", "circle"), target) == 0.0  # wrong kind
    assert caption_accuracy(target.replace("bottom right", "bottom left"), target) == 0.0
    extra = target[:-1] + " and a green triangle at the top right."
    assert caption_accuracy(extra, target) == 0.0  # hallucinated shape
    assert caption_accuracy("garbage", target) == 0.0
    assert caption_accuracy([target, "garbage", reordered, target], [target] * 4) == 0.75
    with pytest.raises(ValueError):
        caption_accuracy([target], [target, target])
    with pytest.raises(TypeError):
        caption_accuracy(target, [target])


def test_video_captions():
    for direction in DIRECTIONS:
        caption = video_caption("green", "triangle", direction)
        assert caption == f"the green triangle moves {direction}."
        assert parse_direction(caption) == direction
        assert parse_video_caption(caption) == ("green", "triangle", direction)
    assert parse_direction("The circle is MOVING Left") == "left"
    assert parse_direction("a red circle at the top left.") is None  # a position, not a motion
    assert parse_video_caption("nothing here") is None
    assert direction_accuracy(["the red circle moves up.", "moves left"], ["x moves up", "x moves right"]) == 0.5
    with pytest.raises(ValueError, match="direction"):
        video_caption("red", "circle", "sideways")


# ---- drawing ------------------------------------------------------------------------------


def test_canvas_sizes():
    sizes = canvas_sizes()
    assert sizes == ASPECT_RATIOS
    assert {w / h for w, h in sizes.values()} == {1.0, 2.0, 0.5, 4.0}
    assert canvas_sizes(0.5)["4:1"] == (224, 56) and canvas_sizes(2)["1:2"] == (224, 448)
    with pytest.raises(ValueError):
        canvas_sizes(0)


@pytest.mark.parametrize("aspect", list(ASPECT_RATIOS))
def test_draw_shapes_image_puts_each_shape_in_its_cell(aspect):
    canvas = ASPECT_RATIOS[aspect]
    shapes = [
        Shape("red", "circle", "top left"),
        Shape("blue", "triangle", "bottom left"),
        Shape("yellow", "square", "bottom right"),
    ]
    image = draw_shapes_image(np.random.default_rng(1), canvas, shapes)
    assert image.mode == "RGB" and image.size == canvas
    pixels = np.asarray(image)
    w, h = canvas
    cells = {
        "top left": pixels[: h // 2, : w // 2],
        "top right": pixels[: h // 2, w // 2 :],
        "bottom left": pixels[h // 2 :, : w // 2],
        "bottom right": pixels[h // 2 :, w // 2 :],
    }
    by_position = {s.position: s for s in shapes}
    for position, cell in cells.items():
        coloured = foreground(cell)
        if position not in by_position:
            assert not coloured.any() and (cell == BACKGROUND).all()
            continue
        shape = by_position[position]
        # every drawn pixel has the shape's exact colour, and the shape is large
        assert (cell[coloured] == COLOURS[shape.colour]).all()
        cell_area = cell.shape[0] * cell.shape[1]
        side = 0.9 * FILL_FRACTION * min(cell.shape[:2])  # the smallest a shape is drawn
        area_factor = 0.5 if shape.kind == "triangle" else (np.pi / 4 if shape.kind == "circle" else 1.0)
        assert coloured.sum() >= 0.6 * area_factor * side**2 and coloured.sum() < cell_area
        # it does not touch the cell border (shapes never merge across cells)
        assert not coloured[0].any() and not coloured[-1].any()
        assert not coloured[:, 0].any() and not coloured[:, -1].any()


def test_draw_shapes_image_deterministic_and_jittered():
    shapes = [Shape("green", "square", "top right")]
    a = draw_shapes_image(np.random.default_rng(5), (112, 112), shapes)
    b = draw_shapes_image(np.random.default_rng(5), (112, 112), shapes)
    c = draw_shapes_image(np.random.default_rng(6), (112, 112), shapes)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    with pytest.raises(ValueError, match="distinct"):
        draw_shapes_image(np.random.default_rng(0), (112, 112), shapes * 2)


def test_random_shapes():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(200):
        shapes = random_shapes(rng, max_shapes=3)
        counts.add(len(shapes))
        positions = [s.position for s in shapes]
        assert len(set(positions)) == len(positions)
        assert positions == sorted(positions, key=POSITIONS.index)  # canonical order
    assert counts == {1, 2, 3}


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_motion_video_moves_steadily(direction, kind):
    frames = draw_motion_video(np.random.default_rng(3), direction, 12, (96, 96), "blue", kind)
    assert frames.dtype == np.uint8 and frames.shape == (12, 96, 96, 3)
    xs, ys = np.array([centroid(f) for f in frames]).T
    along, across, sign = {
        "left": (xs, ys, -1),
        "right": (xs, ys, 1),
        "up": (ys, xs, -1),
        "down": (ys, xs, 1),
    }[direction]
    steps = sign * np.diff(along)
    assert (steps > 0).all() and steps.max() - steps.min() <= 2.0  # steady
    assert sign * (along[-1] - along[0]) >= 40  # crosses a good part of the frame
    assert np.ptp(across) <= 1.0
    # starts on the side opposite to the motion
    assert (along[0] > 48) if sign < 0 else (along[0] < 48)
    for frame in frames:  # never leaves the frame
        mask = foreground(frame)
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()


def test_write_mp4_round_trip(tmp_path):
    frames = draw_motion_video(np.random.default_rng(0), "right", 10, (96, 64), "red", "square")
    for codec in ("mpeg4", "libx264"):
        path = write_mp4(frames, tmp_path / f"{codec}.mp4", fps=8, codec=codec)
        reader = decord.VideoReader(path)
        assert len(reader) == 10 and reader.get_avg_fps() == pytest.approx(8)
        decoded = reader.get_batch(list(range(10))).asnumpy()
        assert decoded.shape == frames.shape
        assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 4  # near lossless
    assert sorted(os.listdir(tmp_path)) == ["libx264.mp4", "mpeg4.mp4"]  # no temp files left
    with pytest.raises(ValueError, match="even"):
        write_mp4(np.zeros((2, 17, 33, 3), np.uint8), tmp_path / "odd.mp4", codec="libx264")
    write_mp4(np.zeros((2, 17, 33, 3), np.uint8), tmp_path / "odd.mp4", codec="mpeg4")
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(np.zeros((2, 16, 16, 3), np.float32), tmp_path / "f.mp4")


# ---- the data set on disk -------------------------------------------------------------------

ARGS = dict(n_train_images=10, n_test_images=5, n_train_videos=4, n_test_videos=2, seed=7, shard_size=4)


def all_files(root) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, generate_shapes_world(root, progress=False, **ARGS)


def test_generate_layout_and_counts(world):
    root, summary = world
    assert summary["reused"] is False
    assert summary["counts"] == {"train_images": 10, "test_images": 5, "train_videos": 4, "test_videos": 2}
    assert [os.path.relpath(p, root) for p in summary["image_shards"]] == [
        "images/train-000000.tar",
        "images/train-000001.tar",
        "images/train-000002.tar",
    ]
    files = set(all_files(root))
    assert "manifest.json" in files
    assert not [f for f in files if f.endswith(".tmp")]
    manifest = json.load(open(summary["manifest"]))
    assert manifest["args"]["seed"] == 7 and manifest["counts"] == summary["counts"]


def test_tar_shards_are_webdataset_samples(world):
    _, summary = world
    keys, aspects = [], set()
    for shard in summary["image_shards"]:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            assert len(names) % 3 == 0
            for i in range(0, len(names), 3):  # a sample's files are adjacent: jpg, txt, json
                key = names[i].split(".")[0]
                assert names[i : i + 3] == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
                keys.append(key)
        for sample in iter_shard_samples(shard):
            meta, caption = sample["meta"], sample["caption"]
            assert meta["caption"] == caption and meta["key"] == sample["key"]
            shapes = [Shape(**s) for s in meta["shapes"]]
            assert describe_shapes(shapes) == caption
            assert parse_caption(caption) == {s.as_tuple() for s in shapes}
            assert sample["image"].size == tuple(meta["canvas"])
            aspects.add(meta["aspect_ratio"])
            # the JPEG shows each named colour in its cell (quality 95: small error)
            pixels = np.asarray(sample["image"]).astype(int)
            w, h = meta["canvas"]
            for shape in shapes:
                row, col = divmod(POSITIONS.index(shape.position), 2)
                cell = pixels[row * h // 2 : (row + 1) * h // 2, col * w // 2 : (col + 1) * w // 2]
                close = np.abs(cell - COLOURS[shape.colour]).max(axis=-1) < 40
                assert close.sum() > 100
    assert keys == [f"{i:09d}" for i in range(10)]
    assert aspects == set(ASPECT_RATIOS)  # all aspect ratios present


def test_test_images_manifest(world):
    root, summary = world
    rows = [json.loads(line) for line in open(summary["test_images"])]
    assert [r["image"] for r in rows] == [f"test/{i:05d}.png" for i in range(5)]
    aspects = set()
    from PIL import Image

    for row in rows:
        image = Image.open(os.path.join(root, "images", row["image"]))
        assert image.size == tuple(row["canvas"])
        assert parse_caption(row["caption"]) == {Shape(**s).as_tuple() for s in row["shapes"]}
        aspects.add(row["aspect_ratio"])
    assert aspects == set(ASPECT_RATIOS)


def test_videos_decode_and_move_as_captioned(world):
    root, summary = world
    for split, count in (("train", 4), ("test", 2)):
        rows = [json.loads(line) for line in open(summary[f"{split}_videos"])]
        assert len(rows) == count
        for row in rows:
            assert row["video"].startswith(f"{split}/") and parse_direction(row["caption"]) == row["direction"]
            reader = decord.VideoReader(os.path.join(root, "videos", row["video"]))
            assert len(reader) == row["num_frames"] and 8 <= row["num_frames"] <= 16
            frames = reader.get_batch(list(range(len(reader)))).asnumpy()
            xs, ys = np.array([centroid(f) for f in frames]).T
            motion = {"left": -np.diff(xs), "right": np.diff(xs), "up": -np.diff(ys), "down": np.diff(ys)}
            assert (motion[row["direction"]] > 0).all(), row
            others = [d for d in DIRECTIONS if d != row["direction"]]
            assert all(motion[d].sum() < 2 for d in others)


def test_deterministic_for_a_seed(world, tmp_path):
    root, _ = world
    again = generate_shapes_world(tmp_path / "again", progress=False, **ARGS)
    assert again["reused"] is False
    assert all_files(root) == all_files(tmp_path / "again")  # byte-identical
    other = generate_shapes_world(tmp_path / "other", progress=False, **{**ARGS, "seed": 8})
    first = [json.loads(line)["caption"] for line in open(os.path.join(root, "images", "test.jsonl"))]
    second = [json.loads(line)["caption"] for line in open(other["test_images"])]
    assert first != second


def test_second_call_reuses_without_rewriting(tmp_path):
    root = tmp_path / "w"
    generate_shapes_world(root, progress=False, **ARGS)
    stamps = {
        os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, _, names in os.walk(root) for n in names
    }
    time.sleep(0.02)
    start = time.perf_counter()
    summary = generate_shapes_world(root, progress=False, **ARGS)
    assert summary["reused"] is True and time.perf_counter() - start < 0.5
    after = {
        os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, _, names in os.walk(root) for n in names
    }
    assert after == stamps

    # other arguments regenerate, and stale shards of the old run are removed
    smaller = generate_shapes_world(root, progress=False, **{**ARGS, "n_train_images": 3})
    assert smaller["reused"] is False and len(smaller["image_shards"]) == 1
    assert sorted(n for n in os.listdir(root / "images") if n.endswith(".tar")) == ["train-000000.tar"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="train_images"):
        generate_shapes_world(tmp_path, -1, 0, 0, 0, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        generate_shapes_world(tmp_path, 1, 0, 0, 0, shard_size=0, progress=False)
    with pytest.raises(ValueError, match="video_frames"):
        generate_shapes_world(tmp_path, 0, 0, 1, 0, video_frames=(1, 4), progress=False)
