"""CLIP / SigLIP vision-tower weights (llama_vision.model.clip_vision) from and to the
layouts they ship in, and loading a tower from a local file.

Layouts (every one may sit under a prefix, found from the keys; keys outside it -- a text
tower, a language model, a projector -- are left alone):

transformers CLIPVisionModel / SiglipVisionModel (ours <- HF):
    patch_embed.{weight,bias}        <- embeddings.patch_embedding.{weight,bias} (bias: SigLIP)
    class_embedding                  <- embeddings.class_embedding               (CLIP)
    positional_embedding             <- embeddings.position_embedding.weight
    ln_pre                           <- pre_layrnorm                             (CLIP; sic)
    blocks.N.ln_1 / ln_2             <- encoder.layers.N.layer_norm1 / layer_norm2
    blocks.N.attn.{q,k,v,out}_proj   <- encoder.layers.N.self_attn.{q,k,v,out}_proj
    blocks.N.mlp.fc1 / fc2           <- encoder.layers.N.mlp.fc1 / fc2
    ln_post                          <- post_layernorm
  Dropped on the way in: `embeddings.position_ids` (a buffer old checkpoints saved) and
  SigLIP's attention-pooling `head.*` (the pooled embedding; LLaVA-style models use tokens).
  Prefixes seen in practice: "" (transformers 5's CLIPVisionModel, in memory and as it
  saves), "vision_model." (Hub CLIP/SigLIP files, CLIPModel), "vision_tower.vision_model."
  (Hub LLaVA files, llava-hf/*), "vision_tower." (transformers 5.23 *saves* LLaVA so),
  "model.vision_tower." (transformers 5's LlavaForConditionalGeneration in memory),
  "model.vision_tower.vision_tower.vision_model." (original LLaVA / LLaVA-OneVision repos).
  `*_to_hf(..., prefix=...)` writes any of them; "vision_tower.vision_model." is what both
  transformers 4.x and 5.x read in a LLaVA file.

open_clip VisionTransformer, CLIP kind only (ours <- open_clip, usually under "visual."):
    patch_embed.weight               <- conv1.weight
    class_embedding, positional_embedding, ln_pre, ln_post  <- same names
    blocks.N.attn.{q,k,v}_proj       <- transformer.resblocks.N.attn.in_proj_{weight,bias} (split in 3, q k v)
    blocks.N.attn.out_proj           <- transformer.resblocks.N.attn.out_proj
    blocks.N.ln_1 / ln_2             <- transformer.resblocks.N.ln_1 / ln_2
    blocks.N.mlp.fc1 / fc2           <- transformer.resblocks.N.mlp.c_fc / c_proj
  LayerScale (ls_1 / ls_2 .gamma) is folded exactly into out_proj / fc2 (weight rows and
  bias). `proj` (the contrastive projection) is dropped. The activation and head count are
  not in the weights: the config says them (OpenAI's ViT-L-14-336 is QuickGELU: open_clip's
  "ViT-L-14-336-quickgelu" / `quick_gelu=True`).

ours: the tower's own state dict (ClipVisionTower.state_dict()).

Every conversion is strict: a key of the tower the checkpoint lacks, a key under the
prefix nobody understands, or a shape that does not fit the config raises a ValueError
naming them (and the file, when loading one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from llama_vision.model.clip_vision import ClipVisionConfig, ClipVisionTower
from llama_vision.utils.io import CheckpointFormatError

Tensor = torch.Tensor

LAYOUTS = ("hf", "open_clip", "ours")
# Each layout is recognised by one key (anchor) under its prefix, plus a sibling.
_ANCHORS = {
    "hf": ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"),
    "open_clip": ("conv1.weight", "transformer.resblocks.0.attn.in_proj_weight"),
    "ours": ("patch_embed.weight", "positional_embedding"),
}
_HF_TOP = {
    "patch_embed.weight": "embeddings.patch_embedding.weight",
    "patch_embed.bias": "embeddings.patch_embedding.bias",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_HF_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2",
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj", "attn.out_proj": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_HF_UNUSED = ("embeddings.position_ids", "head.")  # buffer of old files; SigLIP's pooling head
_OPEN_CLIP_UNUSED = ("proj",)


# --- the tower's expected keys ----------------------------------------------------------------
def expected_shapes(config: ClipVisionConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of `ClipVisionTower(config).state_dict()` (built on the meta device:
    no memory, no init)."""
    with torch.device("meta"):
        tower = ClipVisionTower(config)
    return {k: tuple(v.shape) for k, v in tower.state_dict().items()}


