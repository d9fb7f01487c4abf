"""Image loading and tiling against transformers' Mllama image processor (the testable
stand-in for Meta's VariableSizeImageTransform), hand-computed cases, fuzzing and
real-world file quirks.

Oracle choice: transformers 5.x ships two Mllama processors. ``MllamaImageProcessor`` (the
default class) runs on torchvision tensors; its resize is torch's antialiased bilinear,
which differs from PIL's by up to one uint8 level (~0.015 after normalisation). Meta's
reference resizes PIL images with PIL, and so does ``MllamaImageProcessorPil``, so the PIL
one is the oracle here. We expect (and check) bit-identical pixel values; the broad
comparison uses the 1e-5 tolerance of the spec.
"""

from __future__ import annotations

import io
import math
import pickle
from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from llama_vision.data.image import (
    CLIP_MEAN,
    CLIP_STD,
    ImageLoadError,
    ImageProcessor,
    aspect_ratio_id,
    best_canvas,
    fit_to_canvas,
    load_image,
    stack_aspect_ratios,
    stack_images,
    supported_aspect_ratios,
)

hf_mllama = pytest.importorskip("transformers.models.mllama.image_processing_pil_mllama")


# --------------------------------------------------------------------------- helpers


@lru_cache(maxsize=None)
def hf_processor(tile_size: int, max_num_tiles: int):
    return hf_mllama.MllamaImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        max_image_tiles=max_num_tiles,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


@lru_cache(maxsize=None)
def processor(tile_size: int, max_num_tiles: int) -> ImageProcessor:
    return ImageProcessor(tile_size=tile_size, max_num_tiles=max_num_tiles)


@lru_cache(maxsize=64)
def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradient plus noise: resampling differences show up, unlike on flat colour."""
    rng = np.random.default_rng(seed + 7919 * width + height)
    x = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 200, height, dtype=np.float32)[:, None, None]
    tint = np.array([1.0, 0.6, 0.2], dtype=np.float32)
    noise = rng.integers(0, 56, size=(height, width, 3)).astype(np.float32)
    pixels = (x * tint + y * (1 - tint) + noise).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def hf_tile(image: Image.Image, tile_size: int, max_num_tiles: int):
    """transformers' output for one image: (pixel_values [T, 3, S, S], n, grid, id)."""
    out = hf_processor(tile_size, max_num_tiles)(images=[[image]], return_tensors="pt")
    ratio_id = int(out["aspect_ratio_ids"][0, 0])
    grid = hf_mllama.get_all_supported_aspect_ratios(max_num_tiles)[ratio_id - 1]
    return out["pixel_values"][0, 0], int(out["num_tiles"][0][0]), tuple(grid), ratio_id


def assert_matches_hf(image: Image.Image, tile_size: int, max_num_tiles: int, exact=False):
    tiles, grid = processor(tile_size, max_num_tiles)(image)
    reference, n, hf_grid, hf_id = hf_tile(image, tile_size, max_num_tiles)
    label = f"{image.size} S={tile_size} T={max_num_tiles}"
    assert grid == hf_grid, label
    assert tiles.shape == (n, 3, tile_size, tile_size), label
    assert aspect_ratio_id(*grid, max_num_tiles) == hf_id, label
    assert tiles.dtype == torch.float32
    if exact:
        assert torch.equal(tiles, reference[:n]), label
    else:
        torch.testing.assert_close(tiles, reference[:n], atol=1e-5, rtol=0, msg=label)
    assert torch.count_nonzero(reference[n:]) == 0, label  # HF's unused slots are zeros


# ------------------------------------------------------- 1. agreement with transformers

SIZES = [  # (width, height)
    (1, 1), (1, 10000), (10000, 1), (180, 80), (80, 180), (7, 3), (50, 200), (200, 50),
    (100, 100), (300, 300), (336, 336), (559, 559), (560, 560), (561, 561), (1000, 1000),
    (1120, 1120), (500, 375), (375, 500), (640, 480), (1919, 1081), (1200, 600),
    (600, 1200), (2000, 500), (500, 2000), (1680, 560), (800, 200), (4000, 100),
    (337, 673), (2500, 2500), (3000, 2000),
]


