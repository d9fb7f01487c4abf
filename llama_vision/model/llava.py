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

Video, LLaVA-OneVision's way (`add_llava_video_modality`, docs/llava.md "Video"): a second
projector modality "video" encoded by the same tower / projector / image_newline
(`LlavaVisionModel.forward(frames, frame_counts=...)`): each frame's token grid pooled
bilinearly to half its side (or, `pool: image`, as an image crop is: `pool_to`), a video's
frames concatenated, one image_newline after them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .modality import MediaTokens, Modality

__all__ = ["LlavaConfig", "LlavaVideoConfig", "LlavaVisionModel", "PROJECTORS", "Projector", "add_llava_from_params",
           "add_llava_modality", "add_llava_video_modality", "check_pool_side", "frame_tokens", "llava_frame_tokens",
           "pool_feature_grid", "pool_video_tokens"]

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
    pool_to: int | None = None
    """Without AnyRes: average-pool the tower's g x g feature grid to pool_to x pool_to
    tokens before the projector (g divisible by pool_to), so an image takes pool_to^2
    placeholders instead of g^2 (the CPU demo: 8 x 8 -> 2 x 2, a token per cell). None:
    every tower token, as LLaVA. transformers' LLaVA classes have no such option."""
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
        out = {"tower": tower_config.to_dict(), "projector": self.projector, "anyres": anyres,
               "image_newline": self.image_newline, "name": self.name, "token_id": self.token_id,
               "hf_image_token_index": self.hf_image_token_index}
        if self.pool_to is not None:  # only when set: params.json of earlier models unchanged
            out["pool_to"] = self.pool_to
        return out

    def image_tokens(self, tower_config) -> int:
        """Placeholders an image takes without AnyRes: the tower's tokens, or pool_to^2."""
        return tower_config.num_tokens if self.pool_to is None else self.pool_to**2

    @classmethod
    def from_params(cls, params: dict):
        """-> (LlavaConfig, ClipVisionConfig) of a params.json `llava` entry."""
        from llama_vision.data.anyres import AnyResConfig

        from .clip_vision import ClipVisionConfig

        unknown = sorted(set(params) - {"tower", "projector", "anyres", "image_newline", "name", "token_id",
                                        "hf_image_token_index", "video", "pool_to"})  # (video: LlavaVideoConfig's)
        if unknown or "tower" not in params:
            raise ValueError(f"params `llava`: unknown keys {unknown}" if unknown else "params `llava` needs `tower`")
        anyres = params.get("anyres")
        config = cls(projector=params.get("projector", "mlp2x_gelu"),
                     anyres=AnyResConfig(**anyres) if anyres else None,
                     image_newline=bool(params.get("image_newline", False)), name=params.get("name", "image"),
                     token_id=params.get("token_id"), hf_image_token_index=params.get("hf_image_token_index"),
                     pool_to=params.get("pool_to"))
        return config, ClipVisionConfig(**params["tower"])


