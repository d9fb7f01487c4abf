"""Every "wrap the model" decision of training, applied from outside the model code (the
torchtitan shape: `parallelize(model, cfg)` after building and casting, before the
optimizer): activation checkpointing per module kind, and FSDP2 over the data-parallel
ranks (`data_parallel: fsdp`).

Tensor parallelism is not applied here: fairscale's layers are chosen when the model is
built inside initialised model-parallel groups (model_parallel.layers' factories). A LLaVA
model's tower and projector are plain torch modules: replicated, every TP rank runs them
whole on the same batch (their gradients arrive whole through the decoder's input, so they
stay equal on every TP rank)."""
from __future__ import annotations

import warnings

from torch import nn

import model_parallel as mp

from .train_config import TrainConfig

__all__ = ["CHECKPOINT_KINDS", "apply_activation_checkpointing", "encoder_units", "fsdp_units", "parallelize", "uses_fsdp"]

# Module kind -> the class names whose `checkpoint_activations` switch it sets.
CHECKPOINT_KINDS = {
    "decoder": ("TextDecoder",),
    "vision": ("ImageTransformer", "ClipVisionTower"),  # Meta's ViT stacks; a LLaVA model's CLIP / SigLIP tower
    "adapters": ("TextDecoder",),  # the switch `checkpoint_adapters` of the decoder (if it has adapter blocks)
    "perceiver": ("TemporalAggregator",),
}


# FSDP2 warns when a unit returns a view (an in-place op on it would skip the unit's
# pre-backward hook). A LLaVA tower's output is one (the class token sliced off), and so is
# its projector's (a Linear over [crops, tokens, width]); LlavaVisionModel only splits and
# copies them, never modifies them in place.
_BENIGN_VIEW_WARNING = r"FSDP2-wrapped module \(FSDP(ClipVisionTower|Projector)\) returned a view tensor"


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
        warnings.filterwarnings("ignore", message=_BENIGN_VIEW_WARNING)
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
                if kind == "adapters" and not getattr(m, "adapter_schedules", None):
                    continue  # a decoder without adapter blocks (a LLaVA model): nothing to recompute
                setattr(m, attr, True)
                switched += 1
    return switched


def fsdp_units(model: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, str]]]:
    """The FSDP units of a VisionLanguageModel, innermost first, and the non-forward
    methods that read parameters.

    Units: every decoder layer and adapter block (every modality); each media encoder's
    own units (`encoder_units`: Meta's ViT layers and its vision projection, a LLaVA
    tower's blocks and its projector, the video aggregator's perceiver layers); the token
    embeddings and the output head (called outside their parent's forward, and big); then
    the parents holding what is left (the encoders: the ViT's / tower's embeddings and
    norms, a LLaVA model's image_newline, the video aggregator's latents; the decoder: its
    final norm, learnable table and placeholder rows). The root gets nothing of its own.
    The encoders are the root's children other than the decoder that hold parameters:
    `vision_model` (Meta's VisionModel or a LLaVA `LlavaVisionModel`) and the encoders of
    added modalities (`<name>_encoder`, the video aggregator).
    Forward methods: each adapter's `compute_kv` (the media K/V, computed once per batch
    outside the block's forward) and the model's `prepare_media`."""
    text = model.text_model
    adapters = [blk for name in text.adapter_schedules for blk in text.adapters(name)]
    encoders = [m for m in model.children() if m is not text and any(True for _ in m.parameters())]
    units: list[nn.Module] = []
    units += list(text.layers)
    units += adapters
    for enc in encoders:
        units += encoder_units(enc)
    # The learnable table stays in the decoder's unit: `embed` reads it only for batches
    # holding a new token id, and a unit's forward must not depend on the data (a rank
    # calling it while another does not would pair their all-gathers wrongly).
    units += [text.tok_embeddings, text.output]
    units += encoders + [text]
    forward_methods = [(blk, "compute_kv") for blk in adapters] + [(model, "prepare_media")]
    return units, forward_methods


def encoder_units(encoder: nn.Module) -> list[nn.Module]:
    """A media encoder's FSDP units below itself, innermost first (the encoder itself is
    the unit holding what is left):

    * an encoder that describes its pieces (`block_modules()`): each piece, after that
      piece's own units if it describes its pieces too. Meta's VisionModel gives the ViT's
      local and global transformer layers, then the vision projection (called on the
      concatenated features). A LLaVA `LlavaVisionModel` gives its tower and its
      projector, the tower (`ClipVisionTower`) its transformer blocks: so every tower
      block, the tower (its embeddings and norms), the projector. Each of them returns a
      tensor, on which FSDP hooks its unshard for backward (the LlavaVisionModel's own
      unit, whose output is a MediaTokens, keeps only image_newline, which backward never
      reads);
    * any other encoder: its `layers` if it has them (the video aggregator's perceiver
      layers), else nothing (one unit)."""
    if hasattr(encoder, "block_modules"):
        units: list[nn.Module] = []
        for piece in encoder.block_modules():
            if hasattr(piece, "block_modules"):
                units += encoder_units(piece)
            units.append(piece)
        return units
    layers = getattr(encoder, "layers", None)
    return list(layers) if layers is not None else []