@pytest.mark.parametrize("tile_size", [336, 560])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_transformers_default_tiles(size, tile_size):
    assert_matches_hf(make_image(*size), tile_size, 4)


@pytest.mark.parametrize("max_num_tiles", [1, 4, 6])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_transformers_small_tiles(size, max_num_tiles):
    assert_matches_hf(make_image(*size), 56, max_num_tiles)


@pytest.mark.parametrize("size", [(180, 80), (1919, 1081), (3000, 2000), (1, 10000), (50, 200)])
def test_bit_identical_to_transformers(size):
    # Same float32 steps as ToTensor + Normalize: not just close, identical.
    assert_matches_hf(make_image(*size), 560, 4, exact=True)


def test_aspect_ratio_ids_follow_transformers():
    for max_num_tiles in range(1, 9):
        ours = supported_aspect_ratios(max_num_tiles)
        assert list(ours) == list(hf_mllama.get_all_supported_aspect_ratios(max_num_tiles))
        for index, (tiles_h, tiles_w) in enumerate(ours):
            assert aspect_ratio_id(tiles_h, tiles_w, max_num_tiles) == index + 1
    # The released 4-tile table, written out.
    assert supported_aspect_ratios(4) == (
        (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)
    )
    assert aspect_ratio_id(2, 1, 4) == 5 and aspect_ratio_id(1, 2, 4) == 2
    with pytest.raises(ValueError):
        aspect_ratio_id(2, 3, 4)


# ---------------------------------------------------------- 2. hand-computed geometry


def test_float_floor_gives_125_not_126():
    # 180 x 80 (w x h), 56-px tiles, 4 max: best canvas 1 x 3 (scale 0.7, tied with 1 x 4,
    # smaller area). The height fills the tile: scale = 56 / 80, and the width is
    # floor(180 * (56 / 80)) = floor(125.99999999999999) = 125, where exact arithmetic
    # would give 126. Both references floor the float product.
    assert 180 * (56 / 80) < 126
    assert processor(56, 4).plan(180, 80) == ((1, 3), (56, 125))
    assert processor(56, 4).plan(80, 180) == ((3, 1), (125, 56))
    tiles, grid = processor(56, 4)(make_image(180, 80))
    assert grid == (1, 3) and tiles.shape == (3, 3, 56, 56)
    assert_matches_hf(make_image(180, 80), 56, 4, exact=True)
    assert_matches_hf(make_image(80, 180), 56, 4, exact=True)


# (width, height, tile, max tiles) -> ((tiles_h, tiles_w), (resized_h, resized_w)),
# worked out by hand from the rules (scales listed as rows x cols: scale).
CANVAS_TABLE = [
    # exactly one tile: 1x1 has scale 1.0, the smallest >= 1
    ((336, 336, 336, 4), ((1, 1), (336, 336))),
    # small image: upscaled until it fills one tile, not further
    ((100, 100, 336, 4), ((1, 1), (336, 336))),
    ((10, 20, 336, 4), ((1, 1), (336, 168))),
    # all scales < 1; the largest, 0.672, is shared by 1x2, 1x3, 1x4, 2x2 -> smallest area
    ((1000, 500, 336, 4), ((1, 2), (336, 672))),
    # 3x1 (1.26) and 4x1 (1.68) can hold it without shrinking; 3x1 is the least upscale,
    # and an image larger than a tile is never enlarged: it stays 200 x 800
    ((200, 800, 336, 4), ((3, 1), (800, 200))),
    # 2x2 (0.56) beats 1x2/1x3/1x4 (0.373) and the 1-column grids (0.28)
    ((2000, 1500, 560, 4), ((2, 2), (840, 1120))),
    # one tile allowed: everything goes into 1x1
    ((2000, 1500, 560, 1), ((1, 1), (420, 560))),
    ((10000, 1, 560, 4), ((1, 4), (1, 2240))),  # a 0.224-px row is kept at 1 px
    # six tiles: only 1x6 (1.12) fits 300 x 50 without shrinking; no upscaling past it
    ((300, 50, 56, 6), ((1, 6), (50, 300))),
]


@pytest.mark.parametrize("case, expected", CANVAS_TABLE, ids=lambda c: str(c))
def test_canvas_choice_table(case, expected):
    width, height, tile_size, max_num_tiles = case
    assert processor(tile_size, max_num_tiles).plan(width, height) == expected


