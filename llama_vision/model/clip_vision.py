"""CLIP and SigLIP vision towers as the LLaVA family uses them: one image -> the patch
features of a chosen layer. Single device, torch only (transformers / open_clip are read
by the converters in llama_vision/checkpoint/clip_vision.py, never imported here).

This is a different encoder family from our Meta ViT (model/vision.py): no tiles, no gated
global layers, and
- CLIP (OpenAI ViT-L/14-336 in LLaVA-1.5): biased q/k/v/out projections, QuickGELU
  (x * sigmoid(1.702 x)), a class token, a pre-layernorm ("pre_layrnorm" in transformers);
- SigLIP (ViT-SO400M/14-384 in Bunny / LLaVA-OneVision): a biased patch conv, no class
  token, no pre-layernorm, tanh-approximated GELU, eps 1e-6.

Shapes: pixel_values [N, 3, S, S] (S = image_size, already normalised by the caller) ->
features [N, L, width], with g = S // patch_size and
    CLIP   "default": L = g^2     (patch tokens; class token dropped, LLaVA's choice)
    CLIP   "full":    L = 1 + g^2 (class token first)
    SigLIP either:    L = g^2     (no class token to drop)

Layer selection mirrors transformers' `output_hidden_states=True` numbering exactly:
hidden_states[0] = the embeddings (CLIP: after the pre-layernorm), hidden_states[i] = the
output of block i (1-based), i = 1..layers; negative indices count from the end, so
feature_layer=-1 is the last block's output and -2 (LLaVA-1.5) the penultimate one.
Neither model puts its post-layernorm into hidden_states: CLIP applies it to the pooled
class token only, SigLIP to `last_hidden_state` (so SigLIP's `hidden_states[-1]` is NOT
its `last_hidden_state`). `post_layernorm=True` (only with the last layer selected) applies
`ln_post` to every token: SigLIP's `last_hidden_state`, or open_clip's normed tokens.

Unused layers: all `layers` blocks are built (so full checkpoints load strictly, key for
key) but forward stops after the selected one; the blocks after it and, unless
`post_layernorm`, `ln_post` never see data. `unused_parameter_names()` lists them so a
trainer can freeze them (DDP would otherwise wait for gradients that never come).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from dataclasses import replace as _dc_replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("clip", "siglip")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
FEATURE_SELECTS = ("default", "full")

# transformers' `hidden_act` names -> ours. "gelu_new" is the same tanh formula as
# "gelu_pytorch_tanh" written out in Python (equal to float rounding).
_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# Defaults of transformers' configs (a hub config.json stores only what differs from them).
_HF_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
# LlavaConfig's vision_config when a LLaVA config.json has none: CLIP ViT-L/14-336.
_LLAVA_DEFAULT_VISION = dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024, patch_size=14,
                             image_size=336, num_hidden_layers=24, num_attention_heads=16)
_HF_MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


@dataclass(frozen=True)
class ClipVisionConfig:
    """One CLIP / SigLIP vision tower and which of its features to return.

    kind: "clip" (class token, pre-layernorm, bias-free patch conv) or "siglip" (no class
        token, no pre-layernorm, biased patch conv).
    image_size, patch_size: square images of exactly image_size px (no position-embedding
        interpolation: another size is refused); g = image_size // patch_size patches a side
        (floor: SigLIP-SO400M/14 at 384 px has g = 27, its last 6 px rows/columns unread).
    width, layers, heads, mlp_dim: hidden size, number of blocks, attention heads,
        MLP intermediate size.
    act: "quick_gelu" (OpenAI CLIP), "gelu" (exact erf), "gelu_tanh" (SigLIP).
    feature_layer: index into transformers' hidden_states list (0 = embeddings, i = output
        of block i, negative from the end); -2 = LLaVA-1.5's penultimate layer.
    feature_select: "default" drops CLIP's class token (LLaVA's
        vision_feature_select_strategy); "full" keeps it. SigLIP has no class token: both
        return every patch token.
    post_layernorm: apply ln_post to the selected features; only allowed when the last
        layer is selected (see the module docstring).
    """

    kind: str = "clip"
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    feature_layer: int = -2
    feature_select: str = "default"
    post_layernorm: bool = False
    in_channels: int = 3

    def __post_init__(self):
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} not in {KINDS}")
        if self.act not in ACTIVATIONS:
            problems.append(f"act {self.act!r} not in {ACTIVATIONS}")
        if self.feature_select not in FEATURE_SELECTS:
            problems.append(f"feature_select {self.feature_select!r} not in {FEATURE_SELECTS}")
        if self.width % self.heads:
            problems.append(f"width {self.width} is not a multiple of heads {self.heads}")
        # No divisibility check: SigLIP-SO400M/14 runs at 384 px = 27 patches of 14 + 6 px
        # that its stride-14 conv never reads (g = floor(S / p), as transformers).
        if self.image_size < self.patch_size:
            problems.append(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if not -(self.layers + 1) <= self.feature_layer <= self.layers:
            problems.append(
                f"feature_layer {self.feature_layer} outside the {self.layers + 1} hidden states "
                f"[{-(self.layers + 1)}, {self.layers}]"
            )
        elif self.post_layernorm and self.selected_layer != self.layers:
            problems.append(
                f"post_layernorm=True needs the last layer selected (feature_layer -1 or {self.layers}), "
                f"not {self.feature_layer}: the post-layernorm follows the last block only"
            )
        if problems:
            raise ValueError("ClipVisionConfig: " + "; ".join(problems))

    # --- derived sizes --------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Patches per side, g."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def has_class_token(self) -> bool:
        return self.kind == "clip"

    @property
    def num_positions(self) -> int:
        """Rows of the position table: g^2 (+1 for CLIP's class token)."""
        return self.num_patches + int(self.has_class_token)

    @property
    def num_tokens(self) -> int:
        """L, the number of feature tokens forward returns per image."""
        keep_cls = self.has_class_token and self.feature_select == "full"
        return self.num_patches + int(keep_cls)

    @property
    def selected_layer(self) -> int:
        """feature_layer as a non-negative hidden-states index = number of blocks that run."""
        return self.feature_layer if self.feature_layer >= 0 else self.layers + 1 + self.feature_layer

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def replace(self, **changes) -> "ClipVisionConfig":
        return _dc_replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    # --- transformers configs ---------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any, **overrides) -> "ClipVisionConfig":
        """From a transformers config as a dict (or config object): a CLIPVisionConfig /
        SiglipVisionConfig, a CLIPConfig / SiglipConfig (its `vision_config`), or a LLaVA
        config (its `vision_config`, `vision_feature_layer` and
        `vision_feature_select_strategy`). Missing keys take transformers' defaults, as
        from_pretrained would. `overrides` replace any of our fields (e.g. feature_layer).

        SigLIP under LLaVA's "default" strategy is refused: transformers' LLaVA then drops
        token 0 even though SigLIP has no class token (a real patch), which this tower does
        not reproduce.
        """
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        select: dict[str, Any] = {}
        outer_type = d.get("model_type", "")
        wraps = "vision_config" in d or "vision_feature_layer" in d or "vision_feature_select_strategy" in d
        if wraps or outer_type not in ("", *_HF_MODEL_TYPES):  # a config holding a vision_config
            vision = d.get("vision_config")
            if vision is None:
                if outer_type not in ("llava", ""):
                    raise ValueError(f"{outer_type!r} config has no vision_config")
                vision = _LLAVA_DEFAULT_VISION
            vision = vision.to_dict() if hasattr(vision, "to_dict") else dict(vision)
            if outer_type not in ("clip", "siglip"):  # a LLaVA-style config: its selection applies
                layer = d.get("vision_feature_layer", -2)
                if not isinstance(layer, int):
                    raise ValueError(f"vision_feature_layer {layer!r}: several layers (concatenated) are not supported")
                select = {"feature_layer": layer, "feature_select": d.get("vision_feature_select_strategy", "default")}
            d = vision
        model_type = d.get("model_type", "clip_vision_model")
        if model_type not in _HF_MODEL_TYPES:
            raise ValueError(f"vision model_type {model_type!r} is not a CLIP or SigLIP vision tower {tuple(_HF_MODEL_TYPES)}")
        kind = _HF_MODEL_TYPES[model_type]
        v = {**_HF_DEFAULTS[kind], **{k: val for k, val in d.items() if val is not None}}
        act = v["hidden_act"]
        if act not in _HF_ACT:
            raise ValueError(f"hidden_act {act!r} not supported (one of {tuple(_HF_ACT)})")
        size, patch = v["image_size"], v["patch_size"]
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"image_size {size}: only square images are supported")
            size = size[0]
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise ValueError(f"patch_size {patch}: only square patches are supported")
            patch = patch[0]
        if kind == "siglip":
            if select.get("feature_select") == "default":
                raise ValueError(
                    "SigLIP vision tower under vision_feature_select_strategy='default': transformers' LLaVA "
                    "drops token 0, a real patch (SigLIP has no class token); use 'full'"
                )
            select.setdefault("feature_select", "full")
        fields = dict(
            kind=kind, image_size=int(size), patch_size=int(patch), width=v["hidden_size"], layers=v["num_hidden_layers"],
            heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"], act=_HF_ACT[act],
            layer_norm_eps=float(v["layer_norm_eps"]), in_channels=v["num_channels"], **select,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict:
        """The transformers CLIPVisionConfig / SiglipVisionConfig dict of this tower (the
        selection is LLaVA's business: see `to_hf_llava_selection`). SigLIP's attention-
        pooling head is not part of the tower: vision_use_head=False."""
        d = dict(
            model_type="clip_vision_model" if self.kind == "clip" else "siglip_vision_model",
            hidden_size=self.width, intermediate_size=self.mlp_dim, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_channels=self.in_channels, image_size=self.image_size,
            patch_size=self.patch_size, hidden_act=_ACT_TO_HF[self.act], layer_norm_eps=self.layer_norm_eps,
        )
        if self.kind == "siglip":
            d["vision_use_head"] = False
        return d

    def to_hf_llava_selection(self) -> dict:
        """LLaVA config keys for this selection (post_layernorm has no LLaVA equivalent)."""
        if self.post_layernorm:
            raise ValueError("post_layernorm=True has no transformers LLaVA equivalent (hidden_states are pre-post-LN)")
        return {"vision_feature_layer": self.feature_layer, "vision_feature_select_strategy": self.feature_select}


# LLaVA-1.5's tower: openai/clip-vit-large-patch14-336, penultimate layer, patch tokens.
CLIP_VIT_L_14_336 = ClipVisionConfig(
    kind="clip", image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096,
    act="quick_gelu", layer_norm_eps=1e-5, feature_layer=-2, feature_select="default",
)
# google/siglip-so400m-patch14-384 (27 blocks). Bunny and LLaVA-OneVision use the output of
# block 26 of 27, pre-post-LN: OneVision's checkpoints simply hold 26 blocks and select -1
# (from_hf_config on its config gives layers=26, feature_layer=-1: the same features); with
# all 27 blocks that is feature_layer=-2.
SIGLIP_SO400M_14_384 = ClipVisionConfig(
    kind="siglip", image_size=384, patch_size=14, width=1152, layers=27, heads=16, mlp_dim=4304,
    act="gelu_tanh", layer_norm_eps=1e-6, feature_layer=-2, feature_select="full",
)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation; its weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """SigLIP's GELU (transformers' "gelu_pytorch_tanh")."""
    return F.gelu(x, approximate="tanh")


def _activation(name: str):
    return {"quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh, "gelu": F.gelu}[name]


class ClipAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (both families train
    them; unlike our Meta ViT). x [N, L, W] -> [N, L, W]; no mask (every image is full)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = (p(x).view(n, length, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5, as both references
        return self.out_proj(out.transpose(1, 2).reshape(n, length, -1))


class ClipMLP(nn.Module):
    """fc1 -> activation -> fc2, both biased. [N, L, W] -> [N, L, W]."""

    def __init__(self, width: int, mlp_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.act_name = act
        self._act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self._act(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"act={self.act_name}"


class ClipBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = ClipAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg.width, cfg.mlp_dim, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ClipVisionTower(nn.Module):
    """CLIP / SigLIP ViT returning one layer's features (see the module docstring).

    Parameters (state-dict keys):
        patch_embed.weight [W, C, p, p] (+ .bias for SigLIP)  stride-p conv
        class_embedding [W]                                   CLIP only
        positional_embedding [num_positions, W]               learned, CLIP: class row first
        ln_pre.{weight,bias}                                  CLIP only
        blocks.N.{ln_1, attn.{q,k,v,out}_proj, ln_2, mlp.fc1, mlp.fc2}.{weight,bias}
        ln_post.{weight,bias}                                 see `post_layernorm`
    """

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.config = config
        w = config.width
        clip = config.kind == "clip"
        self.patch_embed = nn.Conv2d(config.in_channels, w, config.patch_size, stride=config.patch_size, bias=not clip)
        if clip:
            self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(config.num_positions, w))
        if clip:
            self.ln_pre = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(ClipBlock(config) for _ in range(config.layers))
        self.ln_post = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.checkpoint_activations = False  # recompute each block in backward (training the tower)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A plain random init (real towers load pretrained weights): transformers' CLIP
        scales for the embeddings, nn.Linear / LayerNorm defaults elsewhere."""
        w = self.config.width
        if hasattr(self, "class_embedding"):
            nn.init.normal_(self.class_embedding, std=w**-0.5)
        nn.init.normal_(self.positional_embedding, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, S, S] -> features [N, config.num_tokens, W] of the selected
        layer, in the dtype of the weights."""
        cfg = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != cfg.in_channels:
            raise ValueError(f"pixel_values must be [N, {cfg.in_channels}, H, W], got {list(pixel_values.shape)}")
        h, w = pixel_values.shape[-2:]
        if h != cfg.image_size or w != cfg.image_size:
            raise ValueError(
                f"image size {h}x{w} != the tower's {cfg.image_size}x{cfg.image_size}: its position embeddings "
                "are learned for that grid (interpolation is not supported); resize the images"
            )
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [N, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g^2, W], row-major patches as both references
        if cfg.has_class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # [N, 1 + g^2, W]
        x = x + self.positional_embedding.to(x.dtype)
        if cfg.has_class_token:
            x = self.ln_pre(x)  # hidden_states[0] is taken after it (transformers and open_clip)
        for block in self.blocks[: cfg.selected_layer]:  # later blocks would be wasted work
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if cfg.post_layernorm:
            x = self.ln_post(x)
        if cfg.has_class_token and cfg.feature_select == "default":
            x = x[:, 1:]  # LLaVA drops the class token
        return x

    @property
    def num_tokens(self) -> int:
        """L, feature tokens per image (what a LLaVA projector receives)."""
        return self.config.num_tokens

    @property
    def width(self) -> int:
        """The feature width (the projector's input size)."""
        return self.config.width

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def block_modules(self) -> list[nn.Module]:
        """The transformer blocks, in the order forward runs them (all `layers`, the unused
        ones after the selected layer too): the pieces a wrapper may treat one at a time
        (training.parallelize: one FSDP unit each). Describes the structure only."""
        return list(self.blocks)

    def unused_parameter_names(self) -> list[str]:
        """Parameters forward never reads under this config (blocks after the selected layer,
        ln_post without post_layernorm): kept for strict checkpoint loading, to be frozen."""
        cfg = self.config
        unused = [f"blocks.{i}." for i in range(cfg.selected_layer, cfg.layers)]
        if not cfg.post_layernorm:
            unused.append("ln_post.")
        return [n for n, _ in self.named_parameters() if n.startswith(tuple(unused))]

    def extra_repr(self) -> str:
        c = self.config
        return (f"kind={c.kind}, image_size={c.image_size}, patch_size={c.patch_size}, feature_layer={c.feature_layer} "
                f"(runs {c.selected_layer}/{c.layers} blocks), feature_select={c.feature_select}, tokens={c.num_tokens}")


__all__ = [
    "CLIP_VIT_L_14_336",
    "SIGLIP_SO400M_14_384",
    "ClipVisionConfig",
    "ClipVisionTower",
]
