"""Building a stage's model: params (+ overrides, vocabulary from the tokenizer), the
stage's modalities, `init_from` / `init_text_from` weights, trainability and `init:` start
values. Nothing here knows about devices or process groups (see parallelize.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from llama_vision.checkpoint import load_into, load_text_trunk_into
from llama_vision.model import build_model, set_trainable, trainable_groups
from llama_vision.model.video import VideoConfig, add_video_adapters

from .optim import is_gate
from .train_config import TrainConfig

__all__ = ["apply_init", "build_training_model", "is_gate", "load_model_params", "new_module_prefixes"]


def load_model_params(path: str) -> dict:
    """A Meta params.json (or a dir holding one) or a YAML of the same keys."""
    if not path:
        raise ValueError("config key `model` is not set: point it at a params.json, a checkpoint dir or a YAML of "
                         "Meta params (e.g. configs/model/tiny.yaml in a checkout)")
    p = Path(path)
    if p.is_dir():
        p = p / "params.json"
    if not p.is_file():
        raise FileNotFoundError(f"model params not found: {p}")
    return json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())


def build_training_model(cfg: TrainConfig, tokenizer):
    """Params + tokenizer -> model with initial weights, new modalities and trainability."""
    params = {**load_model_params(cfg.model), **cfg.model_overrides}
    if params.get("vocab_size") in (None, "auto"):
        params["vocab_size"] = tokenizer.n_words
    if params["vocab_size"] != tokenizer.n_words:
        raise ValueError(f"model vocab_size {params['vocab_size']} != tokenizer n_words {tokenizer.n_words} ({cfg.tokenizer})")
    if cfg.stage.startswith("video"):
        # The stage's `video:` block shapes the aggregator, also when `model` is a video
        # checkpoint's params.json (the previous stage's shape): a trained aggregator at
        # another frames_per_group / group count is resized when init_from is loaded.
        params.pop("video", None)
    torch.manual_seed(cfg.seed)
    model = build_model(params, seed=cfg.seed)  # the same weights at every TP degree
    if cfg.stage.startswith("video") and "video" not in model.modalities:
        v = cfg.video
        add_video_adapters(model, VideoConfig(
            num_frames=v.num_frames, frames_per_group=v.frames_per_group, tiles_per_frame=v.tiles_per_frame,
            n_latents=v.n_latents, depth=v.depth, heads=v.heads, every_k_image_layers=v.every_k_image_layers,
        ))
    if cfg.init_from:
        # Video SFT continues a video pretraining: a checkpoint without the video weights
        # would silently start it from a fresh aggregator, so only earlier stages may lack them.
        missing_ok = () if cfg.stage == "video_sft" else new_module_prefixes(model)
        load_into(model, cfg.init_from, allow_missing_prefixes=missing_ok)
    if cfg.init_text_from:
        load_text_trunk_into(model, cfg.init_text_from)
    groups = trainable_groups(model)
    # A modality group the model does not have (video in an image stage) must stay off.
    set_trainable(model, **{g: on for g, on in vars(cfg.trainable).items() if on or g in groups})
    apply_init(model, cfg.init)
    return model


@torch.no_grad()
def apply_init(model, init) -> None:
    """The stage's `init:` start values (see InitConfig) on the trainable parameters."""
    if init.gates is not None:
        for name, p in model.named_parameters():
            if p.requires_grad and is_gate(name):
                p.fill_(init.gates)
    if init.vision_pos_embed_scale != 1.0:
        encoder = model.vision_model.vision_encoder
        for p in (encoder.positional_embedding, encoder.pre_tile_pos_embed.embedding, encoder.post_tile_pos_embed.embedding):
            if p.requires_grad:
                p.mul_(init.vision_pos_embed_scale)


def new_module_prefixes(model) -> tuple[str, ...]:
    """State-dict prefixes of modalities added on top of the image model (absent from an
    image-stage checkpoint)."""
    return tuple(p + "." for name, m in model.modalities.items() if name != "image" for p in m.trainable_modules)