class LlavaVisionModel(nn.Module):
    """tower + projector (+ image_newline): (pixel_values [B, N, C, 3, H, W], image_sizes
    [B, N, 2]) -> MediaTokens [B, N, T, D] (T: the most tokens an image of the batch has;
    `valid` marks each image's own)."""

    def __init__(self, tower: nn.Module, tower_dim: int, text_dim: int, config: LlavaConfig):
        super().__init__()
        if config.image_newline and config.anyres is None:
            raise ValueError("image_newline is LLaVA-NeXT's AnyRes row separator: set anyres too")
        if config.anyres is not None and config.anyres.patches_per_side**2 != tower.num_tokens:
            # (AnyRes lays each crop's features out as a P x P grid: P must be the tower's)
            raise ValueError(f"anyres.patches_per_side={config.anyres.patches_per_side} does not match the tower's "
                             f"{tower.num_tokens} tokens per crop (expected {math.isqrt(tower.num_tokens)} for a "
                             f"square grid)")
        if config.pool_to is not None:
            if config.anyres is not None:
                raise ValueError("pool_to pools one crop's grid; with AnyRes use anyres.anyres_max (OneVision's pooling)")
            check_pool_side(tower.num_tokens, config.pool_to, "pool_to")
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
            return self.config.image_tokens(self.vision_encoder)
        if image_size is None:
            raise ValueError("AnyRes: the number of an image's tokens depends on its size: pass image_size=(h, w)")
        return anyres.num_image_tokens(image_size, image_newline=self.image_newline is not None)

    def video_tokens_per_item(self, frames: int, pool: str = "bilinear2x") -> int:
        """Placeholders one video of `frames` frames takes (OneVision's layout): frames *
        the tokens a frame keeps after `pool` (`frame_tokens`), + 1 for the image_newline
        when the model has one."""
        per_frame = frame_tokens(self.vision_encoder.num_tokens, self.config.pool_to, pool)
        return int(frames) * per_frame + (1 if self.image_newline is not None else 0)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, *,
                frame_counts: torch.Tensor | None = None, video_pool: str = "bilinear2x") -> MediaTokens:
        """Images: (pixel_values [B, N, C, 3, H, W], image_sizes [B, N, 2]). Videos (the
        projector video modality, `add_llava_video_modality`): (frames [B, V, F, 3, H, W],
        frame_counts=[B, V]) -> MediaTokens [B, V, T, D] (one forward, so a wrapper's hooks
        on this module run for either), each frame pooled by `video_pool` (VIDEO_POOLS)."""
        if frame_counts is not None:
            return self._forward_video(pixel_values, frame_counts, video_pool)
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
        features = self.vision_encoder(batch)  # [M, L, C]
        if self.config.pool_to is not None:
            features = pool_feature_grid(features, self.config.pool_to)  # [M, pool_to^2, C]
        tokens = self.projector(features)  # [M, L, D]
        per_image = tokens.split(crops)
        if anyres is None:
            items = [t[0] for t in per_image]
        else:
            items = [pack_anyres_features(t, size, anyres.grid_pinpoints, anyres.crop_size, self.image_newline,
                                          anyres.anyres_max) for t, (_, _, size) in zip(per_image, slots)]
        return _padded(items, [(row, i) for row, i, _ in slots], b, n)

    def _forward_video(self, frames: torch.Tensor, frame_counts: torch.Tensor, pool: str) -> MediaTokens:
        """LLaVA-OneVision's `get_video_features`: every real frame through the tower and the
        projector (as one batch), each frame's g x g grid bilinearly pooled to ceil(g/2)^2
        tokens (pool "bilinear2x"; "image": a frame is pooled as an image crop is, by
        `pool_to` before the projector), a video's frames concatenated, then one
        image_newline (if the model has it)."""
        if frames.dim() != 6 or tuple(frame_counts.shape) != tuple(frames.shape[:2]):
            raise ValueError(f"expected frames [B, V, F, 3, H, W] and frame_counts [B, V], got {list(frames.shape)} "
                             f"and {list(frame_counts.shape)}")
        b, v, f = frames.shape[:3]
        counts = frame_counts.tolist()
        slots = [(row, i, int(counts[row][i])) for row in range(b) for i in range(v) if counts[row][i] > 0]
        for row, i, c in slots:
            if c > f:
                raise ValueError(f"video ({row}, {i}) has {c} frames but only {f} frame slots were given")
        dim = self.projector.linear_1.out_features
        if not slots:
            empty = frames.new_zeros(b, v, 0, dim)
            return MediaTokens(empty, torch.zeros(b, v, 0, dtype=torch.bool, device=frames.device))
        batch = torch.cat([frames[row, i, :c] for row, i, c in slots])  # [M, 3, H, W]: real frames only
        features = self.vision_encoder(batch)  # [M, g*g, C]
        if pool == "image":
            if self.config.pool_to is not None:
                features = pool_feature_grid(features, self.config.pool_to)
            tokens = self.projector(features)  # [M, pool_to^2 or g*g, D]: each frame as an image
        else:
            tokens = pool_video_tokens(self.projector(features))  # [M, p*p, D]
        items = []
        for t in tokens.split([c for _, _, c in slots]):
            t = t.reshape(-1, dim)
            if self.image_newline is not None:
                t = torch.cat([t, self.image_newline[None].to(t.dtype)])
            items.append(t)
        return _padded(items, [(row, i) for row, i, _ in slots], b, v)


