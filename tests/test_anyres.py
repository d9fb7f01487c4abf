"""AnyRes preprocessing and feature layout against transformers' LLaVA-NeXT / OneVision.

Oracles: the PIL-backed ``LlavaNextImageProcessorPil`` / ``LlavaOnevisionImageProcessorPil``
configured as the llava-hf checkpoints' ``preprocessor_config.json`` (pixels), and
``select_best_resolution``, ``get_anyres_image_grid_shape``, ``image_size_to_num_patches``,
``unpad_image``, ``pack_image_features`` and the processors' ``_get_number_of_features``
(layout). We expect bit-identical pixels; the assertions use the issue's 1e-5.

The default ``LlavaNextImageProcessor`` is torchvision-backed and resizes differently; one
test pins that difference so it is clear why the PIL class is the oracle.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from llama_vision.data.anyres import (
    LLAVA_NEXT,
    LLAVA_NEXT_GRID_PINPOINTS,
    LLAVA_ONEVISION,
    LLAVA_ONEVISION_GRID_PINPOINTS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AnyResConfig,
    anyres_crops,
    anyres_grid_shape,
    anyres_max_pool,
    anyres_max_shape,
    num_anyres_crops,
    num_image_tokens,
    pack_anyres_features,
    parse_vision_aspect_ratio,
    preprocess_anyres,
    preprocess_sample,
    preprocess_square,
    select_best_resolution,
    stack_anyres,
    to_rgb_array,
    unpad_features,
)

hf_next_pil = pytest.importorskip("transformers.models.llava_next.image_processing_pil_llava_next")
hf_ov_pil = pytest.importorskip("transformers.models.llava_onevision.image_processing_pil_llava_onevision")
hf_next_model = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
hf_ov_model = pytest.importorskip("transformers.models.llava_onevision.modeling_llava_onevision")
hf_next_proc = pytest.importorskip("transformers.models.llava_next.processing_llava_next")
hf_ov_proc = pytest.importorskip("transformers.models.llava_onevision.processing_llava_onevision")
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution  # noqa: E402

ATOL = 1e-5
NEXT_PINPOINTS = [list(p) for p in LLAVA_NEXT_GRID_PINPOINTS]
OV_PINPOINTS = [list(p) for p in LLAVA_ONEVISION_GRID_PINPOINTS]


# --------------------------------------------------------------------------- oracles


@pytest.fixture(scope="module")
def hf_next():
    """llava-hf/llava-v1.6-*'s preprocessor_config.json."""
    return hf_next_pil.LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=NEXT_PINPOINTS,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        resample=3,
    )


@pytest.fixture(scope="module")
def hf_ov():
    """llava-hf/llava-onevision-*'s preprocessor_config.json (mean/std 0.5)."""
    return hf_ov_pil.LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384},
        image_grid_pinpoints=OV_PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,
    )


def hf_pixels(processor, image) -> tuple[torch.Tensor, list[int]]:
    out = processor(image, return_tensors="pt")
    return out["pixel_values"][0], out["image_sizes"][0].tolist()


# --------------------------------------------------------------------------- images

_RNG = np.random.default_rng(20)


def _noise(height: int, width: int, channels: int = 3) -> np.ndarray:
    """Seeded noise with some structure (a gradient), so that resizing has edges to ring on."""
    noise = _RNG.integers(0, 256, size=(height, width, channels), dtype=np.int64)
    ramp = np.linspace(0, 255, width)[None, :, None]
    return ((noise + ramp) // 2).astype(np.uint8)


def _palette(height: int, width: int, transparent: bool) -> Image.Image:
    image = Image.fromarray(_noise(height, width)).quantize(colors=16)
    if transparent:
        image.info["transparency"] = 3
    return image


# (label, image): tiny, huge, very tall, very wide, square, odd sizes, and every input kind
CASES = [
    ("1x1 rgb", Image.fromarray(_noise(1, 1))),
    ("7x5 rgb", Image.fromarray(_noise(7, 5))),
    ("336x336 rgb", Image.fromarray(_noise(336, 336))),
    ("337x673 rgb", Image.fromarray(_noise(337, 673))),
    ("tall 2000x37 rgb", Image.fromarray(_noise(2000, 37))),
    ("wide 23x1500 rgb", Image.fromarray(_noise(23, 1500))),
    ("huge 2048x1536 rgb", Image.fromarray(_noise(2048, 1536))),
    ("499x500 rgba", Image.fromarray(_noise(499, 500, 4), mode="RGBA")),
    ("333x201 L", Image.fromarray(_noise(333, 201, 1)[..., 0], mode="L")),
    ("120x410 LA", Image.fromarray(_noise(120, 410, 2), mode="LA")),
    ("250x180 P", _palette(250, 180, transparent=False)),
    ("181x251 P+transparency", _palette(181, 251, transparent=True)),
    ("64x999 CMYK", Image.fromarray(_noise(64, 999, 4), mode="CMYK")),
    ("numpy 301x97x3", _noise(301, 97)),
    ("numpy 97x301x4", _noise(97, 301, 4)),
    ("numpy 55x66x1", _noise(55, 66, 1)),
    ("torch 3x211x123", torch.from_numpy(np.moveaxis(_noise(211, 123), -1, 0).copy())),
]
IDS = [label for label, _ in CASES]


def _hw(image) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[1:])
    return image.shape[:2]


