"""Meta <-> Hugging Face Mllama key layouts (state dicts and configs).

HF differences handled here: a merged decoder (n_layers + n_xattn layers, cross-attention
layer j at index schedule[j] + j, `schedule` = Meta's per-layer positions, any ascending
list: `ModelArgs.fusion_schedule`), q/k of self-attention permuted for rotate-half RoPE,
learnable special-token rows appended to `embed_tokens`, position/tile embeddings
precomputed per aspect-ratio id (from Meta's grid, or held per ratio as they are when
`ModelArgs.tile_embedding_layout == "per_aspect_ratio"`), the patch embedding as a conv
weight.
"""
from __future__ import annotations

import torch

from llama_vision.data.tiling import supported_aspect_ratios  # (tiles_h, tiles_w), HF's order
from llama_vision.model.args import ModelArgs, fusion_schedule
from llama_vision.model.vision import grid_from_per_ratio, per_ratio_from_grid, tile_table_rows

Tensor = torch.Tensor


# --- RoPE layouts --------------------------------------------------------------------------
def permute_to_rotate_half(w: Tensor, n_heads: int) -> Tensor:
    """Meta's interleaved-pair rows -> HF's rotate-half rows (per head)."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)

def permute_from_rotate_half(w: Tensor, n_heads: int) -> Tensor:
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)

# --- tile-indexed embeddings ----------------------------------------------------------------
def precompute_by_aspect_ratio(table: Tensor) -> Tensor:
    """Meta [T, T, P, W] -> HF [n_ratios + 1, T * P * W] (row 0 = padding, zeros)."""
    return per_ratio_from_grid(table).flatten(1)

def table_from_aspect_ratios(pre: Tensor, t: int, p: int, w: int) -> Tensor:
    """Inverse of `precompute_by_aspect_ratio`. Grid cells no supported ratio reaches (e.g.
    [2, 2] of a 4x4 table is reached, [3, 3] is not) are never read by a forward and come
    back as zeros. Exact only for tables that are the image of a grid (see
    `hf_io.grid_mismatch`); otherwise each cell keeps the last ratio's value."""
    return grid_from_per_ratio(pre.view(-1, t, p, w))

# --- layer index maps -----------------------------------------------------------------------
def hf_layer_indices(n_layers: int, schedule: list[int]) -> tuple[list[int], list[int]]:
    """HF merged-stack index of each Meta self-attention layer and cross-attention block.
    schedule[j] = the self-attention layer cross-attention block j runs before (ascending):
    block j sits at merged index schedule[j] + j, self layer i at i + #{j: schedule[j] <= i}."""
    cross = [layer + j for j, layer in enumerate(schedule)]
    self_idx = [i + sum(s <= i for s in schedule) for i in range(n_layers)]
    return self_idx, cross

def schedule_from_hf_cross_layers(cross_attention_layers, num_hidden_layers: int) -> list[int]:
    """HF `text_config.cross_attention_layers` (merged-stack indices) -> Meta's per-layer
    schedule (the inverse of `hf_layer_indices`): schedule[j] = sorted(cross)[j] - j. Our
    decoder (as Meta's) runs at most one cross-attention block before each self-attention
    layer and none after the last, so two adjacent cross-attention layers, or one at the
    top of the stack, are refused."""
    cross = sorted(int(c) for c in cross_attention_layers)
    where = f"HF text_config.cross_attention_layers {list(cross_attention_layers)}"
    if not cross:
        raise ValueError(f"{where}: an Mllama model needs at least one cross-attention layer")
    if len(set(cross)) != len(cross):
        raise ValueError(f"{where} repeats a layer index")
    bad = [c for c in cross if not 0 <= c < num_hidden_layers]
    if bad:
        raise ValueError(f"{where}: indices {bad} outside the {num_hidden_layers}-layer stack (0..{num_hidden_layers - 1})")
    n_layers = num_hidden_layers - len(cross)
    schedule = [c - j for j, c in enumerate(cross)]
    adjacent = [c for c, prev in zip(cross[1:], cross) if c == prev + 1]
    if adjacent:
        raise ValueError(
            f"{where}: cross-attention layers {adjacent} directly follow another cross-attention layer; this model "
            f"runs at most one cross-attention block before each self-attention layer (fusion_schedule must not repeat)"
        )
    if schedule[-1] >= n_layers:
        raise ValueError(f"{where}: cross-attention layer {cross[-1]} comes after the last self-attention layer; "
                         f"this model runs every cross-attention block before a self-attention layer")
    return schedule