def _padded(items: list[torch.Tensor], places: list[tuple[int, int]], b: int, n: int) -> MediaTokens:
    """Each item's tokens [L_k, D] at its (row, slot) of zero-padded MediaTokens [B, N, max L_k, D]
    (`valid` marks each item's own)."""
    longest = max(t.shape[0] for t in items)
    ref = items[0]
    out = ref.new_zeros(b, n, longest, ref.shape[-1])
    valid = torch.zeros(b, n, longest, dtype=torch.bool, device=ref.device)
    for (row, i), t in zip(places, items):
        out[row, i, : t.shape[0]] = t
        valid[row, i, : t.shape[0]] = True
    return MediaTokens(out, valid)


def check_pool_side(num_tokens: int, side: Any, key: str) -> None:
    """ValueError naming `key` unless `side` divides the square grid of `num_tokens` tokens
    (what `pool_feature_grid` can pool it to)."""
    g = math.isqrt(num_tokens)
    if g * g != num_tokens or not (isinstance(side, int) and 0 < side <= g and g % side == 0):
        raise ValueError(f"{key}={side!r} must divide the tower's {g} x {g} token grid ({num_tokens} tokens)")


def pool_feature_grid(features: torch.Tensor, side: int) -> torch.Tensor:
    """[M, g*g, C] row-major grid -> [M, side*side, C]: the mean of each (g/side)^2 block
    (`LlavaConfig.pool_to`)."""
    m, n, c = features.shape
    g = math.isqrt(n)
    grid = features.transpose(1, 2).reshape(m, c, g, g)
    return nn.functional.avg_pool2d(grid, g // side).flatten(2).transpose(1, 2)


def _grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"video pooling needs a square token grid per frame, the tower gives {num_tokens} tokens")
    return side


def pooled_tokens_per_frame(num_tokens: int) -> int:
    """Tokens a frame keeps after `pool_video_tokens`: a g x g grid (g^2 = num_tokens)
    pooled to ceil(g/2) x ceil(g/2)."""
    side = math.ceil(_grid_side(num_tokens) / 2)
    return side * side


def frame_tokens(num_tokens: int, pool_to: int | None, pool: str) -> int:
    """Tokens one video frame takes: `pooled_tokens_per_frame` for OneVision's
    "bilinear2x"; as many as an image for "image" (pool_to^2, or the tower's g*g)."""
    if pool == "image":
        return num_tokens if pool_to is None else pool_to**2
    return pooled_tokens_per_frame(num_tokens)


def llava_frame_tokens(llava: dict) -> int:
    """Tokens one video frame takes in a model with params.json `llava: {..., video: {...}}`."""
    config, tower = LlavaConfig.from_params(llava)
    return frame_tokens(tower.num_tokens, config.pool_to, (llava.get("video") or {}).get("pool", "bilinear2x"))


