"""Which parameters train: declared in one place.

Groups: "decoder" (the Llama trunk: token embeddings, self-attention layers, final norm,
output), "vision" (the image encoder), "adapters" (image projection, image cross-attention
blocks, learnable special-token rows), and one group per added modality (its encoder and
adapters, e.g. "video"). Every parameter belongs to exactly one group.
"""
from __future__ import annotations

from torch import nn


def trainable_groups(model) -> dict[str, list[tuple[str, nn.Parameter]]]:
    prefixes: dict[str, list[str]] = {
        "decoder": ["text_model.tok_embeddings", "text_model.layers.", "text_model.norm.", "text_model.output."],
        "vision": ["vision_model.vision_encoder."],
    }
    for name, mod in model.modalities.items():
        prefixes["adapters" if name == "image" else name] = [p.rstrip(".") + "." for p in mod.trainable_modules]
    groups: dict[str, list] = {g: [] for g in prefixes}
    for pname, p in model.named_parameters():
        owners = [g for g, pre in prefixes.items() if any(pname.startswith(x) for x in pre)]
        if len(owners) != 1:
            raise RuntimeError(f"parameter {pname} belongs to {owners or 'no'} trainability group(s)")
        groups[owners[0]].append((pname, p))
    return groups


def set_trainable(model, decoder: bool = False, vision: bool = True, adapters: bool = True, **modalities: bool) -> dict[str, int]:
    """Set requires_grad per group (unnamed modality groups are frozen). Returns the number
    of trainable parameters per group. Frozen parameters get no gradient (grad stays None)
    and, since optimizers are built from trainable ones only, no optimizer state."""
    flags = {"decoder": decoder, "vision": vision, "adapters": adapters, **modalities}
    groups = trainable_groups(model)
    unknown = sorted(set(flags) - set(groups))
    if unknown:
        raise ValueError(f"unknown trainability group(s) {unknown}; groups: {sorted(groups)}")
    counts = {}
    for g, params in groups.items():
        on = bool(flags.get(g, False))
        for _, p in params:
            p.requires_grad_(on)
        counts[g] = sum(p.numel() for _, p in params) if on else 0
    return counts
