"""Initialise the image encoder from an OpenCLIP ViT (the paper's contrastively trained
ViT-H/14 starting point).

OpenCLIP `VisionTransformer` keys -> Meta `vision_encoder` keys:

    conv1.weight [W, C, p, p]           -> conv1._linear.weight [W, C*p*p] (same flattening)
    class_embedding, positional_embedding, ln_pre, ln_post   -> same names
    transformer.resblocks.N.attn.in_proj_weight [3W, W]      -> attn.wq / wk / wv
    transformer.resblocks.N.attn.out_proj.weight             -> attn.wo
    transformer.resblocks.N.{ln_1, ln_2, mlp.c_fc, mlp.c_proj}  -> same names

Biases. Meta's image attention has NO biases (q, k, v, o); OpenCLIP's
`nn.MultiheadAttention` has them (LAION's ViT-H-14 trained them, so they are non-zero):
- the key bias is dropped EXACTLY: it adds q.b_k to every score of a query, a constant that
  softmax removes;
- the query bias, value bias and out_proj bias change the function and cannot be folded
  into Meta's bias-free layers (the value/out biases add a constant to the residual stream
  BEFORE ln_2). They are an error unless `allow_lossy=True`, which drops them with a warning
  and lists them (max |value|) in the report: the encoder is then an approximation of the
  OpenCLIP one, to be recovered by training (the paper trains the encoder in stage 1).
LayerScale (`ls_1/ls_2.gamma`, absent in ViT-H-14) is folded exactly into wo / c_proj.
`proj` (the CLIP embedding head) is not used: Meta takes pre-projection features.

Not in the state dict, hence the caller's responsibility: the number of heads
(`args.vision_heads`; ViT-H-14: 1280 / head_width 80 = 16) and the activation (exact GELU
as in ViT-H-14, not OpenAI's QuickGELU).

Left to the model (reported as `fresh`): the 8 gated global layers, the tile position
embeddings and the tile-aware positional embedding (synthesised from the local one by the
encoder's load hook, which also resizes a 224-px table to the model's tile size). All
their gates are set to 0, so the fresh parts are no-ops and the encoder computes the
OpenCLIP transformer (up to Meta's pad-to-multiple-of-8 quirk, see model/vision.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from llama_vision.model.args import ModelArgs

Tensor = torch.Tensor

_DIRECT_TOP = ("class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias")
_DIRECT_BLOCK = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias")
_UNUSED_PREFIXES = ("proj", "attn_pool", "attn_pool_contrastive.", "ln_post_pool")
_FRESH_PREFIXES = ("global_transformer.", "pre_tile_pos_embed.", "post_tile_pos_embed.", "gated_positional_embedding")


@dataclass
class OpenClipReport:
    converted: list[str] = field(default_factory=list)  # Meta keys written
    dropped_exact: list[str] = field(default_factory=list)  # OpenCLIP keys removed without changing the function
    dropped_lossy: dict[str, float] = field(default_factory=dict)  # key -> max |value| of dropped non-zero terms
    unused: list[str] = field(default_factory=list)  # OpenCLIP keys Meta's encoder has no use for
    fresh: list[str] = field(default_factory=list)  # Meta keys left to the model's initialisation


def vision_state_dict_from_openclip(
    openclip_state: Mapping[str, Tensor], args: ModelArgs, *, allow_lossy: bool = False
) -> tuple[dict[str, Tensor], OpenClipReport]:
    """OpenCLIP visual state dict (or a whole CLIP state dict, `visual.` keys are taken) ->
    (Meta `vision_encoder` state dict without the fresh parts, report)."""
    sd = dict(openclip_state)
    report = OpenClipReport()
    if any(k.startswith("visual.") for k in sd):
        report.unused += sorted(k for k in sd if not k.startswith("visual."))
        sd = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
    out: dict[str, Tensor] = {}
    lossy: dict[str, float] = {}

    conv = _take(sd, "conv1.weight")
    w, c, p, _ = conv.shape
    problems = []
    if w != args.vision_width:
        problems.append(f"width {w} != vision_width {args.vision_width}")
    if p != args.vision_patch_size or c != args.vision_in_channels:
        problems.append(f"patch {p} x {c} channels != vision_patch_size {args.vision_patch_size} x {args.vision_in_channels}")
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    if n_blocks != args.vision_layers:
        problems.append(f"{n_blocks} transformer blocks != vision_layers {args.vision_layers}")
    if problems:
        raise ValueError("OpenCLIP model does not fit the encoder: " + "; ".join(problems))
    out["conv1._linear.weight"] = conv.reshape(w, c * p * p)
    if "conv1.bias" in sd:
        raise ValueError("OpenCLIP conv1 has a bias; Meta's patch embedding has none")
    if "ln_pre.weight" not in sd:  # no_ln_pre=True models: an identity LayerNorm is not exact
        raise ValueError("OpenCLIP model has no ln_pre; Meta's encoder always applies one")
    for key in _DIRECT_TOP:
        out[key] = _take(sd, key)

    for i in range(n_blocks):
        src, dst = f"transformer.resblocks.{i}.", f"transformer.resblocks.{i}."
        wq, wk, wv = _take(sd, src + "attn.in_proj_weight").chunk(3, dim=0)
        out[dst + "attn.wq.weight"], out[dst + "attn.wk.weight"], out[dst + "attn.wv.weight"] = wq, wk, wv
        wo = _take(sd, src + "attn.out_proj.weight")
        c_proj_w, c_proj_b = _take(sd, src + "mlp.c_proj.weight"), _take(sd, src + "mlp.c_proj.bias")
        if src + "ls_1.gamma" in sd:  # LayerScale: gamma * (W x) == (gamma[:, None] * W) x
            wo = wo * sd.pop(src + "ls_1.gamma")[:, None]
            report.dropped_exact.append(src + "ls_1.gamma (folded into attn.wo)")
        if src + "ls_2.gamma" in sd:
            gamma = sd.pop(src + "ls_2.gamma")
            c_proj_w, c_proj_b = c_proj_w * gamma[:, None], c_proj_b * gamma
            report.dropped_exact.append(src + "ls_2.gamma (folded into mlp.c_proj)")
        out[dst + "attn.wo.weight"] = wo
        out[dst + "mlp.c_proj.weight"], out[dst + "mlp.c_proj.bias"] = c_proj_w, c_proj_b
        for key in _DIRECT_BLOCK:
            out[dst + key] = _take(sd, src + key)
        if src + "attn.in_proj_bias" in sd:
            bq, bk, bv = sd.pop(src + "attn.in_proj_bias").chunk(3)
            report.dropped_exact.append(src + "attn.in_proj_bias[k] (softmax-invariant)")
            for name, b in (("in_proj_bias[q]", bq), ("in_proj_bias[v]", bv)):
                if b.abs().max() > 0:
                    lossy[src + "attn." + name] = float(b.abs().max())
                else:
                    report.dropped_exact.append(src + "attn." + name + " (zero)")
        if src + "attn.out_proj.bias" in sd:
            b = sd.pop(src + "attn.out_proj.bias")
            if b.abs().max() > 0:
                lossy[src + "attn.out_proj.bias"] = float(b.abs().max())
            else:
                report.dropped_exact.append(src + "attn.out_proj.bias (zero)")

    report.unused += sorted(k for k in sd if k.startswith(_UNUSED_PREFIXES))
    unknown = sorted(k for k in sd if not k.startswith(_UNUSED_PREFIXES))
    if unknown:
        raise ValueError(f"OpenCLIP keys this converter does not understand (custom block?): {unknown[:20]}")
    if lossy:
        detail = ", ".join(f"{k} (max |b| {v:.3g})" for k, v in sorted(lossy.items())[:8])
        msg = (
            f"{len(lossy)} non-zero attention bias(es) have no counterpart in Meta's bias-free image attention "
            f"and change the encoder's output if dropped: {detail}{' ...' if len(lossy) > 8 else ''}"
        )
        if not allow_lossy:
            raise ValueError(msg + "; pass allow_lossy=True to drop them (then train the encoder to recover)")
        warnings.warn(msg + "; dropped (allow_lossy=True)", stacklevel=2)
    report.dropped_lossy = lossy
    report.converted = sorted(out)
    return out, report


def init_vision_from_openclip(model: nn.Module, openclip_state: Mapping[str, Tensor], *, allow_lossy: bool = False) -> OpenClipReport:
    """Load an OpenCLIP ViT into `model.vision_model.vision_encoder` (TP=1) and set every
    gate of the fresh parts to 0 (see the module docstring). Returns the report."""
    encoder = model.vision_model.vision_encoder
    state, report = vision_state_dict_from_openclip(openclip_state, model.args, allow_lossy=allow_lossy)
    result = encoder.load_state_dict(state, strict=False)  # the load hook resizes / synthesises
    not_fresh = [k for k in result.missing_keys if not k.startswith(_FRESH_PREFIXES)]
    if not_fresh or result.unexpected_keys:
        raise RuntimeError(f"OpenCLIP conversion incomplete: missing {not_fresh}, unexpected {result.unexpected_keys}")
    report.fresh = sorted(result.missing_keys)
    with torch.no_grad():
        encoder.gated_positional_embedding_gate.zero_()
        encoder.pre_tile_pos_embed.gate.zero_()
        encoder.post_tile_pos_embed.gate.zero_()
        for block in encoder.global_transformer.resblocks:
            block.gate_attn.zero_()
            block.gate_ffn.zero_()
    return report


def _take(sd: dict, key: str) -> Tensor:
    if key not in sd:
        raise KeyError(f"OpenCLIP state dict lacks {key}")
    return sd.pop(key)
