"""LoRA adaptors in PEFT's layout for transformers' Mllama, both ways.

    adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight  [r, in]
                                base_model.model.<HF module>.lora_B.weight  [out, r]
                                base_model.model.<HF key> (modules_to_save: whole weights)
                                base_model.model.model.language_model.embed_tokens
                                    .token_adapter.trainable_tokens_delta   [n, dim]
    adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout",
                                 "target_modules": [HF module names], "modules_to_save",
                                 "trainable_token_indices", ...}

`PeftModel.from_pretrained(MllamaForConditionalGeneration(...), dir)` loads what
`export_peft` writes, and `import_peft` puts a PEFT adapter trained with transformers onto
our model. The layouts differ where the checkpoints do (checkpoint/hf.py):

* module names: HF numbers the cross-attention layers inside one merged decoder stack
  (our `text_model.cross_attention_layers.j` is HF's `layers.{schedule[j] + j}`, and self
  layer i moves up by the cross layers before it);
* self-attention q/k: HF's weights have their rows permuted for rotate-half RoPE, so B
  (whose rows are the weight's output rows) gets the same permutation; A (input side) and
  the cross-attention q/k (no RoPE) are unchanged;
* the patch embedding is HF's Conv2d: PEFT's conv LoRA is A = Conv2d(C, r, p, stride p)
  and B = a 1x1 Conv2d, i.e. our A [r, C*p*p] reshaped to [r, C, p, p] and B to
  [out, r, 1, 1];
* scaling: PEFT's lora_alpha / r is our alpha / r (use_rslora: lora_alpha / sqrt(r), read
  as alpha = lora_alpha * sqrt(r)).

A run that also trained whole groups (image_sft_lora.yaml: adapters and ViT next to LoRA
on the trunk) is exported with those modules in `modules_to_save` (whole weights from the
run's checkpoint) and the image adapters' special-token rows as PEFT's
`trainable_token_indices` on `embed_tokens`, so transformers + peft reproduce the trained
model, not only its LoRA. Features of PEFT our LoRA does not have (DoRA, per-module
rank/alpha patterns, LoRA biases, layer replication) are refused by name.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

import model_parallel as mp
from llama_vision.model.args import ModelArgs
from llama_vision.utils.io import atomic_save_safetensors, atomic_write_text

from .hf import _key_map, hf_layer_indices, hf_to_meta, meta_to_hf, permute_from_rotate_half, permute_to_rotate_half

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "export_peft", "import_peft", "load_adaptors", "lora_to_peft",
           "peft_to_lora", "peft_to_lora_dir", "read_peft"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_EMBED = "model.language_model.embed_tokens"
_TOKENS_DELTA = f"{_EMBED}.token_adapter.trainable_tokens_delta"
_PATCH = "vision_model.vision_encoder.conv1._linear"
# adapter_config.json features with no counterpart in our LoRA: key -> its "off" values.
_UNSUPPORTED = {"use_dora": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
                "bias": ("none", None), "lora_bias": (False, None), "layer_replication": (None, []),
                "layers_to_transform": (None, []), "fan_in_fan_out": (False, None), "target_parameters": (None, [])}


def module_map(args: ModelArgs) -> dict[str, str]:
    """Our module name -> HF Mllama module name, for every weight-holding module that maps
    one to one (every linear LoRA can adapt, the patch embedding too)."""
    return {a[: -len(".weight")]: b[: -len(".weight")] for a, b in _key_map(args).items() if a.endswith(".weight")}


def _rope_heads(name: str, args: ModelArgs) -> int | None:
    """Heads whose rows HF permutes for rotate-half RoPE (text self-attention q/k), else None."""
    if name.startswith("text_model.layers.") and name.endswith(".attention.wq"):
        return args.n_heads
    if name.startswith("text_model.layers.") and name.endswith(".attention.wk"):
        return args.n_kv_heads
    return None


# --------------------------------------------------------------------------------------------
# Tensors: ours <-> PEFT's
# --------------------------------------------------------------------------------------------

def lora_to_peft(lora_state: Mapping[str, torch.Tensor], modules: list[str], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our whole (TP=1) LoRA tensors (`<module>.adaptor.A.weight` / `.B.weight`) -> PEFT's
    adapter_model.safetensors tensors."""
    names = module_map(args)
    out = {}
    for name in modules:
        if name not in names:
            raise ValueError(f"LoRA on {name}: transformers' Mllama has no counterpart module (PEFT export covers "
                             f"the Mllama architecture: trunk, cross-attention layers, ViT, projection, output)")
        a, b = lora_state[f"{name}.adaptor.A.weight"], lora_state[f"{name}.adaptor.B.weight"]
        heads = _rope_heads(name, args)
        if heads is not None:
            b = permute_to_rotate_half(b, heads)
        if name == _PATCH:
            p = args.vision_patch_size
            a, b = a.reshape(a.shape[0], args.vision_in_channels, p, p), b.reshape(*b.shape, 1, 1)
        hf = names[name]
        out[f"{PREFIX}{hf}.lora_A.weight"] = a.contiguous()
        out[f"{PREFIX}{hf}.lora_B.weight"] = b.contiguous()
    return out