def check_vision_state_dict(state_dict: Mapping[str, Tensor], config: ClipVisionConfig, source: str = "state dict") -> None:
    """Raise a ValueError naming every missing / unexpected key and wrong shape."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k} {list(state_dict[k].shape)} != {list(s)}" for k, s in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != s]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise ValueError(
            f"{source} does not fit the {config.kind} tower (width {config.width}, {config.layers} layers, "
            f"{config.image_size}px / patch {config.patch_size}): " + "; ".join(problems)
        )


def _few(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


# --- prefixes and layouts ---------------------------------------------------------------------
def find_prefixes(keys: Iterable[str], layout: str) -> list[str]:
    """Every prefix under which `keys` hold a tower of `layout` (anchor + sibling key)."""
    anchor, sibling = _ANCHORS[layout]
    keys = set(keys)
    found = []
    for k in keys:
        if k == anchor or k.endswith("." + anchor):
            prefix = k[: len(k) - len(anchor)]
            if prefix + sibling in keys:
                found.append(prefix)
    return sorted(found)


def detect_vision_layout(keys: Iterable[str], prefix: str | None = None) -> tuple[str, str]:
    """(layout, prefix) of the one vision tower in `keys`; ValueError when there is none or
    several (then pass `prefix`)."""
    keys = list(keys)
    hits = [(layout, p) for layout in LAYOUTS for p in find_prefixes(keys, layout)]
    if prefix is not None:
        hits = [h for h in hits if h[1] == prefix]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        where = f" under prefix {prefix!r}" if prefix is not None else ""
        raise ValueError(
            f"no CLIP/SigLIP vision tower{where} in these keys (looked for transformers "
            f"'embeddings.patch_embedding.weight', open_clip 'conv1.weight', ours 'patch_embed.weight'); "
            f"keys start {_few(sorted(keys), 8)}"
        )
    raise ValueError(f"several vision towers in these keys, pass prefix= one of: {[f'{l}:{p!r}' for l, p in hits]}")


def _under(state_dict: Mapping[str, Tensor], layout: str, prefix: str | None) -> dict[str, Tensor]:
    """The keys under the tower's prefix, prefix stripped."""
    if prefix is None:
        prefixes = find_prefixes(state_dict, layout)
        if len(prefixes) != 1:
            anchor = _ANCHORS[layout][0]
            raise ValueError(
                f"{'no' if not prefixes else 'several'} {layout} vision tower(s) in the state dict "
                f"(key ending {anchor!r}{'' if not prefixes else ': prefixes ' + str(prefixes)}); pass prefix="
            )
        prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _split_known(sd: dict[str, Tensor], unused: tuple[str, ...], dropped: list[str] | None) -> None:
    """Remove (and record) the keys a layout has that the tower has no use for."""
    for k in sorted(sd):
        if k.startswith(unused):
            del sd[k]
            if dropped is not None:
                dropped.append(k)


# --- transformers -----------------------------------------------------------------------------
def _hf_names(config: ClipVisionConfig) -> dict[str, str]:
    """Our key -> transformers' key, for every key of the tower."""
    names = {}
    for ours in expected_shapes(config):
        if ours.startswith("blocks."):
            _, i, rest = ours.split(".", 2)
            module, param = rest.rsplit(".", 1)
            names[ours] = f"encoder.layers.{i}.{_HF_BLOCK[module]}.{param}"
        else:
            names[ours] = _HF_TOP[ours]
    return names