# --------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("image", [image for _, image in CASES], ids=IDS)
def test_pixels_equal_llava_next_pil(hf_next, image):
    expected, expected_size = hf_pixels(hf_next, image)
    ours = preprocess_anyres(image, LLAVA_NEXT)
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == expected.shape  # same crop count
    assert list(ours.image_size) == expected_size == list(_hw(image))
    assert ours.pixel_values.shape[0] == num_anyres_crops(ours.image_size, LLAVA_NEXT.grid_pinpoints, 336)
    # per crop, so a wrong order would fail on the first misplaced crop
    for index in range(expected.shape[0]):
        torch.testing.assert_close(ours.pixel_values[index], expected[index], atol=ATOL, rtol=0)
    assert torch.equal(ours.pixel_values, expected)  # in fact bit-identical


OV_CASES = [
    (label, image)
    for label, image in CASES
    if label.split()[0] in ("1x1", "7x5", "337x673", "huge", "wide", "tall", "499x500", "181x251", "numpy")
]


@pytest.mark.parametrize("image", [image for _, image in OV_CASES], ids=[label for label, _ in OV_CASES])
def test_pixels_equal_llava_onevision_pil(hf_ov, image):
    expected, expected_size = hf_pixels(hf_ov, image)
    ours = preprocess_anyres(image, LLAVA_ONEVISION)
    assert ours.pixel_values.shape == expected.shape
    assert list(ours.image_size) == expected_size
    torch.testing.assert_close(ours.pixel_values, expected, atol=ATOL, rtol=0)
    assert torch.equal(ours.pixel_values, expected)


