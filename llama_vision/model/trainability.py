"""Which parameters train: declared in one place.

Groups: "decoder" (the Llama trunk: token embeddings, self-attention layers, final norm,
output), "vision" (the image encoder), "adapters" (image projection, image cross-attention
blocks, learnable special-token rows), one group per added modality (its encoder and
adapters, e.g. "video"), and "lora" (every LoRA adaptor's A and B, wherever its linear
sits: llama_vision.model.lora; empty without LoRA). Every parameter belongs to exactly one
group: a LoRA'd linear's base weight stays in its own group.
"""
from __future__ import annotations

from torch import nn

from .lora import LoraAdapter


def trainable_groups(model) -> dict[str, list[tuple[str, nn.Parameter]]]:
    prefixes: dict[str, list[str]] = {
        "decoder": ["text_model.tok_embeddings", "text_model.layers.", "text_model.norm.", "text_model.output."],
        "vision": ["vision_model.vision_encoder."],
    }
    for name, mod in model.modalities.items():
        prefixes["adapters" if name == "image" else name] = [p.rstrip(".") + "." for p in mod.trainable_modules]
    groups: dict[str, list] = {g: [] for g in prefixes}
    groups["lora"] = []
    lora = {id(p) for m in model.modules() if isinstance(m, LoraAdapter) for p in m.parameters()}
    for pname, p in model.named_parameters():
        if id(p) in lora:
            groups["lora"].append((pname, p))
            continue
        # (a prefix also names a parameter itself, e.g. a modality's `image_newline`)
        owners = [g for g, pre in prefixes.items() if any(pname.startswith(x) or pname == x[:-1] for x in pre)]
        if len(owners) != 1:
            raise RuntimeError(f"parameter {pname} belongs to {owners or 'no'} trainability group(s)")
        groups[owners[0]].append((pname, p))
    return groups


def set_trainable(model, decoder: bool = False, vision: bool = True, adapters: bool = True, lora: bool = True,
                  **modalities: bool) -> dict[str, int]:
    """Set requires_grad per group (unnamed modality groups are frozen; `lora`, the LoRA
    adaptors, trains by default: a model has them only when LoRA was asked for). Returns
    the number of trainable parameters per group. Frozen parameters get no gradient (grad
    stays None) and, since optimizers are built from trainable ones only, no optimizer
    state."""
    flags = {"decoder": decoder, "vision": vision, "adapters": adapters, "lora": lora, **modalities}
    groups = trainable_groups(model)
    unknown = sorted(set(flags) - set(groups))
    if unknown:
        raise ValueError(f"unknown trainability group(s) {unknown}; groups: {sorted(groups)}")
    # Parameters no forward reaches (a CLIP tower's blocks after its feature layer:
    # `unused_parameter_names`) never train: no optimizer state, no gradient DDP waits for.
    unused = {id(p) for m in model.modules() if hasattr(m, "unused_parameter_names")
              for n in m.unused_parameter_names() for p in [m.get_parameter(n)]}
    counts = {}
    for g, params in groups.items():
        on = bool(flags.get(g, False))
        for _, p in params:
            p.requires_grad_(on and id(p) not in unused)
        counts[g] = sum(p.numel() for _, p in params if id(p) not in unused) if on else 0
    return counts