def _from_hf(state_dict, config, kind, prefix, dropped) -> dict[str, Tensor]:
    if config.kind != kind:
        raise ValueError(f"{kind} converter given a {config.kind} config")
    sd = _under(state_dict, "hf", prefix)
    _split_known(sd, _HF_UNUSED, dropped)
    out, missing = {}, []
    for ours, hf in _hf_names(config).items():
        if hf in sd:
            out[ours] = sd.pop(hf)
        else:
            missing.append(hf)
    if missing or sd:
        raise ValueError(
            f"transformers {kind} vision state dict does not fit the config ({config.layers} layers): "
            + "; ".join(x for x in (missing and f"missing {_few(missing)}", sd and f"unexpected {_few(sorted(sd))}") if x)
        )
    check_vision_state_dict(out, config, f"transformers {kind} vision state dict")
    return out


def _to_hf(state_dict, config, kind, prefix) -> dict[str, Tensor]:
    if config.kind != kind:
        raise ValueError(f"{kind} converter given a {config.kind} config")
    check_vision_state_dict(state_dict, config, "tower state dict")
    return {prefix + hf: state_dict[ours] for ours, hf in _hf_names(config).items()}


def clip_vision_from_hf(state_dict: Mapping[str, Tensor], config: ClipVisionConfig, *, prefix: str | None = None,
                        dropped: list[str] | None = None) -> dict[str, Tensor]:
    """transformers CLIPVisionModel keys (under any prefix: found from the keys unless
    given) -> our tower's state dict. Tensors are shared, not copied. `dropped`, when given,
    collects the keys deliberately left out (module docstring)."""
    return _from_hf(state_dict, config, "clip", prefix, dropped)


def siglip_vision_from_hf(state_dict: Mapping[str, Tensor], config: ClipVisionConfig, *, prefix: str | None = None,
                          dropped: list[str] | None = None) -> dict[str, Tensor]:
    """transformers SiglipVisionModel keys -> our tower's state dict (the pooling head
    `head.*`, if present, is dropped)."""
    return _from_hf(state_dict, config, "siglip", prefix, dropped)


def clip_vision_to_hf(state_dict: Mapping[str, Tensor], config: ClipVisionConfig, *, prefix: str = "") -> dict[str, Tensor]:
    """Our tower's state dict -> transformers CLIPVisionModel keys under `prefix` ("" loads
    into transformers 5's CLIPVisionModel; "vision_tower.vision_model." for a LLaVA file)."""
    return _to_hf(state_dict, config, "clip", prefix)


def siglip_vision_to_hf(state_dict: Mapping[str, Tensor], config: ClipVisionConfig, *, prefix: str = "") -> dict[str, Tensor]:
    """Our tower's state dict -> transformers SiglipVisionModel keys under `prefix`. No
    pooling head is written: the HF config needs vision_use_head=False (as OneVision's)."""
    return _to_hf(state_dict, config, "siglip", prefix)


def vision_from_hf(state_dict, config, **kw) -> dict[str, Tensor]:
    """clip_vision_from_hf or siglip_vision_from_hf, by config.kind."""
    return (clip_vision_from_hf if config.kind == "clip" else siglip_vision_from_hf)(state_dict, config, **kw)


def vision_to_hf(state_dict, config, **kw) -> dict[str, Tensor]:
    """clip_vision_to_hf or siglip_vision_to_hf, by config.kind."""
    return (clip_vision_to_hf if config.kind == "clip" else siglip_vision_to_hf)(state_dict, config, **kw)


