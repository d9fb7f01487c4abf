"""Variable-resolution tiling of images, bit-exact to Meta's ``VariableSizeImageTransform``.

An image is resized without distortion onto the best canvas of ``rows x cols`` tiles
(``rows * cols <= max_num_tiles``), padded with black at the right/bottom, normalised with
the CLIP mean/std and cut into ``tile_size`` squares in row-major order. transformers'
``MllamaImageProcessorPil`` reproduces the same algorithm and is our test oracle.

Where the two references differ we say so next to the code:

* canvas scales: Meta compares float32 scales, transformers float64. For images below
  ~10^5 px per side both pick the same canvas (distinct scales differ by far more than a
  float32 ulp); we use Python floats like transformers.
* a side that would floor to 0 px (e.g. 1x10000 into a 560x2240 canvas) is kept at 1 px,
  as transformers does; Meta's code would ask PIL for a 0-px image and fail.
* padding: both pad with black *before* normalising, so padded pixels hold
  ``(0 - mean) / std`` (about -1.79, -1.75, -1.48), not zero. Only tiles or images that are
  absent from a batch (see :func:`stack_images`) are exact zeros.
* normalisation: both compute ``(x / 255 - mean) / std`` in float32 (Meta with torch,
  transformers via float64 ``x * (1/255)`` rounded to float32, which gives the same 256
  values). We run the same float32 operations, so pixel values are bit-identical rather
  than merely close.
* resizing is PIL's, so all three agree only under the same Pillow: Pillow 13, for one,
  runs the vertical pass first when the height shrinks much more than the width, which
  moves some pixels by one level against older versions.

Speed: PIL's resize is most of the cost and is kept as is (it defines the numerics).
Around it we avoid transformers' overheads (float64 rescale, numpy pad, split, pack) by
writing each tile once from planar uint8 channels, and :meth:`ImageProcessor.collate`
tiles a batch on parallel threads straight into the packed model input.

uint8 tiles (``ImageProcessor(output="uint8")``, training's ``data.tile_dtype: uint8``):
the resized pixels themselves, black padding 0, a quarter of float32's host memory and
host-to-device traffic. :func:`normalize_tiles` normalises them where they land (the GPU)
to exactly the values of the float32 path, absent tiles and images exact zeros as there.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .image_io import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@lru_cache(maxsize=64)
def supported_aspect_ratios(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """All tile grids ``(tiles_h, tiles_w)`` with ``tiles_h * tiles_w <= max_num_tiles``.

    The order is transformers' (``get_all_supported_aspect_ratios``): first factor
    ascending, then second ascending; e.g. for 4: (1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1)
    (4,1). The set is symmetric, so reading the pairs as (h, w) or (w, h) gives the same
    list; transformers looks up ``(tiles_h, tiles_w)`` in it, and so do we.
    """
    if max_num_tiles < 1:
        raise ValueError(f"max_num_tiles must be >= 1, got {max_num_tiles}")
    return tuple(
        (a, b)
        for a in range(1, max_num_tiles + 1)
        for b in range(1, max_num_tiles + 1)
        if a * b <= max_num_tiles
    )


def aspect_ratio_id(tiles_h: int, tiles_w: int, max_num_tiles: int) -> int:
    """transformers' ``aspect_ratio_ids`` entry for a grid: 1-based index into
    :func:`supported_aspect_ratios`; 0 is reserved for absent (padding) images."""
    try:
        return supported_aspect_ratios(max_num_tiles).index((tiles_h, tiles_w)) + 1
    except ValueError:
        raise ValueError(
            f"grid {tiles_h}x{tiles_w} is not a supported aspect ratio for "
            f"max_num_tiles={max_num_tiles}"
        ) from None


@lru_cache(maxsize=4096)
def best_canvas(height: int, width: int, tile_size: int, max_num_tiles: int) -> tuple[int, int]:
    """Choose the tile grid ``(tiles_h, tiles_w)`` for an image of ``height x width`` px.

    For each grid the distortion-free scale is ``min(canvas_w / w, canvas_h / h)``. The
    smallest scale >= 1 wins (the least upscaling that still covers the image); when no
    canvas is large enough, the largest scale < 1 (the least downscaling). Ties go to the
    smallest canvas area, which is unique: the tied grid with the fewest tiles in both
    directions is always among the candidates.
    """
    candidates = []
    for rows, cols in supported_aspect_ratios(max_num_tiles):
        # Same float64 expressions as transformers (scale_h vs scale_w, then the smaller).
        scale = min((rows * tile_size) / height, (cols * tile_size) / width)
        candidates.append((scale, rows, cols))
    upscales = [c[0] for c in candidates if c[0] >= 1]
    chosen = min(upscales) if upscales else max(c[0] for c in candidates)
    _, rows, cols = min((c for c in candidates if c[0] == chosen), key=lambda c: c[1] * c[2])
    return rows, cols


def fit_to_canvas(
    height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int
) -> tuple[int, int]:
    """Resized ``(height, width)`` of an image placed on a ``canvas_h x canvas_w`` canvas.

    The target box is clamped to ``[tile_size, canvas]`` per side around the image size, so
    an image is upscaled only while it is smaller than one tile and never beyond. The
    limiting side takes the box size, the other ``floor(side * scale)``: a float floor, as
    in both references, so a 180-px side scaled by 56/80 gives 125 px (180 * 0.7 is
    125.999... in binary floating point), not 126.
    """
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_w = target_w / width
    scale_h = target_h / height
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


TILE_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}


def normalization_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """What every uint8 level becomes after normalisation: float32 ``[3, 256]``,
    ``table[c, v] = (v / 255 - mean[c]) / std[c]``.

    The same numpy float32 operations, with the same three roundings, as the float32 tiling
    path (:meth:`ImageProcessor._normalise_tile`), so a table lookup gives bit-identical
    values; the padding value is ``table[:, 0]``.
    """
    levels = np.arange(256, dtype=np.float32)[None, :]
    mean = np.asarray(mean, dtype=np.float32)[:, None]
    std = np.asarray(std, dtype=np.float32)[:, None]
    return (levels / np.float32(255) - mean) / std


def normalize_tiles(
    tiles: torch.Tensor,
    num_tiles: torch.Tensor,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 tiles -> the float32 path's normalised tiles, on the tiles' device.

    Args:
        tiles: uint8 ``[..., T, 3, S, S]`` (``T`` tile slots per image; e.g. images
            ``[B, N, T, 3, S, S]`` or video frames ``[B, V, F, T, 3, S, S]``).
        num_tiles: integer ``[...]``, real tiles of each image: slots ``>= num_tiles``
            (all of them for an absent image, ``num_tiles`` 0) come out as exact zeros.
        mean, std: per-channel normalisation (the processor's; CLIP's by default).
        dtype: output dtype.

    Returns:
        ``dtype`` ``[..., T, 3, S, S]``: equal, bit for bit, to what
        ``ImageProcessor(output="float32")`` and :func:`stack_images` give for the same
        images, cast to ``dtype``.

    The values are looked up in :func:`normalization_table`, computed on the CPU by the
    float32 path's own numpy operations; the device only gathers, so the result does not
    depend on its arithmetic and CPU equality (what the tests check) is the contract on
    every device. (Computing ``(x / 255 - mean) / std`` on CUDA would be exact only with
    tensor divisors: CUDA turns division by a CPU scalar into multiplication by its
    reciprocal, one ulp off for some levels.) A table in ``dtype`` rounds each float32
    value once, as casting the float32 result would.
    """
    if tiles.dtype != torch.uint8:
        raise TypeError(f"normalize_tiles takes uint8 tiles, got {tiles.dtype}")
    if tiles.dim() < 4 or tiles.shape[-3] != 3 or tuple(num_tiles.shape) != tuple(tiles.shape[:-4]):
        raise ValueError(
            f"tiles must be [..., T, 3, S, S] and num_tiles [...], got {tuple(tiles.shape)} "
            f"and {tuple(num_tiles.shape)}"
        )
    device = tiles.device
    table = torch.from_numpy(normalization_table(mean, std)).to(device=device, dtype=dtype)
    # Row c of the flattened table starts at c * 256: one gather for all three channels.
    offsets = torch.arange(0, 3 * 256, 256, device=device, dtype=torch.int32).view(3, 1, 1)
    index = tiles.to(torch.int32).add_(offsets)
    out = table.view(-1).index_select(0, index.view(-1)).view(tiles.shape)
    slots = torch.arange(tiles.shape[-4], device=device)
    absent = slots >= num_tiles.to(device)[..., None]  # [..., T]
    return out.masked_fill_(absent[..., None, None, None], 0.0)