def test_padding_is_black_before_normalisation():
    # Meta pastes onto Image.new("RGB", ..., (0, 0, 0)) and normalises afterwards, and
    # transformers pads with 0 before rescale/normalise: padded pixels hold -mean/std.
    tiles, grid = processor(56, 4)(Image.new("RGB", (180, 80), (255, 255, 255)))
    assert grid == (1, 3)
    canvas = tiles.permute(1, 2, 0, 3).reshape(3, 56, 3 * 56)  # [3, H, W]
    expected_pad = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)
    torch.testing.assert_close(canvas[:, :, 125:], expected_pad.expand(3, 56, 43))
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(canvas[:, :, :125], white.view(3, 1, 1).expand(3, 56, 125))


def test_tiles_are_row_major():
    # A 2 x 2 grid of flat colours comes back as top-left, top-right, bottom-left, ...
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image = Image.new("RGB", (112, 112))
    for k, colour in enumerate(colours):
        image.paste(colour, (56 * (k % 2), 56 * (k // 2), 56 * (k % 2) + 56, 56 * (k // 2) + 56))
    tiles, grid = processor(56, 4)(image)
    assert grid == (2, 2)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    for k, colour in enumerate(colours):
        expected = (torch.tensor(colour) / 255 - mean) / std
        torch.testing.assert_close(tiles[k, :, 28, 28], expected)


# ------------------------------------------------------------------------ 3. fuzzing


@settings(max_examples=400, deadline=None)
@given(
    width=st.integers(1, 3000),
    height=st.integers(1, 3000),
    tile_size=st.sampled_from([14, 28, 56]),
    max_num_tiles=st.integers(1, 6),
)
def test_geometry_invariants_and_transformers_geometry(width, height, tile_size, max_num_tiles):
    (tiles_h, tiles_w), (new_h, new_w) = processor(tile_size, max_num_tiles).plan(width, height)
    assert tiles_h * tiles_w <= max_num_tiles
    assert (tiles_h, tiles_w) in supported_aspect_ratios(max_num_tiles)
    assert 1 <= new_h <= tiles_h * tile_size and 1 <= new_w <= tiles_w * tile_size
    # No distortion: one side is exact, the other is its ideal value within 1 px.
    assert abs(new_h - height * new_w / width) <= 1 or abs(new_w - width * new_h / height) <= 1
    if max(width, height) <= tile_size:
        # Small images are upscaled just until they fill one tile.
        assert (tiles_h, tiles_w) == (1, 1) and max(new_h, new_w) == tile_size
    else:
        # Larger images are never upscaled.
        assert new_h <= height and new_w <= width
    # transformers' own geometry functions agree on every example.
    canvas = hf_mllama.get_optimal_tiled_canvas(height, width, max_num_tiles, tile_size)
    assert (tiles_h * tile_size, tiles_w * tile_size) == tuple(int(v) for v in canvas)
    assert (new_h, new_w) == hf_mllama.get_image_size_fit_to_canvas(
        height, width, int(canvas[0]), int(canvas[1]), tile_size
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    tile_size=st.sampled_from([14, 28, 56]),
    max_num_tiles=st.integers(1, 6),
)
def test_pixels_match_transformers_fuzzed(width, height, tile_size, max_num_tiles):
    assert_matches_hf(make_image(width, height), tile_size, max_num_tiles)


# ----------------------------------------------------------------- 4. real-world input


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 x 20, left half red, right half blue; orientation 6 means "rotate 90
    # degrees clockwise to display": displayed 20 x 40, red on top, blue below.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    path.write_bytes(encode(stored, "JPEG", exif=exif, quality=95))
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # Same as PIL's own transpose, and the orientation tag is consumed.
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))


def test_modes_convert_to_rgb():
    gray = Image.new("L", (3, 2), 77)
    assert load_image(encode(gray, "PNG")).getpixel((0, 0)) == (77, 77, 77)

    one_bit = Image.new("1", (3, 2), 1)
    assert load_image(encode(one_bit, "PNG")).getpixel((1, 1)) == (255, 255, 255)

    palette = Image.new("P", (3, 2), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_image(encode(palette, "PNG")).getpixel((0, 0)) == (10, 200, 30)

    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))
    assert load_image(encode(cmyk, "TIFF")).getpixel((0, 0)) == (255, 0, 0)


