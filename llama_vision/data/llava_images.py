"""Images for the LLaVA projector modality (llama_vision.model.llava), behind the interface
the datasets use for Meta's tiler (`ImageProcessor`):

    processor = LlavaImageProcessor.for_params(model.args.llava)
    pixels, (height, width) = processor(load_image("cat.jpg"))   # float32 [C, 3, S, S]
    processor.tokens_per_item((height, width))                   # its placeholders in the prompt

Without AnyRes an image is one S x S crop, LLaVA-1.5's way: `square="pad"` pads it to a
square with the mean colour first (LLaVA's `expand2square`, what its training used),
`"crop"` resizes the short side to S and centre-crops (transformers' CLIPImageProcessor),
`"resize"` resizes to S x S as it is (OneVision's video frames: `for_video_params`);
then bicubic to S x S and CLIP / SigLIP normalisation. With AnyRes: the overview and the
grid crops of llama_vision.data.anyres (equal to transformers' PIL processors).

Unlike Meta's tiles, a LLaVA image takes many placeholders in the prompt: the datasets
expand each `<|image|>` to `tokens_per_item(size)` of them (`datasets.expand_images`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .anyres import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, AnyResConfig, preprocess_anyres, to_rgb_array

__all__ = ["LlavaImageProcessor"]


class LlavaImageProcessor:
    """See the module docstring. `max_num_tiles`: the most crops an image gives (1, or
    AnyRes' 1 + the largest grid), what the collator pads to."""

    output = "float32"

    def __init__(self, image_size: int, num_tokens: int, *, anyres: AnyResConfig | None = None,
                 image_newline: bool = False, square: str = "pad",
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD):
        if square not in ("pad", "crop", "resize"):
            raise ValueError(f"square must be 'pad' (LLaVA's expand2square), 'crop' (resize + centre crop) or 'resize' "
                             f"(to S x S as it is), got {square!r}")
        if anyres is not None and anyres.crop_size != image_size:
            raise ValueError(f"AnyRes crop_size {anyres.crop_size} != the tower's image size {image_size}")
        self.image_size, self.num_tokens, self.anyres = image_size, num_tokens, anyres
        self.image_newline, self.square = image_newline, square
        self.mean = np.asarray(anyres.image_mean if anyres else image_mean, dtype=np.float32)
        self.std = np.asarray(anyres.image_std if anyres else image_std, dtype=np.float32)
        if anyres is None:
            self.max_num_tiles = 1
        else:
            side = anyres.crop_size
            self.max_num_tiles = 1 + max((h // side) * (w // side) for h, w in anyres.grid_pinpoints)

    @classmethod
    def for_params(cls, llava: dict, **kw: Any) -> "LlavaImageProcessor":
        """The processor of a model's params.json `llava` entry (ModelArgs.llava)."""
        from llama_vision.model.llava import LlavaConfig

        config, tower = LlavaConfig.from_params(llava)
        mean, std = _tower_normalisation(tower)
        return cls(tower.image_size, config.image_tokens(tower), anyres=config.anyres, image_newline=config.image_newline,
                   image_mean=mean, image_std=std, **kw)

    @classmethod
    def for_video_params(cls, llava: dict) -> "LlavaImageProcessor":
        """The per-frame processor of the projector video modality (`llava: {video: ...}`):
        one S x S crop per frame, resized as it is (no AnyRes, no padding: OneVision's video
        processor), the tower's normalisation (SigLIP: 0.5, else CLIP's; AnyRes' if set)."""
        from llama_vision.model.llava import LlavaConfig

        config, tower = LlavaConfig.from_params(llava)
        anyres = config.anyres
        mean, std = (anyres.image_mean, anyres.image_std) if anyres is not None else _tower_normalisation(tower)
        return cls(tower.image_size, tower.num_tokens, square="resize", image_mean=mean, image_std=std)

    def tokens_per_item(self, image_size: Sequence[int]) -> int:
        if self.anyres is None:
            return self.num_tokens
        return self.anyres.num_image_tokens(image_size, image_newline=self.image_newline)

    def __call__(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        rgb = to_rgb_array(image)
        height, width = rgb.shape[:2]
        if height < 1 or width < 1:
            raise ValueError(f"image of size {width}x{height}")
        if self.anyres is not None:
            return preprocess_anyres(rgb, self.anyres).pixel_values, (height, width)
        pil = Image.fromarray(rgb)
        side = self.image_size
        if self.square == "pad":
            canvas = Image.new("RGB", (max(height, width),) * 2, tuple(int(round(m * 255)) for m in self.mean))
            canvas.paste(pil, ((max(height, width) - width) // 2, (max(height, width) - height) // 2))
            pil = canvas
        elif self.square == "crop":
            scale = side / min(height, width)
            pil = pil.resize((max(side, round(width * scale)), max(side, round(height * scale))), Image.BICUBIC)
            left, top = (pil.width - side) // 2, (pil.height - side) // 2
            pil = pil.crop((left, top, left + side, top + side))
        pixels = np.asarray(pil.resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
        pixels = (pixels - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None], (height, width)

    def __repr__(self) -> str:
        layout = f"anyres={len(self.anyres.grid_pinpoints)} pinpoints" if self.anyres else f"square={self.square!r}"
        return f"LlavaImageProcessor(image_size={self.image_size}, tokens={self.num_tokens}, {layout})"


def _tower_normalisation(tower) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) of a ClipVisionConfig's pixels: SigLIP 0.5 / 0.5, CLIP OpenAI's."""
    return ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if tower.kind == "siglip" else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
