"""The LLaVA family as a projector modality: a CLIP/SigLIP tower, a projector, early fusion.

    image -> tower (features of one layer, class token dropped) -> projector -> tokens
    prompt: "<|image|>" x tokens_per_item(image) ... text        (one placeholder per token)
    decoder input: the projector's tokens in the placeholders' places (embeds_mask)

LLaVA (CLIP ViT-L/14 + a linear projection), LLaVA-1.5 (`mlp2x_gelu`: Linear, GELU,
Linear), LLaVA-NeXT / OneVision (AnyRes: an overview plus a grid of crops, features
unpadded to the image's aspect ratio, a learned `image_newline` after every row, optional
AnyRes-Max pooling; llama_vision.data.anyres) and Bunny / Carrot (SigLIP + MLP) differ in
the tower, the projector and the layout of the features only: one `LlavaVisionModel`
holds them (`vision_encoder`: the tower, `projector`, `image_newline`).

`add_llava_modality(model, tower, config)` registers it through the modality API with
fusion "projector" (no adapter blocks; llama_vision.model.modality). On a trunk built with
`vision_num_cross_attention_layers: 0` it is the model's image modality: it sits at
`model.vision_model`, so the trainability groups read as for LLaVA's stages ("vision" =
the tower, "adapters" = projector + image_newline: `trainable: {vision: false, adapters:
true}` is LLaVA's pretraining). On a cross-attention model it is one more modality under
its own name and attribute (`<name>_encoder`), trained as its own group; rows without its
placeholder run exactly as before (tests/test_llava.py).

Inputs of the modality: `(pixel_values [B, N, C, 3, H, W], image_sizes [B, N, 2])`: per
row N image slots, each with C crops (1 without AnyRes; AnyRes: the overview first, then
row-major crops, unused crops zero), image_sizes (height, width) of the original image,
(0, 0) for an empty slot. The tower and projector run once over every real crop of the
batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .modality import MediaTokens, Modality

__all__ = ["LlavaConfig", "LlavaVisionModel", "PROJECTORS", "Projector", "add_llava_from_params", "add_llava_modality"]

PROJECTORS = ("linear", "mlp2x_gelu")


class Projector(nn.Module):
    """Vision features [..., C] -> text-width tokens [..., D]: `linear` (LLaVA: one Linear)
    or `mlp2x_gelu` (LLaVA-1.5: Linear, exact GELU, Linear; biases). Names as
    transformers' LlavaMultiModalProjector (linear_1, linear_2)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp2x_gelu"):
        super().__init__()
        if kind not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {kind!r}")
        self.kind = kind
        self.linear_1 = nn.Linear(in_dim, out_dim)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return self.linear_2(self.act(x)) if self.kind == "mlp2x_gelu" else x


