"""Every "wrap the model" decision of training, applied from outside the model code (the
torchtitan shape: `parallelize(model, cfg)` after building, before the optimizer). Today:
activation checkpointing; FSDP2 and torch.compile slot in here.

Tensor parallelism is not applied here: fairscale's layers are chosen when the model is
built inside initialised model-parallel groups (model_parallel.layers' factories)."""
from __future__ import annotations

from torch import nn

from .train_config import TrainConfig

__all__ = ["apply_activation_checkpointing", "parallelize"]


def parallelize(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Apply the config's wrapping decisions to `model` in place; returns it."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer layer's activations in the backward instead of keeping
    them: every layer stack that supports it (the decoder, the image encoder's local and
    global transformers: modules with a `checkpoint_activations` switch) checkpoints layer
    by layer in training mode. Parameter names and state-dict keys are unchanged (no
    wrapper modules). Returns the number of stacks switched on."""
    stacks = [m for m in model.modules() if hasattr(m, "checkpoint_activations")]
    for m in stacks:
        m.checkpoint_activations = True
    return len(stacks)