def test_onevision_class_defaults_use_clip_mean():
    # LlavaOnevisionImageProcessorPil() without a checkpoint config: CLIP mean/std
    image = CASES[3][1]
    expected, _ = hf_pixels(hf_ov_pil.LlavaOnevisionImageProcessorPil(), image)
    config = AnyResConfig.llava_onevision(image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    assert torch.equal(preprocess_anyres(image, config).pixel_values, expected)


def test_crop_order_and_layout_by_hand():
    # 336x672 image -> 1x2 grid, no padding: crops are exactly the two halves
    image = _noise(336, 672)
    crops, grid = anyres_crops(Image.fromarray(image), LLAVA_NEXT)
    assert grid == (1, 2) and crops.shape == (3, 336, 336, 3)
    assert np.array_equal(crops[1], image[:, :336]) and np.array_equal(crops[2], image[:, 336:])
    # 400x1200 fills 336x1008 (1x3) best, 1200x400 1008x336 (3x1)
    assert anyres_crops(Image.fromarray(_noise(400, 1200)))[1] == (1, 3)
    assert anyres_crops(Image.fromarray(_noise(1200, 400)))[1] == (3, 1)
    # an image smaller than every candidate keeps all its pixels in each, so the least
    # waste decides: 100x300 goes to 336x672 (1x2), not to the same-shaped 336x1008
    assert anyres_crops(Image.fromarray(_noise(100, 300)))[1] == (1, 2)
    # 200x500 into 336x672: resized to 269x672 (ceil), padded 33 above, 34 below with black
    crops, grid = anyres_crops(Image.fromarray(_noise(200, 500)))
    assert grid == (1, 2)
    assert not crops[1, :33].any() and not crops[1, 302:].any() and crops[1, 33:302].any()
    padded = preprocess_anyres(Image.fromarray(_noise(200, 500))).pixel_values
    # black padding is normalised like any pixel: (0 - mean) / std, not 0
    expected = torch.tensor([-m / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    torch.testing.assert_close(padded[1, :, 0, 0], expected, atol=1e-6, rtol=0)


def test_batch_equal_llava_next_pil(hf_next):
    images = [CASES[3][1], CASES[4][1], CASES[2][1]]  # 3, 4 (1008x336 -> 3x1 + 1) and 3 crops
    expected = hf_next(images, return_tensors="pt")
    pixel_values, image_sizes = stack_anyres([preprocess_anyres(image) for image in images])
    assert pixel_values.shape == expected["pixel_values"].shape
    assert torch.equal(pixel_values, expected["pixel_values"])
    assert torch.equal(image_sizes, expected["image_sizes"].long())


def test_onevision_multi_image_sample_is_padded_squares(hf_ov):
    images = [CASES[3][1], CASES[7][1], CASES[4][1]]
    expected = hf_ov([images], return_tensors="pt")  # one sample with three images
    ours = preprocess_sample(images, LLAVA_ONEVISION)
    assert [item.grid for item in ours] == [None, None, None]
    pixel_values, image_sizes = stack_anyres(ours)
    assert pixel_values.shape == expected["pixel_values"].shape == (3, 1, 3, 384, 384)
    assert torch.equal(pixel_values, expected["pixel_values"])
    assert torch.equal(image_sizes, expected["image_sizes"].long())
    # the pad colour is int(0.5 * 255) = 127 before normalisation
    wide = preprocess_square(Image.fromarray(_noise(10, 384)), LLAVA_ONEVISION).pixel_values
    torch.testing.assert_close(wide[0, :, 0, 0], torch.full((3,), (127 / 255 - 0.5) / 0.5), atol=1e-6, rtol=0)
    # a single image is still AnyRes; LLaVA-NeXT never pads to squares
    assert preprocess_sample(images[:1], LLAVA_ONEVISION)[0].grid is not None
    assert all(item.grid is not None for item in preprocess_sample(images, LLAVA_NEXT))


def test_torchvision_backend_differs_from_pil(hf_next):
    """Why the PIL class is the oracle: the default (torchvision) class resizes differently."""
    hf_next_tv = pytest.importorskip("transformers.models.llava_next.image_processing_llava_next")
    try:
        torchvision_processor = hf_next_tv.LlavaNextImageProcessor(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=NEXT_PINPOINTS,
            resample=3,
        )
    except ImportError as error:  # torchvision missing
        pytest.skip(str(error))
    image = CASES[3][1]  # 337x673: a real downscale to 336x672 and to the 336x336 overview
    pil, _ = hf_pixels(hf_next, image)
    tv, _ = hf_pixels(torchvision_processor, image)
    assert pil.shape == tv.shape
    assert (pil - tv).abs().max().item() > 1e-3
    assert torch.equal(preprocess_anyres(image).pixel_values, pil)


# --------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("pinpoints", [NEXT_PINPOINTS, OV_PINPOINTS], ids=["next", "onevision"])
def test_select_best_resolution_equals_transformers(pinpoints):
    rng = np.random.default_rng(7)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 4000, size=(1500, 2))]
    sizes += [(int(h), int(w)) for h, w in np.exp(rng.uniform(0, 9, size=(1500, 2))).astype(int) + 1]
    sizes += [(336, 336), (672, 336), (1, 1), (384, 768), (1000, 3), (3, 1000)]
    for size in sizes:
        expected = hf_select_best_resolution(size, pinpoints)
        if expected is None:  # every candidate truncates the image to 0 px; we raise instead
            with pytest.raises(ValueError, match="fits"):
                select_best_resolution(size, pinpoints)
            continue
        assert select_best_resolution(size, pinpoints) == tuple(expected), size
        crop = 336 if pinpoints is NEXT_PINPOINTS else 384
        assert anyres_grid_shape(size, pinpoints, crop) == tuple(
            hf_next_model.get_anyres_image_grid_shape(list(size), pinpoints, crop)
        )
        assert num_anyres_crops(size, pinpoints, crop) == hf_next_model.image_size_to_num_patches(
            torch.tensor(size), pinpoints, crop
        )


# --------------------------------------------------------------------------- layout


def _fake_model(config: AnyResConfig, patch_size: int = 14):
    """Enough of a LlavaNext/OneVision model for their pack_image_features methods."""
    return SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=config.crop_size, patch_size=patch_size),
            image_grid_pinpoints=[list(p) for p in config.grid_pinpoints],
        )
    )


