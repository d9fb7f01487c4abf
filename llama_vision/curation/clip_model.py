"""The open_clip model of the CLIP-backed stages, loaded from local files only.

``clip.model`` names an architecture open_clip ships (``ViT-B-32``), or ``clip.model_config``
is an open_clip model-config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``) that is
registered under its file stem; ``clip.weights`` is a ``.safetensors`` file or a torch
file read with ``weights_only=True``. open_clip is handed the weights *path* (never a tag),
so nothing is looked up or downloaded, and it loads the state dict strictly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from llama_vision.config import ConfigError

from .config import ClipConfig


def model_name(cfg: ClipConfig) -> str:
    """The open_clip name of ``cfg``'s architecture, registering a model-config JSON first."""
    import open_clip

    if (cfg.model is None) == (cfg.model_config is None):
        raise ConfigError("config keys 'clip.model' / 'clip.model_config': set exactly one")
    if cfg.model_config is not None:
        path = Path(cfg.model_config)
        if not path.is_file():
            raise ConfigError(f"config key 'clip.model_config': file not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    if cfg.model not in open_clip.list_models():
        raise ConfigError(f"config key 'clip.model': open_clip has no architecture {cfg.model!r}")
    return cfg.model


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a weights file, without reading the tensors (safetensors
    header; a torch file mapped onto the meta device, weights_only)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(path, map_location="meta", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # an open_clip training checkpoint
    if not isinstance(state, dict):
        raise ConfigError(f"config key 'clip.weights': {path} holds no state dict")
    return {k.removeprefix("module."): tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def check_clip_files(cfg: ClipConfig) -> None:
    """Before anything runs: the weights file exists and fits the architecture (names and
    shapes; positional embeddings may differ, open_clip resizes them)."""
    import open_clip
    import torch

    name = model_name(cfg)
    weights = Path(cfg.weights) if cfg.weights is not None else None
    if weights is None:
        raise ConfigError("config key 'clip.weights': the CLIP stages need a local weights file "
                          "(.safetensors or a weights-only torch file); nothing is downloaded")
    if not weights.is_file():
        raise ConfigError(f"config key 'clip.weights': weights file not found: {weights}")
    logging.disable(logging.WARNING)  # open_clip warns that the (shape-only) model has random weights
    try:
        with torch.device("meta"):
            model = open_clip.create_model(name, device="meta")
    finally:
        logging.disable(logging.NOTSET)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        have = _weight_shapes(weights)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- not a safetensors / weights-only torch file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"config key 'clip.weights': cannot read {weights} as safetensors or a weights-only "
                          f"torch file: {type(exc).__name__}: {first}") from None
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    mismatched = sorted(k for k in set(want) & set(have) if want[k] != have[k] and "positional_embedding" not in k)
    if missing or unexpected or mismatched:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("other shape", mismatched)) if keys)
        raise ConfigError(f"config key 'clip.weights': {weights} does not fit open_clip model {name!r} ({detail})")


class ClipModel:
    """An open_clip model with its tokenizer and image preprocessing, in eval mode.

    Methods return L2-normalised float32 numpy embeddings [N, D].
    """

    def __init__(self, cfg: ClipConfig, device: str = "cpu"):
        import open_clip
        import torch

        name = model_name(cfg)
        weights = Path(cfg.weights) if cfg.weights is not None else None
        if weights is None or not weights.is_file():
            raise ConfigError(f"config key 'clip.weights': weights file not found: {weights}")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=str(weights), weights_only=True, image_resize_mode=cfg.resize_mode, device=device)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:  # wrong file, or one of another model
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"config key 'clip.weights': {weights} does not load into open_clip model "
                              f"{name!r}: {first}") from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device
        self.batch_size = cfg.batch_size
        self._torch = torch

    def embed_images(self, images: Sequence) -> np.ndarray:
        """PIL images -> [N, D] (sub-batches of ``clip.batch_size`` in the given order)."""
        torch = self._torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                x = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]]).to(self.device)
                out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> [N, D] (the tokenizer truncates to the model's context length)."""
        torch = self._torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start:start + self.batch_size])).to(self.device)
                out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @property
    def dim(self) -> int:
        return int(self.model.visual.output_dim)


def clip_device(cfg: ClipConfig) -> str:
    return "cuda" if cfg.num_gpus > 0 else "cpu"


def set_actor_threads(num_cpus: float) -> None:
    """Torch threads = the CPUs the actor reserved (Ray does not limit them itself)."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
