"""Start a vision-language model from a text-only Llama 3 / 3.1 trunk.

Sources:
- a Meta text dir: params.json without vision keys + consolidated.NN.pth with keys
  `tok_embeddings.weight`, `layers.N.attention.wq.weight`, ..., `norm.weight`, `output.weight`
  (any number of files, loaded at any TP degree like the vision checkpoints);
- a Meta VISION dir: its `text_model.` trunk is taken (the paper's "swap in the instruct
  trunk" step), everything else ignored;
- a Hugging Face `LlamaForCausalLM` dir (config.json + safetensors): q/k rows are stored
  permuted for rotate-half RoPE and are un-permuted here.

The trunk (token embeddings, self-attention layers, final norm, output) is loaded under
`text_model.`; the vision encoder, the adapters (tanh gates at 0) and the learnable
special-token rows keep their fresh initialisation -- so the model's text logits equal the
trunk's exactly until the adapters are trained.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

import model_parallel as mp
from llama_vision.model import VisionLanguageModel, build_model
from llama_vision.model.args import ModelArgs

from .hf import ffn_params, permute_from_rotate_half
from .hf_io import is_hf_checkpoint, load_hf_state_dict, read_hf_config
from .meta import (
    PARAMS_FILE,
    CheckpointMismatchError,
    ShardSet,
    args_from_params,
    check_keys,
    check_shapes,
    is_meta_checkpoint,
    load_strict,
    meta_shard_paths,
    read_params,
    reshard,
)

Tensor = torch.Tensor
TRUNK_PREFIXES = ("tok_embeddings.", "layers.", "norm.", "output.")  # inside text_model
# Params that change what the trunk computes without changing any weight shape: a mismatch
# would load cleanly and silently give wrong logits.
_MUST_MATCH = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "use_scaled_rope", "ffn_hidden_dim")
_SCALED_ROPE = ("rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position")


def init_from_text_checkpoint(
    path: str | Path, params_overrides: Mapping | None = None, *, seed: int = 0, dtype: torch.dtype | None = None
) -> VisionLanguageModel:
    """A text-only trunk dir -> VisionLanguageModel (eval mode) with the trunk loaded and a
    fresh vision encoder / adapters. `params_overrides` sets the vision sizes and run-time
    keys (the released ViT-H/14 defaults otherwise); the model is built at the current TP
    degree with `init_weights(seed)` for everything the trunk does not provide."""
    params = {**text_params(path), **(params_overrides or {})}
    model = build_model(params, seed=seed, dtype=dtype)
    load_text_trunk_into(model, path)
    return model.eval()


def load_text_trunk_into(model: nn.Module, path: str | Path) -> None:
    """Overwrite `model.text_model`'s trunk with a text checkpoint's (this rank's slices);
    adapters, learnable rows and the vision tower are left as they are."""
    path = Path(path)
    state = text_trunk_state(model, path)
    text = model.text_model
    non_trunk = tuple(k for k in text.state_dict() if k not in state)
    load_strict(text, state, path, allow_missing_prefixes=non_trunk)


def text_trunk_state(model: nn.Module, path: str | Path) -> dict[str, Tensor]:
    """This rank's tensors of `model.text_model`'s trunk (keys relative to text_model:
    tok_embeddings, layers, norm, output) from a text checkpoint of either format (Meta's
    are memory-mapped slices). `model` may be on the meta device."""
    path = Path(path)
    params = text_params(path)
    _check_compatible(params, model.args, path)
    text = model.text_model
    trunk = [k for k in text.state_dict() if k.startswith(TRUNK_PREFIXES)]
    rank, world = mp.tp_rank(), mp.tp_size()
    if is_meta_checkpoint(path):
        # Meta's vision params.json always carries vision keys; text-only ones never do.
        vision_layout = any(k.startswith("vision_") for k in params)
        shards = ShardSet(meta_shard_paths(path), _select_trunk if vision_layout else None)
        state = reshard(shards, text, rank, world, source=path, keys=trunk)
    else:
        hf_state, config = load_hf_state_dict(path)
        full = llama_hf_to_meta(hf_state, ModelArgs.from_params(text_params_from_hf_config(config, path)))
        check_keys(full, trunk, path)
        check_shapes({k: tuple(v.shape) for k, v in full.items()}, text, world, path)
        state = mp.shard_state_dict(text, full, rank, world)
    return state


def _select_trunk(key: str) -> str | None:
    """Vision checkpoint key -> trunk key inside text_model (None: not part of the trunk)."""
    if key.startswith("text_model."):
        inner = key[len("text_model.") :]
        return inner if inner.startswith(TRUNK_PREFIXES) else None
    return None


# --- params -----------------------------------------------------------------------------------
def text_params(path: str | Path) -> dict:
    """Meta params of a text (or vision) checkpoint dir of either format."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text checkpoint path does not exist: {path}")
    if is_meta_checkpoint(path):
        params = read_params(path)
        args_from_params(params, path / PARAMS_FILE)
        return params
    if is_hf_checkpoint(path):
        return text_params_from_hf_config(read_hf_config(path), path / "config.json")
    raise ValueError(
        f"{path} is neither a Meta text checkpoint (params.json + consolidated.NN.pth) nor a Hugging Face "
        f"LlamaForCausalLM dir (config.json + *.safetensors)"
    )


