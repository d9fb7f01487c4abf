"""Image input for llama_vision: loading (:mod:`.image_io`) and tiling (:mod:`.tiling`).

Typical use::

    from llama_vision.data.image import ImageProcessor, load_image, stack_images

    processor = ImageProcessor(tile_size=560, max_num_tiles=4)
    tiles, (tiles_h, tiles_w) = processor(load_image("cat.jpg"))  # [n, 3, 560, 560]

    # uint8 tiles (4x smaller), normalised on the device to the same float32 values:
    processor = ImageProcessor(tile_size=560, max_num_tiles=4, output="uint8")
    tiles, grid = processor(load_image("cat.jpg"))  # uint8 [n, 3, 560, 560]
    pixels = processor.normalize(tiles[None].cuda(), torch.tensor([len(tiles)]))  # [1, n, 3, 560, 560]
"""

from .image_io import ImageLoadError, load_image, to_rgb
from .tiling import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    aspect_ratio_id,
    best_canvas,
    fit_to_canvas,
    normalization_table,
    normalize_tiles,
    stack_aspect_ratios,
    stack_images,
    supported_aspect_ratios,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageLoadError",
    "ImageProcessor",
    "aspect_ratio_id",
    "best_canvas",
    "fit_to_canvas",
    "load_image",
    "normalization_table",
    "normalize_tiles",
    "stack_aspect_ratios",
    "stack_images",
    "supported_aspect_ratios",
    "to_rgb",
]
