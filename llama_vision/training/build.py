"""Building a stage's model: params (+ overrides, vocabulary from the tokenizer), the
stage's modalities, `init_from` / `init_text_from` weights, LoRA adaptors on the loaded
base (`lora:`), trainability and `init:` start values. Nothing here knows about devices or
process groups (see parallelize.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from llama_vision.checkpoint import load_into, load_text_trunk_into, rank_state_dict
from llama_vision.checkpoint.load import assign_strict
from llama_vision.checkpoint.text_only import text_trunk_state
from llama_vision.model import build_model, set_trainable, trainable_groups
from llama_vision.model.init import init_weights, initial_value
from llama_vision.model.llava import LlavaVideoConfig, add_llava_video_modality
from llama_vision.model.lora import apply_lora, lora_from_meta_args
from llama_vision.model.video import VideoConfig, add_video_adapters

from .optim import is_gate
from .train_config import TrainConfig

__all__ = ["apply_init", "build_training_model", "is_gate", "load_model_params", "new_module_prefixes", "stage_lora"]


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


def build_training_model(cfg: TrainConfig, tokenizer, *, lazy: bool = False, precision=None):
    """Params + tokenizer -> model with initial weights, new modalities and trainability.

    lazy: never hold the whole model -- it is built on the meta device, the tensors that
    `init_from` / `init_text_from` provide become this rank's memory-mapped checkpoint
    slices (no copy: only the pages a later shard copy reads are ever resident), and only
    the rest is allocated and initialised. Bitwise the same model as the default path,
    which initialises everything and then overwrites it with the checkpoints (every random
    value is seeded by its parameter's name, so skipping some changes no other).
    precision (lazy): the training.precision policy, applied to the skeleton before the
    checkpoints are assigned, so a frozen tensor stored in the checkpoint's dtype (Meta
    ships bf16) is used as it is instead of being copied into float32 first."""
    params = {**load_model_params(cfg.model), **cfg.model_overrides}
    lora = stage_lora(cfg, params.pop("lora_args", None))
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
    if lazy:
        with torch.device("meta"):
            model = build_model(params, seed=cfg.seed)
            _add_stage_modalities(model, cfg)
        _set_stage_trainable(model, cfg)
        if precision is not None:
            from .precision import apply_precision

            apply_precision(model, precision)
        _load_lazily(model, cfg)
        if lora is not None:
            # On the loaded base (the checkpoints hold no adaptors): fresh float32 tensors.
            apply_lora(model, seed=cfg.seed, **lora)
            _set_stage_trainable(model, cfg)
            if precision is not None:
                apply_precision(model, precision)  # the adaptors' dtype hooks
    else:
        model = build_model(params, seed=cfg.seed)  # the same weights at every TP degree
        _add_stage_modalities(model, cfg)
        if cfg.init_from:
            load_into(model, cfg.init_from, allow_missing_prefixes=_missing_ok(model, cfg))
        if cfg.init_text_from:
            load_text_trunk_into(model, cfg.init_text_from)
        if cfg.init_vision_from:
            with torch.no_grad():
                for key, t in _vision_tower_state(model, cfg.init_vision_from).items():
                    model.get_parameter(key).copy_(t)
        if lora is not None:
            apply_lora(model, seed=cfg.seed, **lora)
        _set_stage_trainable(model, cfg)
    apply_init(model, cfg.init)
    torch.manual_seed(cfg.seed)  # the same generator state after either path
    return model


def stage_lora(cfg: TrainConfig, meta_lora_args: dict | None = None) -> dict | None:
    """The stage's LoRA settings ({targets, rank, alpha, dropout}) or None: the `lora:`
    block when it names targets, else Meta's params.json `lora_args` mapped onto it
    (`lora_from_meta_args`), else none."""
    if cfg.lora.targets:
        lc = cfg.lora
        return {"targets": list(lc.targets), "rank": lc.rank, "alpha": lc.alpha, "dropout": lc.dropout}
    if meta_lora_args:
        return lora_from_meta_args(meta_lora_args)
    return None


def _set_stage_trainable(model, cfg: TrainConfig) -> None:
    groups = trainable_groups(model)
    # A modality group the model does not have (video in an image stage) must stay off.
    set_trainable(model, **{g: on for g, on in vars(cfg.trainable).items() if on or g in groups})


def _add_stage_modalities(model, cfg: TrainConfig) -> None:
    """The video modality of video_* stages (initialised with its own seed: see init.py);
    on a LLaVA model OneVision's projector video path (the image tower and projector
    encode the frames: nothing new to initialise)."""
    if cfg.stage.startswith("video") and "video" not in model.modalities:
        v = cfg.video
        if getattr(model.args, "llava", None) is not None:
            add_llava_video_modality(model, LlavaVideoConfig(pool=v.pool, num_frames=v.num_frames))
            return
        add_video_adapters(model, VideoConfig(
            num_frames=v.num_frames, frames_per_group=v.frames_per_group, tiles_per_frame=v.tiles_per_frame,
            n_latents=v.n_latents, depth=v.depth, heads=v.heads, every_k_image_layers=v.every_k_image_layers,
        ))


def _missing_ok(model, cfg: TrainConfig) -> tuple[str, ...]:
    """What init_from may lack: the modules added since an image stage. Video SFT continues
    a video pretraining: a checkpoint without the video weights would silently start it
    from a fresh aggregator, so only earlier stages may lack them."""
    return () if cfg.stage == "video_sft" else new_module_prefixes(model)


@torch.no_grad()
def _load_lazily(model, cfg: TrainConfig) -> None:
    """A meta-device `model` -> checkpoint slices where init_from / init_text_from provide
    them (init_text_from's trunk over init_from's, as the eager path loads them), fresh
    initialised tensors elsewhere, exactly as `build_model` + `add_video_adapters`
    initialise them."""
    state: dict[str, torch.Tensor] = {}
    if cfg.init_from:
        state.update(rank_state_dict(model, cfg.init_from, allow_missing_prefixes=_missing_ok(model, cfg)))
    if cfg.init_text_from:
        state.update({f"text_model.{k}": t for k, t in text_trunk_state(model, cfg.init_text_from).items()})
    if cfg.init_vision_from:
        state.update(_vision_tower_state(model, cfg.init_vision_from))
    fresh = [n for n, _ in model.named_parameters() if n not in state]
    for name in fresh:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        old = module._parameters[attr]
        new = torch.nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="cpu"), requires_grad=old.requires_grad)
        new.__dict__.update(old.__dict__)
        module._parameters[attr] = new
    # The eager path's initialisations, on the fresh tensors only (meta ones are skipped):
    # the image model with the run's seed (build_model), the video modules with theirs.
    video = model.modalities.get("video")
    video_modules = [model.get_submodule(p) for p in (video.trainable_modules if video else [])]
    video_params = {id(p) for m in video_modules for p in m.parameters()}
    if any(id(p) not in video_params and not p.is_meta for p in model.parameters()):
        init_weights(model, seed=cfg.seed)  # (the video modules too: redone below with their seed)
    for m in video_modules:
        name = next(n for n, mod in model.named_modules() if mod is m)
        init_weights(m, seed=0, prefix=name + ".")
    # (Meta's video modality has a placeholder row; a LLaVA model's projector video has none)
    placeholder = model.text_model.placeholder_embeddings["video"] if video and "video" in model.text_model.placeholder_embeddings else None
    if placeholder is not None and not placeholder.weight.is_meta:
        # add_modality starts it as the freshly initialised learnable table's row.
        table = model.text_model.learnable_embedding
        full = list(table.weight.shape)
        full[0] = model.args.n_learnable_embeddings
        row = initial_value("text_model.learnable_embedding.weight", full, cfg.seed)[placeholder.token_id - model.args.vocab_size]
        placeholder.weight.copy_(row.to(placeholder.weight.dtype))
    source = " + ".join(str(p) for p in (cfg.init_from, cfg.init_text_from, cfg.init_vision_from) if p) or "initialisation"
    assign_strict(model, state, source, allow_missing=fresh)


def _vision_tower_state(model, path: str) -> dict[str, torch.Tensor]:
    """init_vision_from: the LLaVA tower's tensors from a local weights file, under the
    model's keys, in the model's dtypes (strict: the file must hold the whole tower)."""
    from llama_vision.checkpoint.clip_vision import read_vision_state_dict
    from llama_vision.model.llava import LlavaConfig

    if model.args.llava is None:
        raise ValueError("init_vision_from loads a LLaVA model's CLIP / SigLIP tower; this model has no `llava:` "
                         "modality (Meta's ViT starts from init_from or llama_vision.checkpoint.init_vision_from_openclip)")
    _, tower = LlavaConfig.from_params(model.args.llava)
    name = model.args.llava.get("name", "image")
    prefix = "vision_model.vision_encoder." if name == "image" else f"{name}_encoder.vision_encoder."
    state, _ = read_vision_state_dict(path, tower)
    params = dict(model.named_parameters())
    return {prefix + k: t.to(params[prefix + k].dtype) for k, t in state.items()}


@torch.no_grad()
def apply_init(model, init) -> None:
    """The stage's `init:` start values (see InitConfig) on the trainable parameters."""
    if init.gates is not None:
        for name, p in model.named_parameters():
            if p.requires_grad and is_gate(name):
                p.fill_(init.gates)
    if init.vision_pos_embed_scale != 1.0:
        encoder = model.vision_model.vision_encoder
        tables = [encoder.positional_embedding]
        if hasattr(encoder, "pre_tile_pos_embed"):  # Meta's ViT: its tile-position tables too
            tables += [encoder.pre_tile_pos_embed.embedding, encoder.post_tile_pos_embed.embedding]
        for p in tables:
            if p.requires_grad:
                p.mul_(init.vision_pos_embed_scale)


def new_module_prefixes(model) -> tuple[str, ...]:
    """State-dict prefixes of modalities added on top of the image model (absent from an
    image-stage checkpoint)."""
    return tuple(p + "." for name, m in model.modalities.items() if name != "image" for p in m.trainable_modules)