@dataclass
class LlavaConfig:
    """The projector image modality of a model (see the module docstring)."""

    projector: str = "mlp2x_gelu"
    """`linear` (LLaVA) or `mlp2x_gelu` (LLaVA-1.5, NeXT, OneVision, Bunny)."""
    anyres: Any = None
    """A llama_vision.data.anyres.AnyResConfig (LLaVA-NeXT / OneVision layout), or None:
    one crop per image, its tower tokens as they are (LLaVA-1.5)."""
    image_newline: bool = False
    """A learned vector after every row of grid features (LLaVA-NeXT; AnyRes only)."""
    name: str = "image"
    """The modality's name (media_inputs key). A model with Meta's cross-attention image
    modality needs another one."""
    token_id: int | None = None
    """Its placeholder id (a learnable-row id >= vocab_size); default: `<|image|>`'s on a
    trunk without Meta's image modality, else the first free learnable row."""

    hf_image_token_index: int | None = None
    """The `<image>` id of the transformers LLaVA this model was imported from (a row of
    its vocabulary), reused when it is exported back."""

    def to_params(self, tower_config) -> dict:
        """The params.json `llava` entry (JSON-ready) of this modality with its tower's
        ClipVisionConfig: what `build_model` re-creates it from."""
        anyres = None
        if self.anyres is not None:
            a = self.anyres
            anyres = {"grid_pinpoints": [list(p) for p in a.grid_pinpoints], "crop_size": a.crop_size,
                      "image_mean": list(a.image_mean), "image_std": list(a.image_std), "resample": a.resample,
                      "rescale_factor": a.rescale_factor, "patches_per_side": a.patches_per_side,
                      "anyres_max": a.anyres_max, "square_for_multi_image": a.square_for_multi_image}
        return {"tower": tower_config.to_dict(), "projector": self.projector, "anyres": anyres,
                "image_newline": self.image_newline, "name": self.name, "token_id": self.token_id,
                "hf_image_token_index": self.hf_image_token_index}

    @classmethod
    def from_params(cls, params: dict):
        """-> (LlavaConfig, ClipVisionConfig) of a params.json `llava` entry."""
        from llama_vision.data.anyres import AnyResConfig

        from .clip_vision import ClipVisionConfig

        unknown = sorted(set(params) - {"tower", "projector", "anyres", "image_newline", "name", "token_id",
                                        "hf_image_token_index"})
        if unknown or "tower" not in params:
            raise ValueError(f"params `llava`: unknown keys {unknown}" if unknown else "params `llava` needs `tower`")
        anyres = params.get("anyres")
        config = cls(projector=params.get("projector", "mlp2x_gelu"),
                     anyres=AnyResConfig(**anyres) if anyres else None,
                     image_newline=bool(params.get("image_newline", False)), name=params.get("name", "image"),
                     token_id=params.get("token_id"), hf_image_token_index=params.get("hf_image_token_index"))
        return config, ClipVisionConfig(**params["tower"])


class LlavaVisionModel(nn.Module):
    """tower + projector (+ image_newline): (pixel_values [B, N, C, 3, H, W], image_sizes
    [B, N, 2]) -> MediaTokens [B, N, T, D] (T: the most tokens an image of the batch has;
    `valid` marks each image's own)."""

    def __init__(self, tower: nn.Module, tower_dim: int, text_dim: int, config: LlavaConfig):
        super().__init__()
        if config.image_newline and config.anyres is None:
            raise ValueError("image_newline is LLaVA-NeXT's AnyRes row separator: set anyres too")
        self.config = config
        self.vision_encoder = tower
        self.projector = Projector(tower_dim, text_dim, config.projector)
        self.image_newline = nn.Parameter(torch.zeros(text_dim)) if config.image_newline else None

    def block_modules(self) -> list[nn.Module]:
        """The pieces forward runs one after another over every crop of the batch: the
        tower, then the projector (image_newline, if any, stays with this module). What a
        wrapper may treat one at a time (training.parallelize: one FSDP unit each, the
        tower's own `block_modules()` inside it). Describes the structure only."""
        return [self.vision_encoder, self.projector]

    def tokens_per_item(self, image_size: tuple[int, int] | None = None) -> int:
        """Placeholders one image takes in the prompt: the tower's tokens per crop without
        AnyRes; with it, what `pack_anyres_features` gives for an image of `image_size`
        (height, width)."""
        anyres = self.config.anyres
        if anyres is None:
            return self.vision_encoder.num_tokens
        if image_size is None:
            raise ValueError("AnyRes: the number of an image's tokens depends on its size: pass image_size=(h, w)")
        return anyres.num_image_tokens(image_size, image_newline=self.image_newline is not None)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> MediaTokens:
        from llama_vision.data.anyres import num_anyres_crops, pack_anyres_features

        if pixel_values.dim() != 6 or image_sizes.shape != pixel_values.shape[:2] + (2,):
            raise ValueError(f"expected pixel_values [B, N, C, 3, H, W] and image_sizes [B, N, 2], got "
                             f"{list(pixel_values.shape)} and {list(image_sizes.shape)}")
        b, n = pixel_values.shape[:2]
        sizes = image_sizes.tolist()
        anyres = self.config.anyres
        slots, crops = [], []  # the real images (b, i, size) and how many crops each takes
        for row in range(b):
            for i in range(n):
                h, w = sizes[row][i]
                if h > 0 and w > 0:
                    slots.append((row, i, (h, w)))
                    crops.append(1 if anyres is None else num_anyres_crops((h, w), anyres.grid_pinpoints, anyres.crop_size))
        dim = self.projector.linear_1.out_features
        if not slots:
            empty = pixel_values.new_zeros(b, n, 0, dim)
            return MediaTokens(empty, torch.zeros(b, n, 0, dtype=torch.bool, device=pixel_values.device))
        batch = torch.cat([pixel_values[row, i, :c] for (row, i, _), c in zip(slots, crops)])  # [M, 3, H, W]
        tokens = self.projector(self.vision_encoder(batch))  # [M, L, D]
        per_image = tokens.split(crops)
        if anyres is None:
            items = [t[0] for t in per_image]
        else:
            items = [pack_anyres_features(t, size, anyres.grid_pinpoints, anyres.crop_size, self.image_newline,
                                          anyres.anyres_max) for t, (_, _, size) in zip(per_image, slots)]
        longest = max(t.shape[0] for t in items)
        out = tokens.new_zeros(b, n, longest, dim)
        valid = torch.zeros(b, n, longest, dtype=torch.bool, device=tokens.device)
        for (row, i, _), t in zip(slots, items):
            out[row, i, : t.shape[0]] = t
            valid[row, i, : t.shape[0]] = True
        return MediaTokens(out, valid)