# --- open_clip --------------------------------------------------------------------------------
def clip_vision_from_open_clip(state_dict: Mapping[str, Tensor], config: ClipVisionConfig, *, prefix: str | None = None,
                               dropped: list[str] | None = None) -> dict[str, Tensor]:
    """open_clip VisionTransformer keys (a whole open_clip CLIP state dict: its `visual.`
    keys are found) -> our tower's state dict. CLIP kind only (open_clip's SigLIP models are
    timm trunks, another layout)."""
    if config.kind != "clip":
        raise ValueError("open_clip VisionTransformer weights are a CLIP tower; config.kind is " + repr(config.kind))
    sd = _under(state_dict, "open_clip", prefix)
    _split_known(sd, _OPEN_CLIP_UNUSED, dropped)
    out: dict[str, Tensor] = {}
    missing: list[str] = []

    def take(key):
        if key in sd:
            return sd.pop(key)
        missing.append(key)
        return None

    out["patch_embed.weight"] = take("conv1.weight")
    for k in ("class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias"):
        out[k] = take(k)
    for i in range(config.layers):
        src, dst = f"transformer.resblocks.{i}.", f"blocks.{i}."
        w_in, b_in = take(src + "attn.in_proj_weight"), take(src + "attn.in_proj_bias")
        if w_in is not None and b_in is not None:
            # nn.MultiheadAttention packs [q; k; v] along the output dim
            for name, w, b in zip(("q_proj", "k_proj", "v_proj"), w_in.chunk(3, dim=0), b_in.chunk(3, dim=0)):
                out[dst + f"attn.{name}.weight"], out[dst + f"attn.{name}.bias"] = w, b
        wo, bo = take(src + "attn.out_proj.weight"), take(src + "attn.out_proj.bias")
        w2, b2 = take(src + "mlp.c_proj.weight"), take(src + "mlp.c_proj.bias")
        # LayerScale: gamma * (W x + b) == (gamma[:, None] * W) x + gamma * b, exact
        if src + "ls_1.gamma" in sd and wo is not None and bo is not None:
            g = sd.pop(src + "ls_1.gamma")
            wo, bo = wo * g[:, None], bo * g
        if src + "ls_2.gamma" in sd and w2 is not None and b2 is not None:
            g = sd.pop(src + "ls_2.gamma")
            w2, b2 = w2 * g[:, None], b2 * g
        out[dst + "attn.out_proj.weight"], out[dst + "attn.out_proj.bias"] = wo, bo
        out[dst + "mlp.fc2.weight"], out[dst + "mlp.fc2.bias"] = w2, b2
        out[dst + "mlp.fc1.weight"], out[dst + "mlp.fc1.bias"] = take(src + "mlp.c_fc.weight"), take(src + "mlp.c_fc.bias")
        for ln in ("ln_1", "ln_2"):
            out[dst + f"{ln}.weight"], out[dst + f"{ln}.bias"] = take(src + f"{ln}.weight"), take(src + f"{ln}.bias")
    if missing or sd:
        hint = " (ln_pre: a no_ln_pre model is not a CLIP tower)" if any(m.startswith("ln_pre") for m in missing) else ""
        raise ValueError(
            f"open_clip vision state dict does not fit the config ({config.layers} layers){hint}: "
            + "; ".join(x for x in (missing and f"missing {_few(missing)}", sd and f"unexpected {_few(sorted(sd))}") if x)
        )
    check_vision_state_dict(out, config, "open_clip vision state dict")
    return out


def _from_ours(state_dict, config, prefix, dropped) -> dict[str, Tensor]:
    sd = _under(state_dict, "ours", prefix)
    check_vision_state_dict(sd, config, "tower state dict")
    return sd


_CONVERTERS = {"hf": vision_from_hf, "open_clip": clip_vision_from_open_clip, "ours": _from_ours}


def convert_vision_state_dict(state_dict: Mapping[str, Tensor], config: ClipVisionConfig, *, layout: str | None = None,
                              prefix: str | None = None, dropped: list[str] | None = None) -> dict[str, Tensor]:
    """Any supported layout (detected from the keys unless given) -> our tower's state dict."""
    if layout is None:
        layout, prefix = detect_vision_layout(state_dict, prefix)
    if layout == "ours":
        return _from_ours(state_dict, config, prefix, dropped)
    return _CONVERTERS[layout](state_dict, config, prefix=prefix, dropped=dropped)


# --- files ------------------------------------------------------------------------------------
@dataclass
class VisionCheckpointInfo:
    """What `read_vision_state_dict` found in a file."""

    files: list[str]
    layout: str  # "hf" | "open_clip" | "ours"
    prefix: str
    dropped: list[str] = field(default_factory=list)  # keys under the prefix deliberately not loaded
    ignored: int = 0  # keys outside the prefix (other parts of a bigger checkpoint)


def _weight_files(path: Path) -> list[Path]:
    if path.is_dir():
        from .hf_io import safetensors_files  # an HF dir: model.safetensors or its shards

        return safetensors_files(path)
    if not path.is_file():
        raise FileNotFoundError(f"no vision weights at {path}")
    return [path]


