"""transformers' LlavaForConditionalGeneration / LlavaNextForConditionalGeneration /
LlavaOnevisionForConditionalGeneration (a Llama trunk) -> our model: the trunk without Meta's image modality plus the LLaVA projector
modality (llama_vision.model.llava) with a CLIP / SigLIP tower (llama_vision.model.clip_vision).

Keys, in the three layouts LLaVA checkpoints come in (found from the keys):

    ours                                  transformers 5 in memory          LLaVA files (save_pretrained / Hub)
    text_model.*  (checkpoint/text_only)  model.language_model.*, lm_head    language_model.model.*, language_model.lm_head
    vision_model.vision_encoder.*         model.vision_tower.*               vision_tower[.vision_model].*
    vision_model.projector.linear_{1,2}   model.multi_modal_projector.*      multi_modal_projector.*
    vision_model.image_newline            model.image_newline (NeXT)         image_newline

The text model's q/k rows are un-permuted from rotate-half RoPE as for any HF Llama.
LLaVA's `<image>` id (`image_token_index`, a row of its vocabulary) becomes our image
placeholder (`<|image|>`, a learnable row after the vocabulary): `hf_tokens_to_ours`
rewrites prompts; the vocabulary row itself stays (the projector's tokens replace it at
every placeholder either way).

OneVision (`llava_onevision`, import and export): NeXT's keys and AnyRes with `anyres_max_N`
pooling and padded squares for multi-image samples, plus its video path as our projector
video modality (llama_vision.model.llava.add_llava_video_modality, the same tower /
projector / image_newline); `video_token_index` becomes the video placeholder.
"""
from __future__ import annotations

from typing import Mapping

import torch

from llama_vision.model import build_model
from llama_vision.model.args import ModelArgs
from llama_vision.model.clip_vision import ClipVisionConfig, ClipVisionTower
from llama_vision.model.llava import LlavaConfig, LlavaVideoConfig, add_llava_modality, add_llava_video_modality

from .clip_vision import detect_vision_layout, vision_from_hf
from .meta import CheckpointMismatchError
from .text_only import llama_hf_to_meta, text_params_from_hf_config

__all__ = ["hf_tokens_to_ours", "llava_config_from_hf", "llava_from_hf", "llava_to_hf", "save_llava_hf"]

Tensor = torch.Tensor

# (trunk prefix, lm_head key, projector prefix, image_newline key) per layout
_LAYOUTS = (
    ("model.language_model.", "lm_head.weight", "model.multi_modal_projector.", "model.image_newline"),
    ("language_model.model.", "language_model.lm_head.weight", "multi_modal_projector.", "image_newline"),
)
_ACTS = {"gelu": "mlp2x_gelu"}


def llava_config_from_hf(config: Mapping) -> tuple[dict, ClipVisionConfig, LlavaConfig]:
    """A LLaVA / LLaVA-NeXT config.json dict -> (our trunk params, the tower's config, the
    modality's config). Refuses what our LLaVA modality cannot express, naming it."""
    from llama_vision.data.anyres import AnyResConfig

    model_type = config.get("model_type")
    if model_type not in ("llava", "llava_next", "llava_onevision"):
        raise ValueError(f"model_type {model_type!r}: expected 'llava', 'llava_next' or 'llava_onevision'")
    text = dict(config.get("text_config") or {})
    params = text_params_from_hf_config(text, "config.json text_config")
    params["vision_num_cross_attention_layers"] = 0
    if text.get("max_position_embeddings"):
        params["max_seq_len"] = int(text["max_position_embeddings"])
    tower = ClipVisionConfig.from_hf_config(config)
    act = config.get("projector_hidden_act", "gelu")
    if act not in _ACTS:
        raise ValueError(f"projector_hidden_act {act!r}: only 'gelu' (mlp2x_gelu) is supported")
    if config.get("multimodal_projector_bias", True) is False:
        raise ValueError("multimodal_projector_bias: false is not supported (the projector has biases)")
    anyres = None
    if model_type == "llava_next":
        pinpoints = config.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        anyres = AnyResConfig(grid_pinpoints=tuple(tuple(p) for p in pinpoints), crop_size=tower.image_size,
                              patches_per_side=tower.grid)
    elif model_type == "llava_onevision":
        ratio = str(config.get("vision_aspect_ratio", "anyres_max_9"))
        if not ratio.startswith("anyres_max_") or not ratio[len("anyres_max_"):].isdigit():
            raise ValueError(f"vision_aspect_ratio {ratio!r}: only 'anyres_max_N' is supported")
        pinpoints = config.get("image_grid_pinpoints") or [[384 * h, 384 * w] for w in range(1, 7) for h in range(1, 7)]
        mean = (0.5, 0.5, 0.5) if tower.kind == "siglip" else None
        anyres = AnyResConfig(grid_pinpoints=tuple(tuple(p) for p in pinpoints), crop_size=tower.image_size,
                              patches_per_side=tower.grid, anyres_max=int(ratio[len("anyres_max_"):]),
                              square_for_multi_image=True, **({"image_mean": mean, "image_std": mean} if mean else {}))
    image = config.get("image_token_index", config.get("image_token_id", 32000))
    return params, tower, LlavaConfig(projector=_ACTS[act], anyres=anyres, image_newline=model_type != "llava",
                                      hf_image_token_index=int(image))