# Rows per block in the normalisation loop: 64 rows x 560 px x 4 B = 143 KB of float32,
# small enough that the four passes over a block (cast, /255, -mean, /std) stay in L2.
_BLOCK_ROWS = 64


class ImageProcessor:
    """Resize, pad, normalise and tile one image, exactly like Meta's reference.

    Args:
        tile_size: side S of a square tile in pixels (paper: 336; released checkpoints:
            560; read it from the checkpoint's params, ``vision_chunk_size``).
        max_num_tiles: most tiles per image (4 in the paper and the release).
        mean, std: per-channel normalisation (CLIP's by default).
        resample: PIL filter name; ``"bilinear"`` is the reference.
        output: ``"float32"`` (default): normalised tiles; ``"uint8"``: the resized pixels,
            black padding 0, for :meth:`normalize` (or :func:`normalize_tiles`) to
            normalise later, on the device, to the very same float32 values.

    Calling it on a PIL image returns ``(tiles, (tiles_h, tiles_w))`` where ``tiles`` is a
    float32 (or uint8) tensor ``[tiles_h * tiles_w, 3, S, S]`` in row-major tile order. One
    call runs on the calling thread only; :meth:`batch` spreads several images over threads.
    """

    def __init__(
        self,
        tile_size: int = 560,
        max_num_tiles: int = 4,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        resample: str = "bilinear",
        output: str = "float32",
    ):
        if tile_size < 1 or max_num_tiles < 1:
            raise ValueError("tile_size and max_num_tiles must be positive")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need one value per RGB channel")
        if output not in TILE_DTYPES:
            raise ValueError(f"output must be one of {sorted(TILE_DTYPES)}, got {output!r}")
        self.tile_size = tile_size
        self.max_num_tiles = max_num_tiles
        self.resample = resample
        self.output = output
        self.tile_dtype = TILE_DTYPES[output]
        self._filter = _RESAMPLE[resample]
        # float32 constants, as torchvision's Normalize uses them in Meta's code.
        self._mean = np.asarray(mean, dtype=np.float32)
        self._std = np.asarray(std, dtype=np.float32)
        # What a black padding pixel becomes, computed by the very same float32 steps.
        self._pad = normalization_table(self._mean, self._std)[:, 0]

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(tile_size={self.tile_size}, max_num_tiles={self.max_num_tiles}, "
            f"resample={self.resample!r}"
            + ("" if self.output == "float32" else f", output={self.output!r}")
            + ")"
        )

    def normalize(
        self, tiles: torch.Tensor, num_tiles: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """:func:`normalize_tiles` with this processor's mean and std: uint8
        ``[..., T, 3, S, S]`` and ``num_tiles`` ``[...]`` -> ``dtype`` ``[..., T, 3, S, S]``."""
        return normalize_tiles(tiles, num_tiles, self._mean.tolist(), self._std.tolist(), dtype)

    def plan(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Geometry for an image of ``width x height`` px (PIL order) without touching pixels.

        Returns:
            ``((tiles_h, tiles_w), (resized_h, resized_w))``.
        """
        tiles_h, tiles_w = best_canvas(height, width, self.tile_size, self.max_num_tiles)
        resized = fit_to_canvas(
            height, width, tiles_h * self.tile_size, tiles_w * self.tile_size, self.tile_size
        )
        return (tiles_h, tiles_w), resized

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tile one image (on the calling thread only).

        Args:
            image: a PIL image; non-RGB modes are converted first (alpha dropped, as Meta).

        Returns:
            ``tiles``: float32 (``output="uint8"``: uint8) ``[tiles_h * tiles_w, 3, S, S]``,
            row-major over the grid; ``(tiles_h, tiles_w)``: the grid (Meta's "aspect ratio").
        """
        image = _check_image(image)
        grid, resized = self.plan(*image.size)
        size = self.tile_size
        tiles = np.empty((grid[0] * grid[1], 3, size, size), dtype=self._np_dtype)
        self._tile_into(tiles, image, grid, resized)
        return torch.from_numpy(tiles), grid

    def batch(
        self, images: Sequence[Image.Image], num_threads: int | None = None
    ) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Tile several images on parallel threads (PIL's resize and numpy release the GIL).

        Args:
            images: PIL images.
            num_threads: worker threads; default ``torch.get_num_threads()`` (which
                DataLoader workers set to 1, so nothing oversubscribes there).

        Returns:
            ``[(tiles, (tiles_h, tiles_w)), ...]`` in input order, exactly as ``__call__``.
        """
        return _run_parallel(self, list(images), num_threads)

    def collate(
        self, batch: Sequence[Sequence[Image.Image]], num_threads: int | None = None
    ) -> "TiledBatch":
        """Tile a batch of samples straight into the packed model input.

        Same result as tiling every image and calling :func:`stack_images`,
        :func:`stack_aspect_ratios` and :func:`aspect_ratio_id`, but each image is written
        once, in place, by parallel threads, and only the absent slots are zeroed.

        Args:
            batch: ``B`` lists of PIL images (a list may be empty: text-only sample).
            num_threads: as in :meth:`batch`.

        Returns:
            :class:`TiledBatch` with ``images`` float32 (or uint8) ``[B, N, T, 3, S, S]``,
            ``num_tiles`` int64 ``[B, N]``, ``aspect_ratios`` int64 ``[B, N, 2]`` and
            ``aspect_ratio_ids`` int64 ``[B, N]``; ``N = max(1, most images in a
            sample)``, ``T = max_num_tiles``.
        """
        samples = [[_check_image(image) for image in sample] for sample in batch]
        plans = [[self.plan(*image.size) for image in sample] for sample in samples]
        n_max = max([1] + [len(sample) for sample in samples])
        size, slots = self.tile_size, self.max_num_tiles
        # numpy allocates large arrays with transparent huge pages (madvise), which makes
        # first-touch page faults on this fresh ~15 MB-per-image buffer much cheaper than
        # with torch.empty; the tensor shares the memory and the workers fill it in place.
        pixels = np.empty((len(samples), n_max, slots, 3, size, size), dtype=self._np_dtype)
        images = torch.from_numpy(pixels)

        def fill(slot: tuple[int, int]) -> None:
            i, j = slot
            if j >= len(samples[i]):
                pixels[i, j] = 0  # absent image: exact zeros
                return
            grid, resized = plans[i][j]
            count = grid[0] * grid[1]
            self._tile_into(pixels[i, j, :count], samples[i][j], grid, resized)
            pixels[i, j, count:] = 0  # unused tile slots: exact zeros

        _run_parallel(fill, [(i, j) for i in range(len(samples)) for j in range(n_max)], num_threads)
        grids = [[grid for grid, _ in sample] for sample in plans]
        num_tiles = torch.tensor(
            [[h * w for h, w in sample] + [0] * (n_max - len(sample)) for sample in grids],
            dtype=torch.long,
        ).view(len(samples), n_max)
        ids = torch.tensor(
            [
                [aspect_ratio_id(h, w, slots) for h, w in sample] + [0] * (n_max - len(sample))
                for sample in grids
            ],
            dtype=torch.long,
        ).view(len(samples), n_max)
        return TiledBatch(images, num_tiles, stack_aspect_ratios(grids), ids)

    @property
    def _np_dtype(self) -> type:
        return np.uint8 if self.output == "uint8" else np.float32

    def _tile_into(
        self,
        out: np.ndarray,
        image: Image.Image,
        grid: tuple[int, int],
        resized: tuple[int, int],
    ) -> None:
        """Resize ``image`` to ``resized`` (h, w) and write its ``grid`` of normalised,
        black-padded tiles into ``out``: float32 ``[tiles_h * tiles_w, 3, S, S]`` (uint8:
        the pixels, black padding 0)."""
        (tiles_h, tiles_w), (new_h, new_w) = grid, resized
        image = to_rgb(image)
        if (new_w, new_h) != image.size:
            # PIL on uint8, like both references: bilinear with PIL's support scaling,
            # i.e. antialiased when downscaling. Whatever Pillow version is installed is
            # what Meta's and transformers' code would use too.
            image = image.resize((new_w, new_h), self._filter)
        # Planar uint8 channels, [new_h, new_w] each. PIL stores RGB as 4-byte pixels, so
        # split() costs no more than np.asarray(image), and casting contiguous planes is
        # ~3x faster than casting a channel-interleaved [H, W, 3] array.
        planes = [np.asarray(band) for band in image.split()]
        size = self.tile_size
        # copy=False: a view (or an error), never a silent copy that would drop the writes.
        tiles = np.reshape(out, (tiles_h, tiles_w, 3, size, size), copy=False)
        fill = _copy_tile if out.dtype == np.uint8 else self._normalise_tile
        for i in range(tiles_h):
            rows = min(max(new_h - i * size, 0), size)  # image rows inside this tile row
            for j in range(tiles_w):
                cols = min(max(new_w - j * size, 0), size)
                for c in range(3):
                    source = planes[c][i * size : i * size + rows, j * size : j * size + cols]
                    fill(tiles[i, j, c], source, c)

    def _normalise_tile(self, out: np.ndarray, source: np.ndarray, channel: int) -> None:
        """Fill one channel of one tile: ``out`` float32 [S, S] from uint8 ``source``
        [rows, cols] (the image part of the tile, top-left), padding with black.

        numpy rather than torch: the work stays on the calling thread (torch's intra-op
        threads stall badly when the cores are shared with other processes, and would
        nest inside :meth:`batch` or DataLoader workers), and numpy releases the GIL.
        """
        rows, cols = source.shape
        pad = self._pad[channel]
        out[rows:] = pad
        out[:rows, cols:] = pad
        mean, std, scale = self._mean[channel], self._std[channel], np.float32(255)
        # Meta: ToTensor (uint8 -> float32, / 255) then Normalize ((x - mean) / std), all in
        # float32; the same three roundings give bit-identical values. (A fused x * a + b
        # would save one pass but differ by up to ~5e-7.)
        for start in range(0, rows, _BLOCK_ROWS):
            stop = min(start + _BLOCK_ROWS, rows)
            block = out[start:stop, :cols]
            np.copyto(block, source[start:stop])
            block /= scale
            block -= mean
            block /= std


def _copy_tile(out: np.ndarray, source: np.ndarray, channel: int) -> None:
    """Fill one channel of one uint8 tile: ``out`` [S, S] from ``source`` [rows, cols]
    (top-left), black (0) elsewhere; ``channel`` is unused (no per-channel constants)."""
    rows, cols = source.shape
    out[rows:] = 0
    out[:rows, cols:] = 0
    out[:rows, :cols] = source


class TiledBatch(NamedTuple):
    """Packed image input for a batch (see :meth:`ImageProcessor.collate`).

    Fields: ``images`` float32 or uint8 ``[B, N, T, 3, S, S]`` (zeros where absent);
    ``num_tiles`` int64 ``[B, N]`` (0 where absent); ``aspect_ratios`` int64
    ``[B, N, 2]`` as (tiles_h, tiles_w), (1, 1) where absent; ``aspect_ratio_ids`` int64
    ``[B, N]`` (transformers' ids, 0 where absent).
    """

    images: torch.Tensor
    num_tiles: torch.Tensor
    aspect_ratios: torch.Tensor
    aspect_ratio_ids: torch.Tensor


def _check_image(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    return image


def _run_parallel(function, items: list, num_threads: int | None) -> list:
    """``[function(item) for item in items]`` on up to ``num_threads`` threads
    (default ``torch.get_num_threads()``), results in input order."""
    threads = min(len(items), num_threads or torch.get_num_threads())
    if threads <= 1:
        return [function(item) for item in items]
    # A fresh pool per call: no threads linger, and none is inherited across fork().
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(function, items))


def stack_images(
    batch: Sequence[Sequence[torch.Tensor]],
    max_num_tiles: int,
    tile_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack per-sample lists of tiled images into one zero-padded tensor.

    Args:
        batch: ``B`` lists (one per sample, possibly empty) of tiles tensors
            ``[n_tiles, 3, S, S]`` as returned by :class:`ImageProcessor`, all float32 or
            all uint8.
        max_num_tiles: tile slots per image (the processor's ``max_num_tiles``).
        tile_size: S; only needed when the batch holds no image at all.
        dtype: of the result (float32 or uint8) when the batch holds no image; else uint8
            for uint8 tiles, float32 for float ones.

    Returns:
        ``images``: float32 or uint8 ``[B, N_max, max_num_tiles, 3, S, S]``, exact zeros
        for absent tiles and images; ``num_tiles``: int64 ``[B, N_max]``, 0 for absent
        images. ``N_max = max(1, longest list)`` so text-only batches still have valid
        shapes.
    """
    shapes = {tuple(t.shape[1:]) for sample in batch for t in sample}
    if len(shapes) > 1:
        raise ValueError(f"all tiles must share one shape [3, S, S], got {sorted(shapes)}")
    dtypes = {t.dtype for sample in batch for t in sample}
    if torch.uint8 in dtypes and len(dtypes) > 1:
        # A silent cast would turn uint8 pixels into unnormalised floats (or back).
        raise ValueError(f"uint8 and float tiles in one batch: {sorted(map(str, dtypes))}")
    if dtypes:  # float tiles of any precision are stored as float32, as before
        dtype = torch.uint8 if torch.uint8 in dtypes else torch.float32
    if shapes:
        channels, size, size_w = shapes.pop()
        if channels != 3 or size != size_w or (tile_size is not None and size != tile_size):
            raise ValueError(
                f"tiles must be [n, 3, S, S] (S={tile_size}), got [n, {channels}, {size}, {size_w}]"
            )
    elif tile_size is None:
        raise ValueError("the batch holds no image: pass tile_size to build empty image slots")
    else:
        size = tile_size
    n_max = max([1] + [len(sample) for sample in batch])
    # np.empty (huge-page backed, see ImageProcessor.collate) and zero only what is absent.
    np_dtype = np.uint8 if dtype == torch.uint8 else np.float32
    images = torch.from_numpy(np.empty((len(batch), n_max, max_num_tiles, 3, size, size), dtype=np_dtype))
    num_tiles = torch.zeros((len(batch), n_max), dtype=torch.long)
    for i, sample in enumerate(batch):
        for j, tiles in enumerate(sample):
            n = tiles.shape[0]
            if not 1 <= n <= max_num_tiles:
                raise ValueError(f"image {j} of sample {i} has {n} tiles, expected 1..{max_num_tiles}")
            images[i, j, :n] = tiles
            images[i, j, n:] = 0
            num_tiles[i, j] = n
        images[i, len(sample) :] = 0
    return images, num_tiles


def stack_aspect_ratios(batch: Sequence[Sequence[tuple[int, int]]], absent: int = 1) -> torch.Tensor:
    """Pack per-sample lists of ``(tiles_h, tiles_w)`` grids.

    Returns:
        int64 ``[B, N_max, 2]``; absent images get ``(absent, absent)``: ``(1, 1)`` by
        default (Meta's padding convention, which keeps embedding lookups in range; the
        LLaVA modality's image sizes use ``(0, 0)``). ``N_max = max(1, longest list)``.
    """
    n_max = max([1] + [len(sample) for sample in batch])
    ratios = torch.full((len(batch), n_max, 2), absent, dtype=torch.long)
    for i, sample in enumerate(batch):
        for j, (tiles_h, tiles_w) in enumerate(sample):
            ratios[i, j, 0] = tiles_h
            ratios[i, j, 1] = tiles_w
    return ratios