def _read_keys(files: list[Path]) -> tuple[dict[str, Path], dict[Path, dict]]:
    """key -> file, and the already-loaded contents of torch files."""
    from safetensors import SafetensorError, safe_open

    where: dict[str, Path] = {}
    loaded: dict[Path, dict] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as h:
                    keys = list(h.keys())
            except (SafetensorError, OSError) as e:
                raise CheckpointFormatError(f"{f} is not a readable safetensors file: {e}") from e
        else:
            loaded[f] = _torch_load(f)
            keys = list(loaded[f])
        for k in keys:
            if k in where:
                raise CheckpointFormatError(f"{f} repeats key {k!r} also in {where[k]}")
            where[k] = f
    return where, loaded


def _torch_load(f: Path) -> dict[str, Tensor]:
    """A .pt / .bin file of plain tensors: torch.load(weights_only=True), never unpickling
    code. A {"state_dict": {...}} wrapper (training checkpoints) is opened."""
    import pickle

    try:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) torch files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointFormatError(
            f"{f} holds pickled Python objects, not only tensors; it is refused rather than unpickled "
            f"(weights_only=True): save its state_dict() with safetensors or torch.save instead ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # noqa: BLE001 -- any unreadable file: say which
        raise CheckpointFormatError(f"{f} is not a readable torch weights file: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointFormatError(f"{f} is not a state dict (str -> tensor); got {type(obj).__name__}")
    return obj


def read_vision_state_dict(path: str | Path, config: ClipVisionConfig, *, prefix: str | None = None
                           ) -> tuple[dict[str, Tensor], VisionCheckpointInfo]:
    """(our tower's state dict, what was found) from a LOCAL file: safetensors, a .pt/.bin
    of plain tensors, or an HF dir of safetensors. Layout and prefix come from the keys
    (pass `prefix` when a file holds several towers); only the tower's keys are read from
    safetensors. Strict: ValueError naming the file and the missing / unexpected keys."""
    path = Path(path)
    files = _weight_files(path)
    where, loaded = _read_keys(files)
    source = str(path)
    try:
        layout, prefix = detect_vision_layout(where, prefix)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    wanted = [k for k in where if k.startswith(prefix)]
    raw: dict[str, Tensor] = {}
    from safetensors import safe_open

    for f in files:
        mine = [k for k in wanted if where[k] == f]
        if not mine:
            continue
        if f in loaded:
            raw.update({k: loaded[f][k] for k in mine})
        else:
            with safe_open(str(f), framework="pt") as h:
                raw.update({k: h.get_tensor(k) for k in mine})
    dropped: list[str] = []
    try:
        sd = convert_vision_state_dict(raw, config, layout=layout, prefix=prefix, dropped=dropped)
    except ValueError as e:
        raise ValueError(f"{source} ({layout} layout, prefix {prefix!r}): {e}") from None
    info = VisionCheckpointInfo([str(f) for f in files], layout, prefix, dropped, ignored=len(where) - len(wanted))
    return sd, info


def load_vision_tower(path: str | Path, config: ClipVisionConfig, *, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu", prefix: str | None = None) -> ClipVisionTower:
    """A ClipVisionTower with the weights of a local file (see read_vision_state_dict).
    The tower is built without a random init and takes the file's tensors (in `dtype` if
    given, else the file's)."""
    sd, _ = read_vision_state_dict(path, config, prefix=prefix)
    with torch.device("meta"):
        tower = ClipVisionTower(config)
    sd = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
          for k, v in sd.items()}
    tower.load_state_dict(sd, strict=True, assign=True)
    return tower


__all__ = [
    "LAYOUTS",
    "VisionCheckpointInfo",
    "check_vision_state_dict",
    "clip_vision_from_hf",
    "clip_vision_from_open_clip",
    "clip_vision_to_hf",
    "convert_vision_state_dict",
    "detect_vision_layout",
    "expected_shapes",
    "find_prefixes",
    "load_vision_tower",
    "read_vision_state_dict",
    "siglip_vision_from_hf",
    "siglip_vision_to_hf",
    "vision_from_hf",
    "vision_to_hf",
]