def _hf_video_token(config: Mapping) -> int:
    return int(config.get("video_token_index", config.get("video_token_id", 151647)))


def _layout(state: Mapping[str, Tensor]) -> tuple[str, str, str, str]:
    for layout in _LAYOUTS:
        if f"{layout[0]}embed_tokens.weight" in state:
            return layout
    raise CheckpointMismatchError(f"not a LLaVA state dict: no language model embed_tokens under "
                                  f"{[lay[0] for lay in _LAYOUTS]} (keys: {sorted(state)[:8]}...)")


def llava_from_hf(state_dict: Mapping[str, Tensor], config: Mapping, *, dtype: torch.dtype = torch.float32):
    """An HF LLaVA / LLaVA-NeXT state dict (any of the layouts above) + its config.json
    dict -> our VisionLanguageModel (eval mode, on the CPU, `dtype`). Strict: every key is
    used, none missing."""
    params, tower_cfg, llava_cfg = llava_config_from_hf(config)
    trunk, head, proj, newline = _layout(state_dict)
    remaining = dict(state_dict)
    text = {"model." + k[len(trunk):]: remaining.pop(k) for k in list(remaining) if k.startswith(trunk)}
    if head in remaining:
        text["lm_head.weight"] = remaining.pop(head)
    text_state = llama_hf_to_meta(text, ModelArgs.from_params(params))
    layout, prefix = detect_vision_layout(remaining)
    if layout != "hf":
        raise CheckpointMismatchError(f"the vision tower's keys are in the {layout!r} layout under {prefix!r}, expected transformers'")
    vision_keys = [k for k in remaining if k.startswith(prefix)]
    vision_state = vision_from_hf({k: remaining.pop(k) for k in vision_keys}, tower_cfg, prefix=prefix)
    projector = {k[len(proj):]: remaining.pop(k) for k in list(remaining) if k.startswith(proj)}
    image_newline = remaining.pop(newline, None)
    if remaining:
        raise CheckpointMismatchError(f"unexpected LLaVA keys: {sorted(remaining)[:12]}")
    if llava_cfg.image_newline and image_newline is None:
        raise CheckpointMismatchError(f"LLaVA-NeXT checkpoint lacks {newline}")

    with torch.device("meta"):  # shapes only: every tensor comes from the checkpoint
        model = build_model(params, dtype=dtype, init=False)
        add_llava_modality(model, ClipVisionTower(tower_cfg).to(dtype), tower_cfg.width, llava_cfg)
        if config.get("model_type") == "llava_onevision":  # its video path: the same tower / projector
            add_llava_video_modality(model, LlavaVideoConfig(hf_video_token_index=_hf_video_token(config)))
    if any(True for _ in model.buffers()):
        raise RuntimeError("the LLaVA model has buffers the checkpoint does not hold")
    model = model.to_empty(device="cpu")
    state = {f"text_model.{k}": v for k, v in text_state.items()}
    state.update({f"vision_model.vision_encoder.{k}": v for k, v in vision_state.items()})
    state.update({f"vision_model.projector.{k}": v for k, v in projector.items()})
    if image_newline is not None:
        state["vision_model.image_newline"] = image_newline
    # Rows past the vocabulary (our placeholders): LLaVA has none. A LLaVA prompt never reads
    # them (the projector's tokens replace every image placeholder): zeros.
    state["text_model.learnable_embedding.weight"] = torch.zeros_like(model.text_model.learnable_embedding.weight, device="cpu")
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise CheckpointMismatchError(f"LLaVA conversion: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, t in state.items():
        if tuple(t.shape) != tuple(want[key].shape):
            raise CheckpointMismatchError(f"{key}: the checkpoint has shape {list(t.shape)}, the model {list(want[key].shape)}")
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


def hf_tokens_to_ours(ids: Tensor, config: Mapping, model) -> Tensor:
    """An HF LLaVA prompt (image_token_index at every image token; OneVision:
    video_token_index at every video token) -> our ids (the modalities' placeholders)."""
    image = int(config.get("image_token_index", config.get("image_token_id", 32000)))
    out = ids.masked_fill(ids == image, model.modalities["image"].token_id)
    video = model.modalities.get("video")
    if config.get("model_type") == "llava_onevision" and video is not None and video.fusion == "projector":
        out = out.masked_fill(ids == _hf_video_token(config), video.token_id)
    return out


def llava_to_hf(model, *, image_token_index: int | None = None,
                video_token_index: int | None = None) -> tuple[dict[str, Tensor], dict]:
    """Our LLaVA model (the projector image modality on a trunk without Meta's) -> (state
    dict in LLaVA's file layout, config.json dict) for transformers'
    LlavaForConditionalGeneration (LlavaNext... with AnyRes; LlavaOnevision... with
    AnyRes-Max, the projector video modality riding along). image_token_index /
    video_token_index: the vocabulary rows that stand for `<image>` / `<video>` in HF
    prompts (default: the ones the model was imported with; a model trained here names
    them, e.g. reserved special tokens of Llama 3's tokenizer: their embedding rows are
    never read, the projector's tokens replace them)."""
    from llama_vision.model.clip_vision import ClipVisionConfig

    from .clip_vision import vision_to_hf
    from .text_only import llama_hf_config_from_args, llama_meta_to_hf

    vision = model.vision_model
    params = model.args.llava
    if model.modalities.get("image") is None or model.modalities["image"].fusion != "projector" or params is None:
        raise ValueError("llava_to_hf exports a LLaVA model: the projector image modality on a trunk without "
                         "Meta's image encoder (vision_num_cross_attention_layers: 0), with a ClipVisionTower")
    config, tower = vision.config, ClipVisionConfig(**params["tower"])
    if config.projector != "mlp2x_gelu":
        raise ValueError(f"projector {config.projector!r}: transformers' LLaVA projector is mlp2x_gelu (Linear, GELU, Linear)")
    if config.pool_to is not None:
        raise ValueError(f"pool_to={config.pool_to}: transformers' LLaVA classes feed every tower token (no feature "
                         "pooling without AnyRes-Max); export a model without pool_to")
    onevision = config.anyres is not None and config.anyres.anyres_max is not None
    video = model.modalities.get("video")
    if video is not None and video.fusion == "projector" and (params.get("video") or {}).get("pool") != "bilinear2x":
        raise ValueError(f"video pool {(params.get('video') or {}).get('pool')!r}: LLaVA-OneVision pools every frame "
                         "bilinearly to half its side (pool bilinear2x)")
    if video is not None and video.fusion == "projector" and not onevision:
        raise ValueError("a projector video modality exports as LLaVA-OneVision, which needs AnyRes with anyres_max")
    image = image_token_index if image_token_index is not None else config.hf_image_token_index
    if image is None or not 0 <= image < model.args.vocab_size:
        raise ValueError(f"image_token_index {image}: name a row of the {model.args.vocab_size}-token vocabulary for "
                         f"<image> (e.g. a reserved special token)")
    video_index = None
    if onevision:
        video_index = video_token_index if video_token_index is not None else (params.get("video") or {}).get(
            "hf_video_token_index")
        if video_index is None or not 0 <= video_index < model.args.vocab_size or video_index == image:
            raise ValueError(f"video_token_index {video_index}: OneVision needs a row of the {model.args.vocab_size}-token "
                             f"vocabulary for <video>, not <image>'s {image} (e.g. a reserved special token)")
    state = model.state_dict()
    text = {k[len("text_model."):]: v for k, v in state.items() if k.startswith("text_model.") and "learnable" not in k}
    out = {}
    for key, t in llama_meta_to_hf(text, model.args).items():
        out["language_model." + key if key.startswith("model.") else "language_model.lm_head.weight"] = t
    prefix = "vision_model.vision_encoder."
    out.update(vision_to_hf({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, tower,
                            prefix="vision_tower.vision_model."))
    for key, t in state.items():
        if key.startswith("vision_model.projector."):
            out["multi_modal_projector." + key[len("vision_model.projector."):]] = t
    if config.image_newline:
        out["image_newline"] = state["vision_model.image_newline"]
    next_ = config.anyres is not None
    kind = "llava_onevision" if onevision else "llava_next" if next_ else "llava"
    hf_config = {
        "model_type": kind,
        "architectures": [{"llava_onevision": "LlavaOnevisionForConditionalGeneration",
                           "llava_next": "LlavaNextForConditionalGeneration",
                           "llava": "LlavaForConditionalGeneration"}[kind]],
        "text_config": llama_hf_config_from_args(model.args),
        "vision_config": tower.to_hf_config(),
        "image_token_index": int(image),
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        **tower.to_hf_llava_selection(),
    }
    if next_:
        hf_config["image_grid_pinpoints"] = [list(p) for p in config.anyres.grid_pinpoints]
    if onevision:
        hf_config["vision_aspect_ratio"] = f"anyres_max_{config.anyres.anyres_max}"
        hf_config["video_token_index"] = int(video_index)
    return out, hf_config


def save_llava_hf(model, out_dir, *, image_token_index: int | None = None, video_token_index: int | None = None,
                  dtype: torch.dtype | None = None):
    """`llava_to_hf` written as a transformers checkpoint dir (config.json + safetensors,
    sharded above 5 GB)."""
    from .hf_io import write_hf_dir
    from .meta import tensors_for_saving

    tensors, config = llava_to_hf(model, image_token_index=image_token_index, video_token_index=video_token_index)
    return write_hf_dir(tensors_for_saving(tensors, dtype), out_dir, config)