_VISION_BLOCK = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "ln_1.weight": "input_layernorm.weight",
    "ln_1.bias": "input_layernorm.bias",
    "ln_2.weight": "post_attention_layernorm.weight",
    "ln_2.bias": "post_attention_layernorm.bias",
    "gate_attn": "gate_attn",
    "gate_ffn": "gate_ffn",
}
_TEXT_BLOCK = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_CROSS_BLOCK = {
    "attention.wq.weight": "cross_attn.q_proj.weight",
    "attention.wk.weight": "cross_attn.k_proj.weight",
    "attention.wv.weight": "cross_attn.v_proj.weight",
    "attention.wo.weight": "cross_attn.o_proj.weight",
    "attention.q_norm.weight": "cross_attn.q_norm.weight",
    "attention.k_norm.weight": "cross_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "gate_attn": "cross_attn_attn_gate",
    "gate_ffwd": "cross_attn_mlp_gate",
}
_VISION_TOP = {
    "class_embedding": "class_embedding",
    "positional_embedding": "gated_positional_embedding.embedding",
    "gated_positional_embedding_gate": "gated_positional_embedding.gate",
    "pre_tile_pos_embed.gate": "pre_tile_positional_embedding.gate",
    "post_tile_pos_embed.gate": "post_tile_positional_embedding.gate",
    "ln_pre.weight": "layernorm_pre.weight",
    "ln_pre.bias": "layernorm_pre.bias",
    "ln_post.weight": "layernorm_post.weight",
    "ln_post.bias": "layernorm_post.bias",
}
_V, _T = "vision_model.vision_encoder.", "text_model."
_HV, _HT = "model.vision_model.", "model.language_model."

def _key_map(args: ModelArgs) -> dict[str, str]:
    """Meta key -> HF key for every tensor that maps one-to-one (possibly reshaped)."""
    m = {f"{_V}{a}": f"{_HV}{b}" for a, b in _VISION_TOP.items()}
    for tower, n in (("transformer", args.vision_layers), ("global_transformer", args.vision_global_layers)):
        for i in range(n):
            for a, b in _VISION_BLOCK.items():
                if a.startswith("gate_") and tower == "transformer":
                    continue
                m[f"{_V}{tower}.resblocks.{i}.{a}"] = f"{_HV}{tower}.layers.{i}.{b}"
    m[f"{_V}conv1._linear.weight"] = f"{_HV}patch_embedding.weight"
    m["vision_model.vision_projection.weight"] = "model.multi_modal_projector.weight"
    m["vision_model.vision_projection.bias"] = "model.multi_modal_projector.bias"
    self_idx, cross_idx = hf_layer_indices(args.n_layers, args.fusion_schedule)
    for i, j in enumerate(self_idx):
        for a, b in _TEXT_BLOCK.items():
            m[f"{_T}layers.{i}.{a}"] = f"{_HT}layers.{j}.{b}"
    for i, j in enumerate(cross_idx):
        for a, b in _CROSS_BLOCK.items():
            m[f"{_T}cross_attention_layers.{i}.{a}"] = f"{_HT}layers.{j}.{b}"
    m[f"{_T}norm.weight"] = f"{_HT}norm.weight"
    m[f"{_T}output.weight"] = "lm_head.weight"
    return m

def meta_to_hf(sd: dict[str, Tensor], args: ModelArgs, *, partial: bool = False) -> dict[str, Tensor]:
    """Meta state dict -> HF MllamaForConditionalGeneration state dict. partial: `sd` may
    hold any subset of the keys (e.g. the modules a PEFT adapter saves whole); the token
    embedding needs both of its Meta halves."""
    out: dict[str, Tensor] = {}
    remaining = dict(sd)
    for a, b in _key_map(args).items():
        if partial and a not in remaining:
            continue
        t = remaining.pop(a)
        if a.endswith("conv1._linear.weight"):
            p = args.vision_patch_size
            t = t.reshape(t.shape[0], args.vision_in_channels, p, p)
        elif ".layers." in a and a.startswith(_T) and (a.endswith("attention.wq.weight") or a.endswith("attention.wk.weight")):
            heads = args.n_heads if a.endswith("wq.weight") else args.n_kv_heads
            t = permute_to_rotate_half(t, heads)
        out[b] = t
    embed = (f"{_T}tok_embeddings.weight", f"{_T}learnable_embedding.weight")
    if not partial or all(k in remaining for k in embed):
        out[f"{_HT}embed_tokens.weight"] = torch.cat([remaining.pop(k) for k in embed])
    for meta, hf in _TILE_TABLE_KEYS:
        if partial and meta not in remaining:
            continue
        table = remaining.pop(meta)
        _check_tile_table(table, meta, args)
        # Per-ratio tables are HF's rows already: only flattened (a view), values untouched.
        out[hf] = precompute_by_aspect_ratio(table) if args.tile_embedding_layout == "grid" else table.flatten(1)
    if remaining:
        raise KeyError(f"Meta keys with no HF counterpart: {sorted(remaining)[:10]}")
    return out