def text_params_from_hf_config(config: dict, source="config.json") -> dict:
    """HF LlamaConfig dict -> Meta params. Refuses what Meta's Llama cannot express."""
    if config.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type {config.get('model_type')!r}, expected 'llama' (LlamaForCausalLM)")
    try:
        dim, heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or dim // heads
        problems = []
        if head_dim * heads != dim:
            problems.append(f"head_dim {head_dim} * heads {heads} != hidden_size {dim}")
        if config.get("attention_bias") or config.get("mlp_bias"):
            problems.append("attention/MLP biases")
        if config.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {config['hidden_act']!r}")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            problems.append(f"rope_type {rope_type!r} (only default and llama3 scaling)")
        if problems:
            raise ValueError(f"{source}: unsupported Llama variant: " + "; ".join(problems))
        params = {
            "dim": dim,
            "n_layers": config["num_hidden_layers"],
            "n_heads": heads,
            "n_kv_heads": config.get("num_key_value_heads") or heads,
            "vocab_size": config["vocab_size"],
            "norm_eps": config.get("rms_norm_eps", 1e-5),
            "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            "use_scaled_rope": rope_type == "llama3",
            **ffn_params(dim, config["intermediate_size"]),
        }
    except KeyError as e:
        raise ValueError(f"{source}: config lacks {e}") from e
    if rope_type == "llama3":
        params.update(
            rope_scale_factor=rope.get("factor", 8.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_original_max_position=rope.get("original_max_position_embeddings", 8192),
        )
    args_from_params(params, source)
    return params


def _check_compatible(params: dict, args: ModelArgs, source) -> None:
    theirs = ModelArgs.from_params(dict(params))
    keys = _MUST_MATCH + (_SCALED_ROPE if args.use_scaled_rope else ())
    diff = [f"{k}: checkpoint {getattr(theirs, k)!r} vs model {getattr(args, k)!r}" for k in keys if getattr(theirs, k) != getattr(args, k)]
    if diff:
        raise CheckpointMismatchError(f"text checkpoint {source} does not fit the model: " + "; ".join(diff))


# --- HF Llama -> Meta keys ----------------------------------------------------------------------
_HF_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def llama_meta_to_hf(state: Mapping[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Meta text keys (no `text_model.` prefix; the learnable rows are not part of it) ->
    HF LlamaForCausalLM keys: the inverse of `llama_hf_to_meta` (q/k rows permuted to
    rotate-half)."""
    from .hf import permute_to_rotate_half

    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"]}
    for i in range(args.n_layers):
        for hf_key, meta_key in _HF_LAYER.items():
            t = state[f"layers.{i}.{meta_key}"]
            if hf_key.startswith("self_attn.q_proj"):
                t = permute_to_rotate_half(t, args.n_heads)
            elif hf_key.startswith("self_attn.k_proj"):
                t = permute_to_rotate_half(t, args.n_kv_heads)
            out[f"model.layers.{i}.{hf_key}"] = t
    out["model.norm.weight"] = state["norm.weight"]
    out["lm_head.weight"] = state["output.weight"]
    return out


def llama_hf_config_from_args(args: ModelArgs) -> dict:
    """A transformers LlamaConfig dict of `args`' text trunk (the inverse of
    `text_params_from_hf_config`)."""
    from .hf import _rope_parameters

    rope = _rope_parameters(args)
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": args.vocab_size,
            "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "hidden_act": "silu",
            "rms_norm_eps": args.norm_eps, "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_theta,
            "rope_parameters": rope, "rope_scaling": rope if rope["rope_type"] != "default" else None,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}


def llama_hf_to_meta(sd: Mapping[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """HF LlamaForCausalLM state dict -> Meta text keys (no `text_model.` prefix). Tied
    embeddings (no lm_head) give `output.weight` = the embedding table."""
    remaining = dict(sd)
    remaining.pop("model.rotary_emb.inv_freq", None)  # a buffer some versions saved
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        if key not in remaining:
            raise CheckpointMismatchError(f"HF Llama checkpoint is missing {key}")
        return remaining.pop(key)

    out["tok_embeddings.weight"] = take("model.embed_tokens.weight")
    for i in range(args.n_layers):
        for hf_key, meta_key in _HF_LAYER.items():
            t = take(f"model.layers.{i}.{hf_key}")
            if hf_key.startswith("self_attn.q_proj"):
                t = permute_from_rotate_half(t, args.n_heads)
            elif hf_key.startswith("self_attn.k_proj"):
                t = permute_from_rotate_half(t, args.n_kv_heads)
            out[f"layers.{i}.{meta_key}"] = t
    out["norm.weight"] = take("model.norm.weight")
    out["output.weight"] = remaining.pop("lm_head.weight") if "lm_head.weight" in remaining else out["tok_embeddings.weight"]
    if remaining:
        raise CheckpointMismatchError(f"unexpected HF Llama keys: {sorted(remaining)[:20]}")
    return out