def _layout_sizes(seed: int, count: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sizes = [(int(h), int(w)) for h, w in np.exp(rng.uniform(0, 8.3, size=(count, 2))).astype(int) + 1]
    return sizes + [(336, 672), (500, 500), (1, 1), (3000, 3000), (100, 3000), (2999, 64)]


def test_unpad_equals_transformers():
    rng = np.random.default_rng(3)
    for _ in range(400):
        height, width = (int(v) for v in rng.integers(1, 200, size=2))
        features = torch.randn(2, height, width)
        original = tuple(int(v) for v in np.exp(rng.uniform(0, 8, size=2)).astype(int) + 1)
        expected = hf_next_model.unpad_image(features, original)
        ours = unpad_features(features, original)
        assert ours.shape == expected.shape and torch.equal(ours, expected), (height, width, original)
        assert torch.equal(unpad_features(features, torch.tensor(original)), expected)


def test_pack_and_token_count_equal_llava_next():
    config = LLAVA_NEXT
    model = _fake_model(config)
    dim, side = 6, config.patches_per_side
    newline = torch.randn(dim)
    processor = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=[list(p) for p in config.grid_pinpoints]),
        patch_size=14,
        num_additional_image_tokens=0,
    )
    processor._get_unpadded_features = lambda *a: hf_next_proc.LlavaNextProcessor._get_unpadded_features(
        processor, *a
    )
    for size in _layout_sizes(11, 60):
        n = num_anyres_crops(size, config.grid_pinpoints, config.crop_size)
        features = torch.randn(n, side * side, dim)
        sizes = torch.tensor([size])
        (expected,), lens = hf_next_model.LlavaNextModel.pack_image_features(
            model, [features], sizes, "default", image_newline=newline
        )
        ours = pack_anyres_features(features, size, config.grid_pinpoints, config.crop_size, image_newline=newline)
        assert torch.equal(ours, expected), size
        assert num_image_tokens(size, config.grid_pinpoints, 336, side) == lens[0] == ours.shape[0]
        assert config.num_image_tokens(size) == ours.shape[0]
        # the processor's count (placeholder tokens in the text) agrees with the model
        assert hf_next_proc.LlavaNextProcessor._get_number_of_features(processor, *size, 336, 336) == ours.shape[0]
        (expected,), _ = hf_next_model.LlavaNextModel.pack_image_features(model, [features], sizes, "default")
        assert torch.equal(pack_anyres_features(features, size, config.grid_pinpoints, 336), expected)
        assert num_image_tokens(size, config.grid_pinpoints, 336, side, image_newline=False) == expected.shape[0]


def test_pack_pool_and_token_count_equal_llava_onevision():
    config = LLAVA_ONEVISION
    model = _fake_model(config)
    dim, side = 4, config.patches_per_side
    assert 384 // 14 == side
    newline = torch.randn(dim)
    processor = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=[list(p) for p in config.grid_pinpoints]),
        num_image_tokens=side * side,
        vision_aspect_ratio="anyres_max_9",
    )
    processor._get_unpadded_features = lambda *a: hf_ov_proc.LlavaOnevisionProcessor._get_unpadded_features(
        processor, *a
    )
    pooled = 0
    for size in _layout_sizes(12, 40) + [(2000, 2000), (1500, 3000), (3000, 1200), (800, 2400), (2304, 2304)]:
        n = num_anyres_crops(size, config.grid_pinpoints, config.crop_size)
        features = torch.randn(n, side * side, dim)
        (expected,), lens = hf_ov_model.LlavaOnevisionModel.pack_image_features(
            model, [features], torch.tensor([size]), image_newline=newline, vision_aspect_ratio="anyres_max_9"
        )
        ours = pack_anyres_features(
            features, size, config.grid_pinpoints, 384, image_newline=newline, anyres_max=9
        )
        assert ours.shape == expected.shape, size
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
        assert config.num_image_tokens(size) == lens[0]
        assert hf_ov_proc.LlavaOnevisionProcessor._get_number_of_features(processor, *size, 384, 384) == lens[0]
        pooled += ours.shape[0] < num_image_tokens(size, config.grid_pinpoints, 384, side)
    assert pooled >= 5  # the bilinear branch was exercised


def test_single_feature_set_gets_one_newline():
    # transformers' n == 1 branch (OneVision's padded squares): features, then one newline
    features, newline = torch.randn(1, 729, 4), torch.randn(4)
    model = _fake_model(LLAVA_ONEVISION)
    (expected,), _ = hf_ov_model.LlavaOnevisionModel.pack_image_features(
        model, [features], torch.tensor([[50, 90]]), image_newline=newline
    )
    assert torch.equal(pack_anyres_features(features, (50, 90), OV_PINPOINTS, 384, newline, 9), expected)