def peft_to_lora(tensors: Mapping[str, torch.Tensor], args: ModelArgs, *, source: str = "adapter") \
        -> tuple[dict[str, torch.Tensor], list[str], dict[str, torch.Tensor]]:
    """PEFT adapter tensors -> (our LoRA tensors, the adapted modules in model order, the
    HF-named whole tensors it saves: modules_to_save and trainable token rows, as
    `{HF key: tensor}` / `{_TOKENS_DELTA: rows}`)."""
    ours_of = {hf: ours for ours, hf in module_map(args).items()}
    lora: dict[str, torch.Tensor] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{source}: key {key!r} does not start with {PREFIX!r} (not a PEFT adapter of a transformers model)")
        rest = key[len(PREFIX):]
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if rest.endswith(suffix):
                hf = rest[: -len(suffix)]
                if hf not in ours_of:
                    raise ValueError(f"{source}: {key}: {hf} is not a module of transformers' Mllama that maps to ours")
                lora[f"{ours_of[hf]}.adaptor.{part}.weight"] = t
                break
        else:
            if ".lora_" in rest or ".lora_magnitude_vector" in rest:
                raise ValueError(f"{source}: {key}: unsupported LoRA tensor (DoRA / embedding LoRA are not supported)")
            # modules_to_save tensors, and the base weights PEFT saves of targeted embedding
            # layers and heads (`save_embedding_layers`: <module>.base_layer.weight, what
            # PEFT loads under the adaptor, e.g. after a vocabulary resize)
            whole[rest.replace(".base_layer.", ".")] = t
    modules = [m for m in module_map(args) if f"{m}.adaptor.A.weight" in lora]
    for name in modules:
        kb = f"{name}.adaptor.B.weight"
        if kb not in lora:
            raise ValueError(f"{source}: {module_map(args)[name]}: lora_A without lora_B")
        a, b = lora[f"{name}.adaptor.A.weight"], lora[kb]
        if name == _PATCH:
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])
        heads = _rope_heads(name, args)
        if heads is not None:
            b = permute_from_rotate_half(b, heads)
        lora[f"{name}.adaptor.A.weight"], lora[kb] = a.contiguous(), b.contiguous()
    stray = sorted(k for k in lora if k.rsplit(".adaptor.", 1)[0] not in modules)
    if stray:
        raise ValueError(f"{source}: lora_B without lora_A for {stray[:4]}")
    return lora, modules, whole


def _settings_from_config(config: Mapping, source: str) -> dict:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type {config.get('peft_type')!r}; only LORA adapters can be imported")
    for key, off in _UNSUPPORTED.items():
        if config.get(key, off[0]) not in off:
            raise ValueError(f"{source}: {key}={config[key]!r} is not supported by llama_vision's LoRA "
                             f"(expected {off[0]!r})")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # PEFT scales by lora_alpha / sqrt(r); ours by alpha / r
    return {"rank": rank, "alpha": alpha, "dropout": float(config.get("lora_dropout") or 0.0)}


# --------------------------------------------------------------------------------------------
# Whole modules (modules_to_save) and the special-token rows (trainable_token_indices)
# --------------------------------------------------------------------------------------------