def pool_video_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[M, g*g, D] per-frame tokens -> [M, ceil(g/2)^2, D]: OneVision's `apply_pooling`
    (bilinear interpolation of the grid, align_corners=False)."""
    m, n, d = tokens.shape
    g = _grid_side(n)
    grid = tokens.view(m, g, g, d).permute(0, 3, 1, 2).contiguous()
    side = math.ceil(g / 2)
    pooled = nn.functional.interpolate(grid, size=[side, side], mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(m, side * side, d)


# bilinear2x: OneVision's. image: each frame pooled as an image of the model is (pool_to
# block means before the projector, or none), so a projector trained on images reads frames
# as it reads images (the CPU demo's video arm: 4 tokens per frame, one per cell).
VIDEO_POOLS = ("bilinear2x", "image")


@dataclass
class LlavaVideoConfig:
    """The projector video modality (LLaVA-OneVision's video path) of a LLaVA model: it
    reuses the image modality's tower, projector and image_newline (the same modules)."""

    pool: str = "bilinear2x"
    """Per-frame token pooling (VIDEO_POOLS): `bilinear2x` (OneVision: g x g -> ceil(g/2) x
    ceil(g/2) after the projector) or `image` (as the image modality pools a crop)."""
    num_frames: int = 8
    """Frames the input side samples uniformly per video (data, generation)."""
    name: str = "video"
    token_id: int | None = None
    """Its placeholder (a learnable row): default vocab_size + 1 (Meta's <|video|> row) if
    free, else the first free learnable row."""
    hf_video_token_index: int | None = None
    """The `<video>` id of the transformers OneVision model this was imported from."""

    def __post_init__(self) -> None:
        if self.pool not in VIDEO_POOLS:
            raise ValueError(f"video pool must be one of {VIDEO_POOLS}, got {self.pool!r}")
        if self.num_frames < 1:
            raise ValueError(f"video num_frames must be >= 1, got {self.num_frames}")

    def to_params(self) -> dict:
        return {"pool": self.pool, "num_frames": self.num_frames, "name": self.name, "token_id": self.token_id,
                "hf_video_token_index": self.hf_video_token_index}


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
    modality = add_llava_modality(model, ClipVisionTower(tower_config), tower_config.width, config)
    if params.get("video") is not None:
        add_llava_video_modality(model, LlavaVideoConfig(**params["video"]))
    return modality


def add_llava_video_modality(model, config: LlavaVideoConfig | None = None) -> Modality:
    """Give a LLaVA model (its projector image modality at `model.vision_model`) the
    projector video modality: inputs `(frames [B, V, F, 3, H, W], frame_counts [B, V])`
    (absent videos / frames zero, count 0), `tokens_per_item(frames)` placeholders per
    video. The image modality's tower, projector and image_newline encode it (they train
    as "vision" / "adapters"); it has no parameters of its own (its placeholder needs no
    input row: the video's tokens replace every placeholder). Saved in params.json as
    `llava: {video: {...}}`."""
    config = config or LlavaVideoConfig()
    vision = model.vision_model
    image = model.modalities.get("image")
    if not isinstance(vision, LlavaVisionModel) or image is None or image.fusion != "projector":
        raise ValueError("the projector video modality needs a LLaVA model (the projector image modality at vision_model)")
    if config.pool == "bilinear2x":
        _grid_side(vision.vision_encoder.num_tokens)
    args = model.args
    taken = {m.token_id for m in model.modalities.values()}
    if config.token_id is not None:
        token_id = config.token_id
    else:
        free = [t for t in range(args.vocab_size, args.vocab_size + args.n_learnable_embeddings) if t not in taken]
        if not free:
            raise ValueError("no free learnable row for the video placeholder (raise n_learnable_embeddings)")
        token_id = args.vocab_size + 1 if args.vocab_size + 1 in free else free[0]
    modality = model.add_modality(
        config.name, token_id=token_id, encode=lambda inputs: vision(inputs[0], frame_counts=inputs[1], video_pool=config.pool),
        layers=[], own_placeholder=False, fusion="projector",
        tokens_per_item=lambda frames: vision.video_tokens_per_item(frames, config.pool),
    )
    if args.llava is not None:
        args.llava = {**args.llava, "video": {**config.to_params(), "token_id": token_id}}
    return modality
