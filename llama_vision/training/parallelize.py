"""Every "wrap the model" decision of training, applied from outside the model code (the
torchtitan shape: `parallelize(model, cfg)` after building and casting, before the
optimizer): activation checkpointing per module kind, and FSDP2 over the data-parallel
ranks (`data_parallel: fsdp`).

Tensor parallelism is not applied here: fairscale's layers are chosen when the model is
built inside initialised model-parallel groups (model_parallel.layers' factories)."""
from __future__ import annotations

from torch import nn

import model_parallel as mp

from .train_config import TrainConfig

__all__ = ["CHECKPOINT_KINDS", "apply_activation_checkpointing", "fsdp_units", "parallelize", "uses_fsdp"]

# Module kind -> the class names whose `checkpoint_activations` switch it sets.
CHECKPOINT_KINDS = {
    "decoder": ("TextDecoder",),
    "vision": ("ImageTransformer",),
    "adapters": ("TextDecoder",),  # the switch `checkpoint_adapters` of the decoder
    "perceiver": ("TemporalAggregator",),
}


def uses_fsdp(cfg: TrainConfig) -> bool:
    """FSDP2 is applied when asked for and there is more than one DP rank."""
    return cfg.data_parallel == "fsdp" and mp.dp_size() > 1


def parallelize(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Apply the config's wrapping decisions to `model` in place; returns it. Call after
    the precision policy cast the parameters and the model is on its device."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if uses_fsdp(cfg):
        from .precision import DTYPES

        units, forward_methods = fsdp_units(model)
        mp.shard_data_parallel(
            model, units, dp_mesh=mp.device_mesh()["dp"], forward_methods=forward_methods, reduce_dtype=DTYPES[cfg.reduce_dtype]
        )
    return model


def apply_activation_checkpointing(model: nn.Module, kinds: bool | list[str] = True) -> int:
    """Recompute activations in the backward instead of keeping them, for the module kinds
    asked (True: all of CHECKPOINT_KINDS): each stack checkpoints layer by layer in
    training mode. Parameter names and state-dict keys are unchanged (no wrapper modules).
    Returns the number of switches turned on."""
    wanted = list(CHECKPOINT_KINDS) if kinds is True else list(kinds)
    unknown = sorted(set(wanted) - set(CHECKPOINT_KINDS))
    if unknown:
        raise ValueError(f"activation_checkpointing: unknown module kinds {unknown}; known: {sorted(CHECKPOINT_KINDS)}")
    switched = 0
    for kind in wanted:
        attr = "checkpoint_adapters" if kind == "adapters" else "checkpoint_activations"
        for m in model.modules():
            if type(m).__name__ in CHECKPOINT_KINDS[kind] and hasattr(m, attr):
                setattr(m, attr, True)
                switched += 1
    return switched


def fsdp_units(model: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, str]]]:
    """The FSDP units of a VisionLanguageModel, innermost first, and the non-forward
    methods that read parameters.

    Units: every decoder layer, adapter block (every modality), ViT layer and perceiver
    layer (the units that all-gather together and are freed after use); the leaf modules
    that are called outside their parent's forward or are big (the token embeddings, the
    output head, the vision projection); then the parents holding what is left (the ViT's
    embeddings and norms, the video aggregator's latents, the decoder's final norm,
    learnable table and placeholder rows). The root gets nothing of its own.
    Forward methods: each adapter's `compute_kv` (the media K/V, computed once per batch
    outside the block's forward) and the model's `prepare_media`."""
    text, vision = model.text_model, model.vision_model
    adapters = [blk for name in text.adapter_schedules for blk in text.adapters(name)]
    units: list[nn.Module] = []
    units += list(text.layers)
    units += adapters
    encoder = vision.vision_encoder
    units += list(encoder.transformer.resblocks) + list(encoder.global_transformer.resblocks)
    encoders = [m for m in model.children() if m is not text and m is not vision and any(True for _ in m.parameters())]
    for enc in encoders:  # added modalities' encoders (the video aggregator): their layers first
        units += [blk for layers in (getattr(enc, "layers", None),) if layers is not None for blk in layers]
    # The learnable table stays in the decoder's unit: `embed` reads it only for batches
    # holding a new token id, and a unit's forward must not depend on the data (a rank
    # calling it while another does not would pair their all-gathers wrongly).
    units += [text.tok_embeddings, text.output, vision.vision_projection]
    units += [vision] + encoders + [text]
    forward_methods = [(blk, "compute_kv") for blk in adapters] + [(model, "prepare_media")]
    return units, forward_methods