def _whole_modules(groups: list[str], args: ModelArgs) -> tuple[list[str], bool]:
    """HF modules_to_save for our fully trained groups, and whether the image adapters'
    special-token rows (HF: rows vocab_size.. of embed_tokens) are among them."""
    self_idx, cross_idx = hf_layer_indices(args.n_layers, args.fusion_schedule)
    modules: list[str] = []
    tokens = False
    for group in groups:
        if group == "vision":
            modules.append("model.vision_model")
        elif group == "adapters":
            modules += ["model.multi_modal_projector"] + [f"model.language_model.layers.{j}" for j in cross_idx]
            tokens = True
        elif group == "decoder":
            modules += [f"model.language_model.layers.{j}" for j in self_idx]
            modules += ["model.language_model.norm", "lm_head", _EMBED]
        else:
            raise ValueError(f"the run also trained group {group!r}, which transformers' Mllama does not have: "
                             f"a PEFT adapter cannot carry it (use the run's checkpoint)")
    if _EMBED in modules:
        tokens = False  # the whole embedding is saved, its special rows with it
    return modules, tokens


def _inside(hf_module: str, modules: list[str]) -> bool:
    return any(hf_module == m or hf_module.startswith(m + ".") for m in modules)


def _select(hf_state: Mapping[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of `hf_state` held by `modules` (or their submodules)."""
    return {k: v for k, v in hf_state.items() if _inside(k.rsplit(".", 1)[0], modules)}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _args_of(path: Path) -> ModelArgs:
    from .load import checkpoint_params
    from .meta import args_from_params

    return args_from_params(checkpoint_params(path), path)


def _is_checkpoint(path: Path) -> bool:
    from .load import checkpoint_format

    try:
        checkpoint_format(path)
        return True
    except (ValueError, FileNotFoundError, NotADirectoryError):
        return False


def export_peft(lora_dir: str | Path, out_dir: str | Path, *, checkpoint: str | Path | None = None,
                base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Our LoRA dir (lora.safetensors + lora_config.json) -> a PEFT adapter dir for
    transformers' MllamaForConditionalGeneration. checkpoint: the run's trained model
    (default: `lora_dir` itself when it is one, as a run's final/ is), read for the model
    shape and, when the run also trained whole groups, for those modules' weights.
    dtype: cast the tensors (default float32, as trained)."""
    from safetensors.torch import load_file

    from .lora import LORA_FILE, read_lora_config

    lora_dir, out = Path(lora_dir), Path(out_dir)
    config = read_lora_config(lora_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else (lora_dir if _is_checkpoint(lora_dir) else None)
    shape_from = ckpt or (Path(config["base_checkpoint"]) if config.get("base_checkpoint") else None)
    if shape_from is None:
        raise ValueError(f"{lora_dir}: not a checkpoint dir and no base_checkpoint recorded: pass checkpoint= (the model's dir)")
    args = _args_of(shape_from)
    tensors = lora_to_peft(load_file(str(lora_dir / LORA_FILE)), list(config["modules"]), args)
    names = module_map(args)
    targets = [names[m] for m in config["modules"]]
    modules_to_save, tokens = _whole_modules(list(config.get("also_trained") or []), args)
    conflict = [t for t in targets if _inside(t, modules_to_save)]
    if conflict:
        raise ValueError(f"{lora_dir}: {conflict[:3]} carry LoRA inside modules the run trained whole "
                         f"({config.get('also_trained')}): PEFT cannot hold both; export the merged checkpoint instead")
    if modules_to_save or tokens:
        if ckpt is None:
            raise ValueError(f"{lora_dir}: the run also trained {config['also_trained']}: pass checkpoint= (its final/ dir)")
        from .load import load_model

        full = meta_to_hf(load_model(ckpt).state_dict(), args)
        tensors.update({PREFIX + k: v for k, v in _select(full, modules_to_save).items()})
        if tokens:
            tensors[PREFIX + _TOKENS_DELTA] = full[f"{_EMBED}.weight"][args.vocab_size:].clone()
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(config["rank"]),
        "lora_alpha": float(config["alpha"]),
        "lora_dropout": float(config["dropout"]),
        "target_modules": targets,
        "modules_to_save": modules_to_save or None,
        "trainable_token_indices": ({"embed_tokens": list(range(args.vocab_size, args.vocab_size + args.n_learnable_embeddings))}
                                    if tokens else None),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(adapter_config, indent=2) + "\n")
    return out


def read_peft(peft_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors tensors) of a PEFT adapter dir."""
    from safetensors.torch import load_file

    peft_dir = Path(peft_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (peft_dir / name).is_file():
            raise FileNotFoundError(f"{peft_dir / name} not found (a PEFT adapter dir holds {ADAPTER_WEIGHTS} + "
                                    f"{ADAPTER_CONFIG}; adapter_model.bin is pickled and not read)")
    return json.loads((peft_dir / ADAPTER_CONFIG).read_text()), load_file(str(peft_dir / ADAPTER_WEIGHTS))


def _peft_parts(peft_dir: Path, args: ModelArgs):
    """-> (settings, our LoRA tensors, modules, our whole tensors {key: full tensor})."""
    config, tensors = read_peft(peft_dir)
    source = str(peft_dir / ADAPTER_WEIGHTS)
    settings = _settings_from_config(config, str(peft_dir / ADAPTER_CONFIG))
    lora, modules, whole_hf = peft_to_lora(tensors, args, source=source)
    rows = whole_hf.pop(_TOKENS_DELTA, None)
    whole = hf_to_meta(whole_hf, args, partial=True)
    if rows is not None:
        indices = list((config.get("trainable_token_indices") or {}).get("embed_tokens", []))
        want = list(range(args.vocab_size, args.vocab_size + args.n_learnable_embeddings))
        if indices != want:
            raise ValueError(f"{source}: trainable tokens {indices[:10]} of embed_tokens; only the special-token rows "
                             f"{want[0]}..{want[-1]} (our learnable_embedding) can be imported")
        whole["text_model.learnable_embedding.weight"] = rows
    return settings, lora, modules, whole


@torch.no_grad()
def import_peft(model: nn.Module, peft_dir: str | Path) -> list[str]:
    """Put a PEFT adapter of transformers' Mllama onto `model` (our base model, any TP
    degree: each rank takes its slices): LoRA adaptors on the modules it targets, unmerged,
    and the whole weights of its modules_to_save / trainable token rows copied in. Returns
    the adapted modules' names."""
    from llama_vision.model.lora import apply_lora, lora_modules

    peft_dir = Path(peft_dir)
    settings, lora, modules, whole = _peft_parts(peft_dir, model.args)
    if lora_modules(model):
        raise ValueError("the model already has LoRA adaptors: import a PEFT adapter onto a base model")
    apply_lora(model, modules, **settings)
    params = dict(model.named_parameters())
    for key, t in mp.shard_state_dict(model, {**lora, **whole}).items():
        if key not in params:
            raise ValueError(f"{peft_dir}: {key} is not a parameter of this model")
        p = params[key]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{peft_dir}: {key} has shape {tuple(t.shape)} for this rank, the model {tuple(p.shape)}")
        p.copy_(t.to(p.dtype))
    return modules


def load_adaptors(model: nn.Module, path: str | Path) -> list[str]:
    """LoRA onto a base `model` from `path`: our LoRA dir (lora_config.json) or a PEFT
    adapter dir (adapter_config.json). Returns the adapted modules' names."""
    from .lora import LORA_CONFIG, load_lora

    path = Path(path)
    if (path / LORA_CONFIG).is_file():
        return load_lora(model, path)
    if (path / ADAPTER_CONFIG).is_file():
        return import_peft(model, path)
    raise FileNotFoundError(f"{path} holds neither {LORA_CONFIG} (a llama_vision LoRA dir) nor {ADAPTER_CONFIG} (a PEFT adapter)")


def peft_to_lora_dir(peft_dir: str | Path, out_dir: str | Path, base: str | Path) -> Path:
    """A PEFT adapter dir -> our LoRA dir over `base` (a Meta or HF checkpoint dir). With
    modules_to_save / trainable tokens, `out_dir` also gets the base with those weights
    (a Meta checkpoint) and names itself as the base the adaptors belong to."""
    from .load import load_model
    from .lora import save_lora
    from .meta import save_meta_checkpoint

    peft_dir, out, base = Path(peft_dir), Path(out_dir), Path(base)
    model = load_model(base)
    modules = import_peft(model, peft_dir)
    config = json.loads((peft_dir / ADAPTER_CONFIG).read_text())
    base_checkpoint = base
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        from llama_vision.model.lora import lora_state_dict

        state = {k: v for k, v in model.state_dict().items() if k not in lora_state_dict(model)}
        save_meta_checkpoint(state, model.args, out)
        base_checkpoint = out
    return save_lora(model, out, targets=modules, base_checkpoint=base_checkpoint,
                     extra={"imported_from": str(peft_dir.resolve())})