def test_alpha_dropped_by_default_white_on_request():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 128))
    data = encode(rgba, "PNG")
    dropped = load_image(data)  # Meta: convert("RGB") keeps the colour under the alpha
    assert dropped.getpixel((1, 1)) == (10, 20, 30) and dropped.getpixel((0, 0)) == (10, 20, 30)
    white = load_image(data, alpha="white")  # transformers: composite onto white
    assert white.getpixel((1, 1)) == (255, 255, 255)
    composite = Image.alpha_composite(Image.new("RGBA", (1, 1), (255,) * 4), Image.new("RGBA", (1, 1), (10, 20, 30, 128)))
    assert white.getpixel((0, 0)) == composite.convert("RGB").getpixel((0, 0))

    la = Image.new("LA", (2, 2), (90, 0))
    assert load_image(encode(la, "PNG")).getpixel((0, 0)) == (90, 90, 90)
    assert load_image(encode(la, "PNG"), alpha="white").getpixel((0, 0)) == (255, 255, 255)

    keyed = Image.new("P", (2, 2), 0)  # palette with a transparent entry (tRNS)
    keyed.putpalette([50, 60, 70] + [0] * 765)
    keyed_data = encode(keyed, "PNG", transparency=0)
    assert load_image(keyed_data).getpixel((0, 0)) == (50, 60, 70)
    assert load_image(keyed_data, alpha="white").getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError):
        load_image(data, alpha="black")


