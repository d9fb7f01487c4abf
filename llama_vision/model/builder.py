"""`build_model`: a Meta params.json (+ optional vision-size, video and llava keys) -> an
initialised VisionLanguageModel, the video / LLaVA modalities re-added when the params
carry them."""
from __future__ import annotations

from pathlib import Path

import torch

from .args import ModelArgs
from .attention import check_backend
from .init import init_weights
from .model import VisionLanguageModel
from .video import VideoConfig, add_video_adapters


def build_model(params: dict | str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, init: bool = True, seed: int = 0, **overrides) -> VisionLanguageModel:
    """Build a model from a Meta params.json (dict or path; optional vision-size keys).

    device="meta" builds without memory (shapes only, no init); device=None builds on the
    ambient default device (`with torch.device("meta"): build_model(...)`, or
    torch.set_default_device), the CPU unless one is set. `seed` makes the initial weights
    (identical at every tensor-parallel degree, see `init_weights`). Under torch.distributed with
    fairscale groups initialised (model_parallel.init_model_parallel), projections are
    sharded across the tensor-parallel group.
    """
    args = ModelArgs.from_params(params, **overrides)
    check_backend(args.attn_backend)
    # The ambient device, not a forced "cpu": a 90B build under `with torch.device("meta")`
    # must not allocate (and initialise) ~360 GB on the host.
    device = torch.get_default_device() if device is None else torch.device(device)
    prev = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = VisionLanguageModel(args)
            if args.llava is not None:  # the LLaVA image modality: part of the image model
                from .llava import add_llava_from_params

                add_llava_from_params(model, args.llava)
            if init and device.type != "meta":
                init_weights(model, seed=seed)
            # Added after the image model is initialised, exactly as a training stage adds
            # it to a built model: its blocks are seeded by their state-dict names and its
            # placeholder starts as the initialised table's row (so both paths agree).
            if args.video is not None:
                add_video_adapters(model, VideoConfig(**args.video), seed=seed)
    finally:
        torch.set_default_dtype(prev)
    return model
