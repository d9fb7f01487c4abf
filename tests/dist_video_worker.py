"""Run under torchrun (2 processes, gloo): with the video modality, TP=2 equals TP=1.

Each rank builds the TP=1 model with video adapters first (same seeds -> same weights on
both ranks), then joins the TP group, builds the sharded model, loads its slice of the full
weights and compares logits (image + video prompt) and the video encoder's tokens. It also
checks that a freshly initialised TP=2 video modality holds exactly the slices of the
freshly initialised TP=1 one (the init is tensor-parallel invariant).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _helpers import randomize, tiny_model, tiny_params  # noqa: E402

import model_parallel  # noqa: E402
import llama_vision  # noqa: E402
from llama_vision.model.video import VideoConfig, add_video_adapters  # noqa: E402

IMG, VID = 512, 513
CFG = VideoConfig(num_frames=6, frames_per_group=4, tiles_per_frame=2, n_latents=3, depth=2, heads=4, every_k_image_layers=1)
PREFIXES = ("video_aggregator.", "text_model.video_cross_attention_layers.")


def build_fresh():
    model = llama_vision.build_model(tiny_params(), seed=3)
    add_video_adapters(model, CFG, seed=4)
    return model


def main(out_path: str) -> None:
    full = tiny_model(seed=11)
    add_video_adapters(full, CFG)
    randomize(full.video_aggregator, 5)
    randomize(full.text_model.video_cross_attention_layers, 6)
    full.eval()
    fresh_full = build_fresh().state_dict()

    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 1, 4, 3, 28, 28, generator=g)
    ar = torch.tensor([[[2, 2]], [[1, 3]]])
    videos = torch.randn(2, 1, 6, 2, 3, 28, 28, generator=g)
    video_inputs = (videos, torch.tensor([[[1, 2]], [[1, 1]]]), torch.tensor([[6], [3]]))
    tokens = torch.tensor([[IMG, 1, 2, VID, 3, 4, 5], [VID, 7, 8, IMG, 9, 10, 11]])
    media = {"image": (imgs, ar), "video": video_inputs}
    with torch.no_grad():
        want = full(tokens, media_inputs=media)
        want_tokens = full.modalities["video"].encode(video_inputs).tokens

    model_parallel.init_model_parallel(2, backend="gloo")
    rank = model_parallel.tp_rank()
    # full.args carries the video config (params.json would too): build_model re-adds it.
    model = llama_vision.build_model(dict(full.args.__dict__), init=False)
    assert "video" in model.modalities
    model.load_state_dict(model_parallel.shard_state_dict(model, full.state_dict()), strict=True)
    model.eval()
    plan = model_parallel.shard_plan(model, "runtime")
    sharded_video = [k for k, d in plan.items() if d is not None and k.startswith(PREFIXES)]
    with torch.no_grad():
        got = model(tokens, media_inputs=media)
        got_tokens = model.modalities["video"].encode(video_inputs).tokens

    fresh = build_fresh()
    expected = model_parallel.shard_state_dict(fresh, fresh_full)
    fresh_ok = all(torch.equal(t, expected[k]) for k, t in fresh.state_dict().items() if k.startswith(PREFIXES))
    result = {
        "rank": rank,
        "max_diff": float((got - want).abs().max()),
        "max_diff_video_tokens": float((got_tokens - want_tokens).abs().max()),
        "n_sharded_video": len(sharded_video),
        "fresh_init_matches": fresh_ok,
    }
    Path(f"{out_path}.{rank}").write_text(json.dumps(result))
    model_parallel.destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