def test_high_bit_depth_is_rescaled_not_clipped():
    # PIL's convert("RGB") would clip 16-bit samples to 255 (a white image).
    sixteen = Image.fromarray(np.array([[0, 128 * 257, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    loaded = load_image(encode(sixteen, "PNG"))
    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]

    wide = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    loaded = load_image(encode(wide, "TIFF"))
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, round(1000 * 255 / 65535), 255]

    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    loaded = load_image(encode(unit_float, "TIFF"))
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_extreme_shapes_load_and_tile():
    for size in [(1, 1), (1, 10000), (10000, 1)]:
        image = load_image(encode(Image.new("RGB", size, (9, 99, 199)), "PNG"))
        assert image.size == size
        tiles, (tiles_h, tiles_w) = processor(560, 4)(image)
        assert tiles.shape == (tiles_h * tiles_w, 3, 560, 560)
        assert torch.isfinite(tiles).all()


def test_truncated_jpeg_fails_even_when_another_library_allows_truncated_images(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as lmms-eval sets it on import
    data = encode(make_image(300, 200), "JPEG", quality=90)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the other library's setting is left as it was


def test_truncated_jpeg_names_file(tmp_path):
    data = encode(make_image(300, 200), "JPEG", quality=90)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no PIL traceback
    assert info.value.source == repr(str(path))
    # DataLoader workers pickle exceptions back to the main process.
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is ImageLoadError and str(clone) == message


def test_random_bytes_and_empty_files(tmp_path):
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageLoadError, match="noise.png.*not a recognised image format"):
        load_image(noise)
    with pytest.raises(ImageLoadError, match="bytes in memory"):
        load_image(b"definitely not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg.*empty"):
        load_image(empty)


def test_missing_path_and_directory(tmp_path):
    missing = tmp_path / "nowhere" / "cat.jpg"
    with pytest.raises(ImageLoadError, match="cat.jpg.*FileNotFoundError"):
        load_image(missing)
    with pytest.raises(ImageLoadError, match="IsADirectoryError"):
        load_image(tmp_path)
    with pytest.raises(TypeError):
        load_image(12345)


def test_file_object_input():
    data = encode(make_image(30, 20), "PNG")
    assert np.array_equal(np.asarray(load_image(io.BytesIO(data))), np.asarray(make_image(30, 20)))


# ------------------------------------------------------------------ batching helpers


def test_non_rgb_input_is_converted_like_meta():
    rgba = Image.new("RGBA", (100, 60), (40, 80, 120, 0))
    tiles, _ = processor(56, 4)(rgba)
    expected, _ = processor(56, 4)(Image.new("RGB", (100, 60), (40, 80, 120)))
    assert torch.equal(tiles, expected)
    with pytest.raises(TypeError):
        processor(56, 4)(np.zeros((4, 4, 3), np.uint8))


def test_stack_images_and_aspect_ratios():
    proc = processor(56, 4)
    a, grid_a = proc(make_image(200, 50))  # 1 x 4
    b, grid_b = proc(make_image(50, 50))  # 1 x 1
    images, num_tiles = stack_images([[a, b], [], [b]], max_num_tiles=4)
    assert images.shape == (3, 2, 4, 3, 56, 56) and images.dtype == torch.float32
    assert num_tiles.tolist() == [[4, 1], [0, 0], [1, 0]] and num_tiles.dtype == torch.long
    assert torch.equal(images[0, 0], a) and torch.equal(images[0, 1, :1], b)
    assert torch.count_nonzero(images[0, 1, 1:]) == 0 and torch.count_nonzero(images[1]) == 0
    ratios = stack_aspect_ratios([[grid_a, grid_b], [], [grid_b]])
    assert ratios.tolist() == [[[1, 4], [1, 1]], [[1, 1], [1, 1]], [[1, 1], [1, 1]]]
    assert ratios.dtype == torch.long

    # Text-only batches keep one (empty) image slot so shapes stay valid.
    images, num_tiles = stack_images([[], []], max_num_tiles=4, tile_size=56)
    assert images.shape == (2, 1, 4, 3, 56, 56) and num_tiles.tolist() == [[0], [0]]
    assert stack_aspect_ratios([[], []]).shape == (2, 1, 2)
    with pytest.raises(ValueError, match="tile_size"):
        stack_images([[]], max_num_tiles=4)
    with pytest.raises(ValueError):
        stack_images([[a]], max_num_tiles=2)  # 4 tiles do not fit in 2 slots


def test_collate_and_batch_match_single_calls_and_transformers():
    proc = processor(56, 4)
    samples = [[make_image(200, 50), make_image(90, 300)], [], [make_image(500, 375)]]
    packed = proc.collate(samples, num_threads=2)
    tiled = [[proc(image) for image in sample] for sample in samples]
    images, num_tiles = stack_images([[t for t, _ in s] for s in tiled], 4, tile_size=56)
    assert torch.equal(packed.images, images) and torch.equal(packed.num_tiles, num_tiles)
    assert torch.equal(packed.aspect_ratios, stack_aspect_ratios([[g for _, g in s] for s in tiled]))
    # 200x50 -> 1x4 (id 4), 90x300 -> 4x1 (id 8), 500x375 -> 2x2 (id 6); 0 = absent
    assert packed.aspect_ratio_ids.tolist() == [[4, 8], [0, 0], [6, 0]]

    flat = [image for sample in samples for image in sample]
    for (tiles, grid), (ref_tiles, ref_grid) in zip(proc.batch(flat, num_threads=2), [proc(i) for i in flat]):
        assert grid == ref_grid and torch.equal(tiles, ref_tiles)

    # transformers packs the same batch identically (samples without images excepted:
    # it rejects them, while we keep a zero slot).
    with_images = [samples[0], samples[2]]
    reference = hf_processor(56, 4)(images=with_images, return_tensors="pt")
    ours = proc.collate(with_images)
    torch.testing.assert_close(ours.images, reference["pixel_values"], atol=1e-5, rtol=0)
    assert ours.num_tiles.tolist() == [[4, 4], [4, 0]] == [
        row + [0] * (2 - len(row)) for row in reference["num_tiles"]
    ]
    assert torch.equal(ours.aspect_ratio_ids, reference["aspect_ratio_ids"])


def test_constructor_validation():
    with pytest.raises(ValueError):
        ImageProcessor(tile_size=0)
    with pytest.raises(ValueError):
        ImageProcessor(resample="cubic-ish")
    assert ImageProcessor().tile_size == 560 and ImageProcessor().max_num_tiles == 4
    assert best_canvas(80, 180, 56, 4) == (1, 3) and fit_to_canvas(80, 180, 56, 168, 56) == (56, 125)
    assert math.isclose(ImageProcessor(336)._pad[0], -CLIP_MEAN[0] / CLIP_STD[0], rel_tol=1e-6)