# (Meta key, HF key) of the tile-position tables, the only keys whose layout differs.
_TILE_TABLE_KEYS = (
    (f"{_V}gated_positional_embedding", f"{_HV}gated_positional_embedding.tile_embedding.weight"),
    (f"{_V}pre_tile_pos_embed.embedding", f"{_HV}pre_tile_positional_embedding.embedding.weight"),
    (f"{_V}post_tile_pos_embed.embedding", f"{_HV}post_tile_positional_embedding.embedding.weight"),
)

def _tile_table_shape(meta_key: str, args: ModelArgs) -> tuple[int, ...]:
    """Meta-side shape of a tile table in `args`' layout."""
    t = args.vision_max_num_chunks
    p = args.vision_tokens_per_tile if meta_key.endswith("gated_positional_embedding") else 1
    return (tile_table_rows(t, args.tile_embedding_layout), t, p, args.vision_width)

def _check_tile_table(table: Tensor, meta_key: str, args: ModelArgs) -> None:
    want = _tile_table_shape(meta_key, args)
    if tuple(table.shape) != want:
        raise KeyError(
            f"{meta_key} has shape {list(table.shape)}, expected {list(want)} for tile_embedding_layout="
            f"{args.tile_embedding_layout!r} (grid: [T, T, ...], per_aspect_ratio: [n_ratios + 1, T, ...])"
        )

def hf_to_meta(sd: dict[str, Tensor], args: ModelArgs, *, partial: bool = False) -> dict[str, Tensor]:
    """HF MllamaForConditionalGeneration state dict -> Meta state dict (partial: `sd` may
    hold any subset of the keys)."""
    remaining = dict(sd)
    out: dict[str, Tensor] = {}
    for a, b in _key_map(args).items():
        if b not in remaining:
            if partial:
                continue
            raise KeyError(f"HF checkpoint is missing {b} (needed for {a})")
        t = remaining.pop(b)
        if a.endswith("conv1._linear.weight"):
            t = t.reshape(t.shape[0], -1)
        elif ".layers." in a and a.startswith(_T) and (a.endswith("attention.wq.weight") or a.endswith("attention.wk.weight")):
            heads = args.n_heads if a.endswith("wq.weight") else args.n_kv_heads
            t = permute_from_rotate_half(t, heads)
        out[a] = t
    if not partial or f"{_HT}embed_tokens.weight" in remaining:
        emb = remaining.pop(f"{_HT}embed_tokens.weight")
        out[f"{_T}tok_embeddings.weight"] = emb[: args.vocab_size]
        out[f"{_T}learnable_embedding.weight"] = emb[args.vocab_size :]
    for meta, hf in _TILE_TABLE_KEYS:
        if hf not in remaining:
            if partial:
                continue
            raise KeyError(f"HF checkpoint is missing {hf} (needed for {meta})")
        _, t, p, w = _tile_table_shape(meta, args)
        rows = len(supported_aspect_ratios(t)) + 1
        pre = remaining.pop(hf)
        if tuple(pre.shape) != (rows, t * p * w):
            raise KeyError(f"{hf} has shape {list(pre.shape)}, expected [{rows}, {t * p * w}] (n_ratios + 1, T * P * W)")
        # Grid: one value per tile (exact when the rows agree, see hf_io); per ratio: HF's
        # rows as they are (a view).
        out[meta] = table_from_aspect_ratios(pre, t, p, w) if args.tile_embedding_layout == "grid" else pre.view(rows, t, p, w)
    if remaining:
        raise KeyError(f"unexpected HF keys: {sorted(remaining)[:10]}")
    return out