def test_anyres_max_pool_threshold():
    side = 27
    budget = 9 * side * side  # 6561 tokens
    # 88 x 88 = 7744 tokens: ratio 1.086 <= 1.1, kept
    assert anyres_max_shape(88, 88, 9, side) == (88, 88)
    features = torch.randn(3, 88, 88)
    assert anyres_max_pool(features, 9, side) is features
    # 90 x 90 = 8100: ratio sqrt(8100 / 6561) = 1.111 -> 90 / ratio is 81, but computed as
    # float floor division 90 // 1.1111111111111112 = 80.0 (transformers' exact expression)
    assert 90 // math.sqrt(90 * 90 / budget) == 80.0
    assert anyres_max_shape(90, 90, 9, side) == (80, 80)
    features = torch.randn(3, 162, 162)
    pooled = anyres_max_pool(features, 9, side)
    assert pooled.shape == (3, 81, 81) and pooled.shape[1] * pooled.shape[2] <= budget
    expected = torch.nn.functional.interpolate(features[None], [81, 81], mode="bilinear", align_corners=False)[0]
    assert torch.equal(pooled, expected)


# --------------------------------------------------------------------------- config, errors


def test_from_preprocessor_config_matches_presets():
    next_json = {
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "image_grid_pinpoints": NEXT_PINPOINTS,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_processor_type": "LlavaNextImageProcessor",
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336},
    }
    ov_json = {
        "image_grid_pinpoints": OV_PINPOINTS,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 384, "width": 384},
    }
    assert AnyResConfig.from_preprocessor_config(next_json) == LLAVA_NEXT
    assert AnyResConfig.from_preprocessor_config(ov_json) == LLAVA_ONEVISION
    with pytest.raises(ValueError, match="size"):
        AnyResConfig.from_preprocessor_config({**next_json, "size": {"shortest_edge": 224}})


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="zero size"):
        preprocess_anyres(Image.new("RGB", (0, 10)))
    with pytest.raises(ValueError, match="zero size"):
        preprocess_anyres(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_anyres("cat.png")
    with pytest.raises(TypeError, match="uint8"):
        preprocess_anyres(np.zeros((5, 5, 3), np.float32))
    with pytest.raises(ValueError, match="C in"):
        preprocess_anyres(np.zeros((5, 5, 2), np.uint8))
    with pytest.raises(ValueError, match="multiples of crop_size"):
        AnyResConfig(grid_pinpoints=((336, 500),))
    with pytest.raises(ValueError, match="anyres_max"):
        AnyResConfig(anyres_max=0)
    with pytest.raises(ValueError, match="positive"):
        select_best_resolution((0, 10), NEXT_PINPOINTS)
    with pytest.raises(ValueError, match="crops"):
        pack_anyres_features(torch.randn(2, 576, 4), (336, 672), NEXT_PINPOINTS, 336)
    with pytest.raises(ValueError, match="square"):
        pack_anyres_features(torch.randn(3, 577, 4), (336, 672), NEXT_PINPOINTS, 336)
    assert parse_vision_aspect_ratio("anyres_max_9") == 9
    with pytest.raises(ValueError, match="anyres_max_9"):
        parse_vision_aspect_ratio("anyres")



def test_a_llava_model_refuses_anyres_patches_that_are_not_its_towers():
    """AnyRes lays a crop's features out as patches_per_side^2: a tower with another grid
    (here 4 x 4, the default P is 24) is refused when the model is built, naming both."""
    import copy

    import yaml

    from _helpers import ROOT
    from llama_vision.model.builder import build_model

    params = copy.deepcopy(yaml.safe_load((ROOT / "configs/model/tiny_llava.yaml").read_text()))
    params.update(vocab_size=512)
    params["llava"]["anyres"] = {"grid_pinpoints": [[28, 28], [28, 56]], "crop_size": 28}
    with pytest.raises(ValueError, match=r"anyres.patches_per_side=24 does not match the tower's 16 tokens per crop "
                                         r"\(expected 4"):
        build_model(params)
    params["llava"]["anyres"]["patches_per_side"] = 4
    assert build_model(params).modalities["image"].fusion == "projector"


def test_array_inputs_convert_like_pil():
    rgb = _noise(40, 50)
    assert np.array_equal(to_rgb_array(rgb), to_rgb_array(Image.fromarray(rgb)))
    gray = _noise(40, 50, 1)
    assert np.array_equal(to_rgb_array(gray[..., 0]), to_rgb_array(gray))
    assert np.array_equal(to_rgb_array(torch.from_numpy(np.moveaxis(rgb, -1, 0).copy())), rgb)
    # RGBA: transparent pixels turn white
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert (to_rgb_array(rgba) == 255).all() and (to_rgb_array(Image.fromarray(rgba, "RGBA")) == 255).all()
