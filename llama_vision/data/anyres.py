"""AnyRes image preprocessing and feature layout, as LLaVA-NeXT and LLaVA-OneVision do it.

An image is shown to the vision tower twice over:

* the **overview**: the whole image squashed (aspect ratio *not* kept) to one
  ``crop_size x crop_size`` square;
* the **grid**: the image resized without distortion into the best of a list of
  resolutions (``grid_pinpoints``, each a multiple of ``crop_size``), padded to that
  resolution with black, centred, and cut into ``rows x cols`` square crops, row-major.

``pixel_values[0]`` is the overview, ``pixel_values[1 + r * cols + c]`` the crop in row ``r``
and column ``c``. On the model side (:func:`pack_anyres_features`) the crops' features are
sewn back into one ``[D, rows * P, cols * P]`` map (``P`` = vision patches per crop side),
the padding rows or columns are cut away again (:func:`unpad_features`), OneVision
optionally shrinks the map to a token budget (:func:`anyres_max_pool`), one ``image_newline``
vector is appended to every row, and the overview's ``P * P`` features go first.

Oracles: transformers' PIL-backed ``LlavaNextImageProcessorPil`` and
``LlavaOnevisionImageProcessorPil`` (pixels), and the functions ``select_best_resolution``,
``get_anyres_image_grid_shape``, ``image_size_to_num_patches``, ``unpad_image`` and the
``pack_image_features`` methods of ``modeling_llava_next`` / ``modeling_llava_onevision``
(layout). This module does not import transformers; ``tests/test_anyres.py`` compares.

Numerics we follow on purpose (each is marked where it happens):

* resizing is PIL's on uint8 RGB, as in the PIL-backed processors. The default
  (torchvision-backed) ``LlavaNextImageProcessor`` resizes uint8 tensors with torchvision,
  whose bicubic kernel rounds differently: pixel values move by up to a few 1e-2 (see the
  test that pins it). Checkpoints were trained with the PIL numerics (the original LLaVA
  code uses PIL), so those are what we reproduce.
* the aspect-preserving resize uses ``ceil`` on the shorter side (``get_patch_output_size``)
  and the padding is split ``floor`` before / ``ceil`` after, with fill value 0 *before*
  normalisation, so padded pixels hold ``(0 - mean) / std``, not 0.
* normalisation is ``float32(float64(x) * rescale_factor)`` then ``(x - mean) / std`` in
  float32, as ``transformers.image_transforms.rescale`` / ``normalize`` compute it; we apply
  it as a 256-entry table per channel, which gives the same bits.
* ``unpad_features`` rounds the unpadded side with ``int(round(x, 7))`` (transformers'
  guard against float noise such as 335.99999999) and removes ``(current - new) // 2``
  from *both* ends, so an odd difference keeps one padded row or column.
* AnyRes-Max pools only when the unpadded map exceeds the budget by more than 10 % in area
  ratio terms (``ratio > 1.1``, i.e. more than ``1.21 * N * P**2`` tokens), to
  ``floor(h / ratio) x floor(w / ratio)`` with ``F.interpolate(mode="bilinear")`` and
  ``align_corners=False``, no antialiasing.

Colour conversion follows transformers' ``convert_to_rgb``: transparency (an ``A`` band,
or a palette / colour-key ``transparency`` entry) is composited onto white, every other mode
goes through PIL's ``convert("RGB")`` (which clamps 16-bit samples; ``image_io.to_rgb``
rescales them instead, so do not pre-convert with it if you want transformers' pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .tiling import _RESAMPLE  # PIL filters by name (one table for both image paths)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# llava-hf/llava-v1.6-* preprocessor_config.json (and the class default of both processors'
# LLaVA-NeXT variant): 1x2, 2x1, 2x2, 3x1, 1x3 crops of 336 px, as (height, width).
LLAVA_NEXT_GRID_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
)
# llava-hf/llava-onevision-* (and LlavaOnevisionImageProcessorPil's default): every grid from
# 1x1 to 6x6 crops of 384 px, rows outer, columns inner. The order matters: ties in
# select_best_resolution keep the first candidate.
LLAVA_ONEVISION_GRID_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7)
)

_RESAMPLE_NAMES = {int(value): name for name, value in _RESAMPLE.items()}


# --------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class AnyResConfig:
    """How to cut images into AnyRes crops and how the model lays their features out.

    Attributes:
        grid_pinpoints: candidate resolutions ``(height, width)`` in pixels, each side a
            multiple of ``crop_size``. Order matters for ties (first wins).
        crop_size: side of every crop and of the overview, in pixels (the vision tower's
            input size: 336 for CLIP-L/14-336, 384 for SigLIP-so400m/14-384).
        image_mean, image_std: per-channel normalisation, applied after ``rescale_factor``.
        resample: PIL filter name for every resize (``"bicubic"`` in both checkpoints).
        rescale_factor: multiplies uint8 values before normalisation (1/255).
        patches_per_side: vision features per crop side, ``P`` (24 for CLIP-L/14-336,
            27 for SigLIP/14-384: ``image_size // patch_size``). Only the layout
            functions (token counts, packing) use it.
        anyres_max: OneVision's ``anyres_max_N``: pool the unpadded grid features down to
            about ``N * P**2`` tokens; ``None`` for LLaVA-NeXT (no pooling).
        square_for_multi_image: OneVision preprocesses a sample with several images as one
            padded square each (no crops); LLaVA-NeXT crops every image.
    """

    grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_NEXT_GRID_PINPOINTS
    crop_size: int = 336
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    patches_per_side: int = 24
    anyres_max: int | None = None
    square_for_multi_image: bool = False
    _table: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pinpoints = tuple(tuple(int(v) for v in p) for p in self.grid_pinpoints)
        object.__setattr__(self, "grid_pinpoints", pinpoints)
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        if not isinstance(self.crop_size, int) or self.crop_size <= 0:
            raise ValueError(f"crop_size must be a positive int, got {self.crop_size!r}")
        if not pinpoints:
            raise ValueError("grid_pinpoints must list at least one (height, width) resolution")
        for p in pinpoints:
            if len(p) != 2 or min(p) <= 0 or p[0] % self.crop_size or p[1] % self.crop_size:
                # transformers would cut ragged edge crops and then count them
                # inconsistently (ceil in image_size_to_num_patches, floor in
                # get_anyres_image_grid_shape); no checkpoint does this.
                raise ValueError(
                    f"grid pinpoint {p} must be (height, width) with both sides positive "
                    f"multiples of crop_size={self.crop_size}"
                )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 values (R, G, B)")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if not isinstance(self.patches_per_side, int) or self.patches_per_side <= 0:
            raise ValueError(f"patches_per_side must be a positive int, got {self.patches_per_side!r}")
        if self.anyres_max is not None and (not isinstance(self.anyres_max, int) or self.anyres_max <= 0):
            raise ValueError(f"anyres_max must be None or a positive int, got {self.anyres_max!r}")
        object.__setattr__(self, "_table", _normalization_table(self))

    # presets ----------------------------------------------------------------------------

    @classmethod
    def llava_next(cls, **overrides: Any) -> "AnyResConfig":
        """llava-hf/llava-v1.6-*: CLIP-L/14-336, 5 pinpoints up to 3x1 crops, CLIP mean/std."""
        return cls(**overrides)

    @classmethod
    def llava_onevision(cls, **overrides: Any) -> "AnyResConfig":
        """llava-hf/llava-onevision-*: SigLIP/14-384, 1x1..6x6 crops, anyres_max_9.

        mean/std are 0.5 as in the checkpoints' ``preprocessor_config.json``; note that
        ``LlavaOnevisionImageProcessorPil()`` *without* a config defaults to CLIP mean/std.
        """
        values: dict[str, Any] = dict(
            grid_pinpoints=LLAVA_ONEVISION_GRID_PINPOINTS,
            crop_size=384,
            image_mean=SIGLIP_MEAN,
            image_std=SIGLIP_STD,
            patches_per_side=27,
            anyres_max=9,
            square_for_multi_image=True,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_preprocessor_config(
        cls, config: Mapping[str, Any], *, onevision: bool | None = None, **overrides: Any
    ) -> "AnyResConfig":
        """Build from a transformers ``preprocessor_config.json`` dict (LLaVA-NeXT or OneVision).

        ``onevision`` defaults to whether ``image_processor_type`` names OneVision; it picks
        the OneVision defaults (anyres_max 9, SigLIP's 27 patches, padded squares for
        multi-image samples). ``overrides`` win over everything.
        """
        if onevision is None:
            onevision = "onevision" in str(config.get("image_processor_type", "")).lower()
        base = cls.llava_onevision() if onevision else cls.llava_next()
        size = dict(config.get("size") or {})
        crop = dict(config.get("crop_size") or {})
        if crop and config.get("do_center_crop", True) is not False:
            crop_side = _square_side(crop, "crop_size")
        else:
            crop_side = None
        size_side = _square_side(size, "size") if size else None
        side = crop_side or size_side or base.crop_size
        if size_side is not None and size_side != side:
            raise ValueError(
                f"size {size} differs from crop_size {crop}: only size == crop_size is supported"
            )
        resample = config.get("resample", 3)
        if isinstance(resample, int):
            if resample not in _RESAMPLE_NAMES:
                raise ValueError(f"unknown PIL resample code {resample}")
            resample = _RESAMPLE_NAMES[resample]
        values: dict[str, Any] = dict(
            grid_pinpoints=tuple(tuple(p) for p in config.get("image_grid_pinpoints", base.grid_pinpoints)),
            crop_size=side,
            image_mean=tuple(config.get("image_mean", base.image_mean)),
            image_std=tuple(config.get("image_std", base.image_std)),
            resample=resample,
            rescale_factor=float(config.get("rescale_factor", base.rescale_factor)),
            patches_per_side=base.patches_per_side,
            anyres_max=base.anyres_max,
            square_for_multi_image=base.square_for_multi_image,
        )
        values.update(overrides)
        return cls(**values)

    # conveniences -----------------------------------------------------------------------

    def num_image_tokens(self, image_size: Sequence[int], *, image_newline: bool = True) -> int:
        """:func:`num_image_tokens` with this config's pinpoints, sizes and ``anyres_max``."""
        return num_image_tokens(
            image_size,
            self.grid_pinpoints,
            self.crop_size,
            self.patches_per_side,
            image_newline=image_newline,
            anyres_max=self.anyres_max,
        )


def _square_side(size: Mapping[str, Any], name: str) -> int:
    if "shortest_edge" in size and size["shortest_edge"]:
        return int(size["shortest_edge"])
    if size.get("height") and size.get("width"):
        if size["height"] != size["width"]:
            raise ValueError(f"{name} must be square, got {dict(size)}")
        return int(size["height"])
    raise ValueError(f"{name} must have 'shortest_edge' or 'height' and 'width', got {dict(size)}")


def _normalization_table(config: AnyResConfig) -> np.ndarray:
    """float32 ``[3, 256]``: what each uint8 level becomes, computed with transformers' exact
    operations (``rescale``: float64 multiply, then float32; ``normalize``: float32 subtract
    and divide) so a lookup is bit-identical to running them on every pixel."""
    levels = np.arange(256, dtype=np.uint8)
    rescaled = (levels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(config.image_std, dtype=np.float32)[:, None]
    return ((rescaled[None, :] - mean) / std).astype(np.float32)


LLAVA_NEXT = AnyResConfig.llava_next()
LLAVA_ONEVISION = AnyResConfig.llava_onevision()


# --------------------------------------------------------------------------------------
# resolution selection (pure integer / float arithmetic, identical to transformers)


def _check_size(image_size: Any, name: str = "image_size") -> tuple[int, int]:
    if isinstance(image_size, (torch.Tensor, np.ndarray)):
        image_size = image_size.tolist()  # a 0-d tensor inside would break the float maths
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be (height, width), got {image_size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be positive, got (height={height}, width={width})")
    return height, width


def select_best_resolution(
    original_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` an image of ``original_size = (height, width)`` is
    fitted into (LLaVA-NeXT's rule).

    Each candidate is scored by the *effective* resolution (pixels of the image after an
    aspect-preserving downscale to fit the candidate, never more than the original's) and
    the *wasted* area (candidate area minus effective). The largest effective resolution
    wins; ties go to the least waste, then to the earlier candidate. The downscaled sides are
    truncated with ``int()`` here, unlike the ``ceil`` of the actual resize (as in
    transformers).
    """
    height, width = _check_size(original_size, "original_size")
    if not grid_pinpoints:
        raise ValueError("grid_pinpoints is empty")
    best: tuple[int, int] | None = None
    best_effective = 0
    best_wasted = float("inf")
    for cand_h, cand_w in grid_pinpoints:
        scale = min(cand_w / width, cand_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cand_h), int(cand_w)), effective, wasted
    if best is None:  # every candidate truncates the image to 0 pixels
        raise ValueError(f"no grid pinpoint in {list(grid_pinpoints)} fits an image of {height}x{width}")
    return best


def resized_size(original_size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of the image resized, aspect preserved, to fit ``target``.

    transformers' ``get_patch_output_size``: the side with the smaller scale fills the
    target exactly; the other is ``ceil``-ed and capped at the target.
    """
    height, width = _check_size(original_size, "original_size")
    target_h, target_w = (int(v) for v in target)
    scale_w = target_w / width
    scale_h = target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def anyres_grid_shape(
    image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], crop_size: int
) -> tuple[int, int]:
    """``(rows, cols)`` of crops for an image of ``image_size = (height, width)``.

    Same as transformers' ``get_anyres_image_grid_shape`` (whose docstring says
    "(width, height)" but which takes and returns (height, width) order).
    """
    best_h, best_w = select_best_resolution(image_size, grid_pinpoints)
    return best_h // crop_size, best_w // crop_size


def num_anyres_crops(
    image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], crop_size: int
) -> int:
    """Images the vision tower sees for one AnyRes image: ``1 + rows * cols`` (overview
    first). transformers' ``image_size_to_num_patches``, for pinpoints that are multiples of
    ``crop_size`` (which :class:`AnyResConfig` enforces)."""
    best_h, best_w = select_best_resolution(image_size, grid_pinpoints)
    return 1 + math.ceil(best_h / crop_size) * math.ceil(best_w / crop_size)


# --------------------------------------------------------------------------------------
# pixels


class AnyResImage(NamedTuple):
    """One preprocessed image.

    Attributes:
        pixel_values: float32 ``[1 + rows * cols, 3, crop_size, crop_size]``; ``[0]`` is the
            overview, then the crops row-major. ``[1, 3, S, S]`` for a padded square.
        image_size: ``(height, width)`` of the input image, what the model's layout needs.
        grid: ``(rows, cols)`` of crops, ``None`` for a padded square (OneVision's
            multi-image path).
    """

    pixel_values: torch.Tensor
    image_size: tuple[int, int]
    grid: tuple[int, int] | None


def to_rgb_array(image: Any) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB pixels of ``image``, converted as transformers converts them.

    Accepts a PIL image (any mode), a uint8 numpy array ``[H, W]`` or ``[H, W, C]``
    (channels last, as ``np.asarray(pil_image)`` gives) or a uint8 torch tensor
    ``[C, H, W]`` (channels first, as torchvision gives), ``C`` in 1, 3, 4.
    Transparency is composited onto white (PIL's ``alpha_composite`` for PIL images,
    ``round(a * rgb + (1 - a) * 255)`` for arrays, as transformers does for each).
    Arrays are never guessed at: transformers instead infers the channel axis, taking a
    leading 1, 3 or 4 as channels even for an ``[H, W, C]`` array with ``H`` in (1, 3, 4).
    """
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has zero size ({image.width}x{image.height}, width x height)")
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
        return np.asarray(rgb)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"a torch image must be [C, H, W], got shape {tuple(image.shape)}")
        array = image.detach().cpu().numpy()
        array = np.moveaxis(array, 0, -1)
        what = "torch tensor [C, H, W]"
    elif isinstance(image, np.ndarray):
        array = image[..., None] if image.ndim == 2 else image
        what = "numpy array [H, W, C]"
    else:
        raise TypeError(
            "expected a PIL image, a uint8 numpy array [H, W(, C)] or a uint8 torch tensor "
            f"[C, H, W], got {type(image).__name__}"
        )
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a {what} with C in (1, 3, 4), got shape {tuple(image.shape)}")
    if array.dtype != np.uint8:
        # transformers accepts float arrays but then rescales [0, 1] data a second time.
        raise TypeError(f"expected uint8 pixels, got dtype {array.dtype}; convert to uint8 0..255 first")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has zero size ({array.shape[1]}x{array.shape[0]}, width x height)")
    channels = array.shape[-1]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=-1))
    if channels == 4:
        # transformers.image_transforms.convert_to_rgb, array branch: float64 blend, round.
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return np.ascontiguousarray(array)


def _resize(pixels: Image.Image, height: int, width: int, resample: str) -> np.ndarray:
    # PIL returns a copy for a same-size resize, so a no-op stays exact (transformers then
    # "resizes" every crop to its own size).
    return np.asarray(pixels.resize((width, height), resample=_RESAMPLE[resample]))


def _normalize(stack: np.ndarray, config: AnyResConfig) -> torch.Tensor:
    """uint8 ``[N, S, S, 3]`` -> float32 ``[N, 3, S, S]`` via the per-channel table."""
    out = np.empty((stack.shape[0], 3, stack.shape[1], stack.shape[2]), dtype=np.float32)
    for channel in range(3):
        out[:, channel] = config._table[channel][stack[..., channel]]
    return torch.from_numpy(out)


def _crops(rgb: np.ndarray, config: AnyResConfig) -> tuple[np.ndarray, tuple[int, int]]:
    height, width = rgb.shape[:2]
    size = config.crop_size
    best_h, best_w = select_best_resolution((height, width), config.grid_pinpoints)
    new_h, new_w = resized_size((height, width), (best_h, best_w))
    pil = Image.fromarray(rgb)
    canvas = np.zeros((best_h, best_w, 3), dtype=np.uint8)  # black, before normalisation
    # centred; an odd remainder goes after (bottom / right), like np.pad((d // 2, d - d // 2))
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = _resize(pil, new_h, new_w, config.resample)
    rows, cols = best_h // size, best_w // size
    grid = canvas.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3)
    # the overview ignores the aspect ratio: a plain resize to (S, S)
    overview = _resize(pil, size, size, config.resample)
    return np.concatenate([overview[None], grid]), (rows, cols)


def anyres_crops(image: Any, config: AnyResConfig = LLAVA_NEXT) -> tuple[np.ndarray, tuple[int, int]]:
    """The uint8 images the vision tower will see, before normalisation.

    Returns:
        ``(crops, (rows, cols))``: crops uint8 ``[1 + rows * cols, S, S, 3]`` (overview
        first, then row-major) with ``S = config.crop_size``.
    """
    return _crops(to_rgb_array(image), config)


def preprocess_anyres(image: Any, config: AnyResConfig = LLAVA_NEXT) -> AnyResImage:
    """AnyRes pixels of one image, equal to transformers' PIL-backed LLaVA-NeXT / OneVision
    processors (single-image path).

    Args:
        image: PIL image, uint8 numpy ``[H, W(, C)]`` or uint8 torch ``[C, H, W]``
            (see :func:`to_rgb_array`).
        config: :data:`LLAVA_NEXT`, :data:`LLAVA_ONEVISION` or any :class:`AnyResConfig`.

    Returns:
        :class:`AnyResImage` with float32 ``pixel_values [1 + rows * cols, 3, S, S]``.
    """
    rgb = to_rgb_array(image)
    crops, grid = _crops(rgb, config)
    return AnyResImage(_normalize(crops, config), (rgb.shape[0], rgb.shape[1]), grid)


def preprocess_square(image: Any, config: AnyResConfig = LLAVA_ONEVISION) -> AnyResImage:
    """OneVision's path for samples with several images: pad to a square, centred, with the
    mean colour (``int(mean * 255)`` per channel, truncated as transformers does), then
    resize to ``crop_size``. Returns ``pixel_values [1, 3, S, S]`` and ``grid=None``."""
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    if height != width:
        side = max(height, width)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[:] = [int(m * 255) for m in config.image_mean]
        if width > height:
            start = (side - height) // 2
            square[start : start + height] = rgb
        else:
            start = (side - width) // 2
            square[:, start : start + width] = rgb
        rgb = square
    size = config.crop_size
    pixels = _resize(Image.fromarray(rgb), size, size, config.resample)
    return AnyResImage(_normalize(pixels[None], config), (height, width), None)


def preprocess_sample(images: Sequence[Any], config: AnyResConfig = LLAVA_NEXT) -> list[AnyResImage]:
    """All images of one sample: AnyRes each, except that with
    ``config.square_for_multi_image`` (OneVision) a sample of two or more images gets one
    padded square per image (transformers' ``batch_num_images > 1``)."""
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
        raise TypeError("preprocess_sample takes a sequence of images; use preprocess_anyres for one")
    if config.square_for_multi_image and len(images) > 1:
        return [preprocess_square(image, config) for image in images]
    return [preprocess_anyres(image, config) for image in images]


def stack_anyres(images: Sequence[AnyResImage]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch preprocessed images like transformers' ``do_pad=True``.

    Returns:
        ``(pixel_values, image_sizes)``: float32 ``[B, max_n, 3, S, S]`` with missing
        crops exact zeros (the model reads only ``num_anyres_crops`` per image), and int64
        ``[B, 2]`` (height, width).
    """
    if not images:
        raise ValueError("stack_anyres needs at least one image")
    max_n = max(item.pixel_values.shape[0] for item in images)
    first = images[0].pixel_values
    out = first.new_zeros((len(images), max_n, *first.shape[1:]))
    for index, item in enumerate(images):
        if item.pixel_values.shape[1:] != first.shape[1:]:
            raise ValueError("all images must share one crop size to be stacked")
        out[index, : item.pixel_values.shape[0]] = item.pixel_values
    sizes = torch.tensor([item.image_size for item in images], dtype=torch.long)
    return out, sizes


# --------------------------------------------------------------------------------------
# feature layout (model side)


def _unpad_bounds(current: tuple[int, int], original_size: Sequence[int]) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the image inside a padded ``current = (H, W)`` map.

    transformers' ``unpad_image``: whichever side the image filled keeps its full length;
    the other is ``int(round(original * scale, 7))`` (the 7-digit round absorbs float noise
    like 23.999999999999996), and ``(current - new) // 2`` is removed from *both* ends.
    """
    orig_h, orig_w = _check_size(original_size, "original_size")
    cur_h, cur_w = current
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def unpad_features(features: torch.Tensor, original_size: Sequence[int]) -> torch.Tensor:
    """Cut the padding off a ``[C, H, W]`` feature map of an image of ``original_size``
    ``(height, width)``; returns a view ``[C, h, w]`` (transformers' ``unpad_image``)."""
    if features.ndim != 3:
        raise ValueError(f"features must be [C, H, W], got shape {tuple(features.shape)}")
    top, bottom, left, right = _unpad_bounds(tuple(features.shape[1:]), original_size)
    return features[:, top:bottom, left:right]


def _pool_ratio(height: int, width: int, max_num_patches: int, patches_per_side: int) -> float:
    return math.sqrt(height * width / (max_num_patches * patches_per_side**2))


def anyres_max_shape(
    height: int, width: int, max_num_patches: int, patches_per_side: int
) -> tuple[int, int]:
    """Size of an unpadded ``height x width`` grid map after AnyRes-Max pooling.

    ``ratio = sqrt(h * w / (N * P**2))``; when ``ratio > 1.1`` the map becomes
    ``int(h // ratio) x int(w // ratio)`` (float floor-division, as transformers), else it
    is kept, so up to ``1.21 * N * P**2`` tokens pass unpooled.
    """
    ratio = _pool_ratio(height, width, max_num_patches, patches_per_side)
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


def anyres_max_pool(features: torch.Tensor, max_num_patches: int, patches_per_side: int) -> torch.Tensor:
    """OneVision's AnyRes-Max: bilinearly shrink an unpadded ``[C, H, W]`` grid map to
    :func:`anyres_max_shape` (unchanged below the threshold). ``align_corners=False``, no
    antialias: transformers' ``nn.functional.interpolate(..., mode="bilinear")``."""
    if features.ndim != 3:
        raise ValueError(f"features must be [C, H, W], got shape {tuple(features.shape)}")
    height, width = features.shape[1:]
    new_shape = anyres_max_shape(height, width, max_num_patches, patches_per_side)
    if new_shape == (height, width):
        return features
    return F.interpolate(features[None], list(new_shape), mode="bilinear")[0]


def unpadded_grid_shape(
    image_size: Sequence[int],
    grid_pinpoints: Sequence[Sequence[int]],
    crop_size: int,
    patches_per_side: int,
    anyres_max: int | None = None,
) -> tuple[int, int]:
    """``(h, w)`` of the grid feature map after unpadding (and AnyRes-Max pooling): the
    newline-less shape :func:`pack_anyres_features` produces, computed without tensors."""
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, crop_size)
    top, bottom, left, right = _unpad_bounds((rows * patches_per_side, cols * patches_per_side), image_size)
    height, width = bottom - top, right - left
    if anyres_max is not None:
        height, width = anyres_max_shape(height, width, anyres_max, patches_per_side)
    return height, width


def num_image_tokens(
    image_size: Sequence[int],
    grid_pinpoints: Sequence[Sequence[int]],
    crop_size: int,
    patches_per_side: int,
    *,
    image_newline: bool = True,
    anyres_max: int | None = None,
) -> int:
    """Feature vectors one AnyRes image becomes in the language model's sequence:
    ``P * P`` (overview) ``+ h * w`` (unpadded, maybe pooled grid) ``+ h`` (one newline per
    row, if the model has ``image_newline``). Equals the length of transformers'
    ``pack_image_features`` output and its processors' ``_get_number_of_features``."""
    height, width = unpadded_grid_shape(image_size, grid_pinpoints, crop_size, patches_per_side, anyres_max)
    return patches_per_side**2 + height * width + (height if image_newline else 0)


def pack_anyres_features(
    features: torch.Tensor,
    image_size: Sequence[int],
    grid_pinpoints: Sequence[Sequence[int]],
    crop_size: int,
    image_newline: torch.Tensor | None = None,
    anyres_max: int | None = None,
) -> torch.Tensor:
    """Lay out the projected features of one image as the language model sees them.

    Args:
        features: ``[n, P * P, D]`` for the ``n`` images the vision tower saw (overview
            first, then crops row-major; ``n = num_anyres_crops(...)``, or 1 for a padded
            square), CLS already dropped.
        image_size: ``(height, width)`` of the original image.
        image_newline: ``[D]`` learned vector appended after every row, or ``None``.
        anyres_max: OneVision's ``N`` of ``anyres_max_N``; ``None`` for LLaVA-NeXT.

    Returns:
        ``[T, D]``: the ``P * P`` overview tokens, then the grid row by row, each row
        followed by ``image_newline``; ``T = num_image_tokens(...)``. For ``n == 1``:
        ``[P * P (+ 1), D]``, the features plus one newline (transformers' single-patch
        branch).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [n, P*P, D], got shape {tuple(features.shape)}")
    count, length, dim = features.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"{length} features per crop is not a square P*P (drop the CLS token first)")
    if count == 1:
        if image_newline is None:
            return features[0]
        return torch.cat((features[0], image_newline[None].to(features)), dim=0)
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, crop_size)
    if count != 1 + rows * cols:
        raise ValueError(
            f"an image of size {tuple(_check_size(image_size))} has 1 + {rows}x{cols} crops, got {count} feature sets"
        )
    # crop (r, c), patch (y, x) -> position (r * P + y, c * P + x) of one [D, rows*P, cols*P] map
    grid = features[1:].reshape(rows, cols, side, side, dim).permute(4, 0, 2, 1, 3)
    grid = grid.reshape(dim, rows * side, cols * side)
    grid = unpad_features(grid, image_size)
    if anyres_max is not None:
        grid = anyres_max_pool(grid, anyres_max, side)
    if image_newline is not None:
        newline = image_newline.to(grid)[:, None, None].expand(dim, grid.shape[1], 1)
        grid = torch.cat((grid, newline), dim=-1)
    return torch.cat((features[0], grid.flatten(1, 2).transpose(0, 1)), dim=0)


def parse_vision_aspect_ratio(value: str) -> int:
    """``"anyres_max_9"`` -> 9 (OneVision's config string). transformers does
    ``value.strip("anyres_max_")`` (a character-set strip, which happens to work for
    digits); we require the exact prefix."""
    prefix = "anyres_max_"
    if not isinstance(value, str) or not value.startswith(prefix) or not value[len(prefix):].isdigit():
        raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {value!r}")
    number = int(value[len(prefix):])
    if number <= 0:
        raise ValueError(f"vision_aspect_ratio budget must be positive, got {value!r}")
    return number


__all__ = [
    "AnyResConfig",
    "AnyResImage",
    "LLAVA_NEXT",
    "LLAVA_NEXT_GRID_PINPOINTS",
    "LLAVA_ONEVISION",
    "LLAVA_ONEVISION_GRID_PINPOINTS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "anyres_crops",
    "anyres_grid_shape",
    "anyres_max_pool",
    "anyres_max_shape",
    "num_anyres_crops",
    "num_image_tokens",
    "pack_anyres_features",
    "parse_vision_aspect_ratio",
    "preprocess_anyres",
    "preprocess_sample",
    "preprocess_square",
    "resized_size",
    "select_best_resolution",
    "stack_anyres",
    "to_rgb_array",
    "unpad_features",
    "unpadded_grid_shape",
]