def add_llava_modality(model, tower: nn.Module, tower_dim: int, config: LlavaConfig | None = None) -> Modality:
    """Give `model` a LLaVA-style image modality (module docstring). `tower(pixels [M, 3,
    H, W]) -> [M, L, tower_dim]` with an attribute `num_tokens` = L (e.g.
    llama_vision.model.clip_vision.ClipVisionTower)."""
    config = config or LlavaConfig()
    args = model.args
    vision = LlavaVisionModel(tower, tower_dim, args.dim, config)
    ref = model.text_model.output.weight
    vision.to(device=ref.device, dtype=ref.dtype)
    if model.vision_model is None and config.name == "image":
        model.vision_model = vision  # LLaVA's layout: the groups "vision" (tower) and "adapters"
        token_id = args.image_token_id if config.token_id is None else config.token_id
        # (the learnable special-token rows are the image adapters' group, as in Meta's model)
        owned = ["vision_model.projector", "text_model.learnable_embedding"] + (
            ["vision_model.image_newline"] if config.image_newline else [])
        encoder, attr = None, None
    else:
        if config.name in model.modalities:
            raise ValueError(f"the model has a modality {config.name!r} already: name the LLaVA one otherwise (LlavaConfig.name)")
        taken = {m.token_id for m in model.modalities.values()}
        free = [t for t in range(args.vocab_size, args.vocab_size + args.n_learnable_embeddings) if t not in taken]
        token_id = config.token_id if config.token_id is not None else free[0]
        encoder, attr, owned = vision, f"{config.name}_encoder", None
    modality = model.add_modality(
        config.name, token_id=token_id, encode=lambda inputs: vision(*inputs), layers=[], encoder=encoder,
        encoder_attr=attr, trainable_modules=owned, own_placeholder=False, fusion="projector",
        tokens_per_item=vision.tokens_per_item,
    )
    tower_config = getattr(tower, "config", None)
    if hasattr(tower_config, "to_dict"):  # a ClipVisionTower: saved in params.json, re-added by build_model
        model.args.llava = config.to_params(tower_config)
    return modality


def add_llava_from_params(model, params: dict) -> Modality:
    """Re-create the modality a params.json `llava` entry describes (fresh weights)."""
    from .clip_vision import ClipVisionTower

    config, tower_config = LlavaConfig.from_params(params)
    return add_llava_modality(model, ClipVisionTower(tower_config), tower_config.width, config)