# --- configs --------------------------------------------------------------------------------
def hf_config_from_args(args: ModelArgs, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None) -> dict:
    """A config.json dict for transformers' MllamaConfig (transformers >= 5 field names).
    Special ids default to Llama 3's for its vocabulary, else to 0/1/2 of a small one."""
    schedule = args.fusion_schedule
    llama3 = args.vocab_size > 128004
    bos_id = bos_id if bos_id is not None else (128000 if llama3 else 0)
    eos_id = eos_id if eos_id is not None else (128001 if llama3 else 1)
    pad_id = pad_id if pad_id is not None else (128004 if llama3 else 2)
    return {
        "model_type": "mllama",
        "architectures": ["MllamaForConditionalGeneration"],
        "image_token_index": args.vocab_size,
        "text_config": {
            "model_type": "mllama_text_model",
            "vocab_size": args.vocab_size,
            "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers + len(schedule),
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads,
            "intermediate_size": args.ffn_hidden_dim,
            "rms_norm_eps": args.norm_eps,
            "cross_attention_layers": hf_layer_indices(args.n_layers, schedule)[1],
            "max_position_embeddings": 131072,
            "rope_parameters": _rope_parameters(args),
            "rope_scaling": _rope_parameters(args),  # pre-v5 readers look here
            "rope_theta": args.rope_theta,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "mllama_vision_model",
            "hidden_size": args.vision_width,
            "num_hidden_layers": args.vision_layers,
            "num_global_layers": args.vision_global_layers,
            "attention_heads": args.vision_heads,
            "intermediate_size": int(args.vision_mlp_ratio * args.vision_width),
            "vision_output_dim": args.vision_output_dim,
            "image_size": args.vision_chunk_size,
            "patch_size": args.vision_patch_size,
            "max_num_tiles": args.vision_max_num_chunks,
            "intermediate_layers_indices": list(args.vision_intermediate_layers),
            "supported_aspect_ratios": [list(r) for r in supported_aspect_ratios(args.vision_max_num_chunks)],
            "norm_eps": 1e-5,
            "num_channels": args.vision_in_channels,
        },
    }

def _rope_parameters(args: ModelArgs) -> dict:
    if not args.use_scaled_rope:
        return {"rope_type": "default", "rope_theta": args.rope_theta}
    return {
        "rope_type": "llama3",
        "rope_theta": args.rope_theta,
        "factor": args.rope_scale_factor,
        "low_freq_factor": args.rope_low_freq_factor,
        "high_freq_factor": args.rope_high_freq_factor,
        "original_max_position_embeddings": args.rope_original_max_position,
    }

def params_from_hf_config(config: dict) -> dict:
    """HF config.json dict -> Meta params.json dict (+ vision-size keys)."""
    tc, vc = config["text_config"], config["vision_config"]
    cross = list(tc["cross_attention_layers"])
    n_layers = tc["num_hidden_layers"] - len(cross)
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    theta = rope.get("rope_theta", tc.get("rope_theta", 500000.0))
    params = {
        "dim": tc["hidden_size"],
        "n_layers": n_layers,
        "n_heads": tc["num_attention_heads"],
        "n_kv_heads": tc["num_key_value_heads"],
        "vocab_size": tc["vocab_size"],
        "norm_eps": tc.get("rms_norm_eps", 1e-5),
        "rope_theta": theta,
        "use_scaled_rope": rope.get("rope_type") == "llama3",
        "vision_chunk_size": vc.get("image_size", 448),
        "vision_max_num_chunks": vc.get("max_num_tiles", 4),
        "vision_num_cross_attention_layers": len(cross),
        "vision_width": vc.get("hidden_size", 1280),
        "vision_layers": vc.get("num_hidden_layers", 32),
        "vision_heads": vc.get("attention_heads", 16),
        "vision_global_layers": vc.get("num_global_layers", 8),
        "vision_patch_size": vc.get("patch_size", 14),
        "vision_intermediate_layers": list(vc.get("intermediate_layers_indices") or [3, 7, 15, 23, 30]),
        "vision_mlp_ratio": vc.get("intermediate_size", 5120) / vc.get("hidden_size", 1280),
        **ffn_params(tc["hidden_size"], tc["intermediate_size"]),
    }
    if rope.get("rope_type") == "llama3":
        params.update(
            rope_scale_factor=rope.get("factor", 8.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_original_max_position=rope.get("original_max_position_embeddings", 8192),
        )
    # Any positions transformers accepts that our decoder can run; params.json names them
    # only when they are not Meta's rule (Meta-scheduled configs convert exactly as before).
    schedule = schedule_from_hf_cross_layers(cross, tc["num_hidden_layers"])
    if schedule != fusion_schedule(n_layers, len(cross)):
        params["fusion_schedule"] = schedule
    return params

def ffn_params(dim: int, hidden: int) -> dict:
    """multiple_of / ffn_dim_multiplier that reproduce an FFN width (Meta's params.json
    stores the recipe, HF the result). Known Llama recipes first, then an exact fit."""
    for multiple_of, mult in ((1024, 1.3), (4096, 1.3), (256, None), (1024, None), (256, 1.3), (4096, 1.2)):
        if ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=mult).ffn_hidden_dim == hidden:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    base = int(2 * (4 * dim) / 3)
    for eps in (0.0, 1e-9, 1e-7, 1e-5):
        mult = hidden / base + eps
        if int(mult * base) == hidden:
            return {"multiple_of": 1, "ffn_dim_multiplier": mult}
    raise ValueError(f"cannot express FFN width {hidden} for dim {dim} as Meta params")
