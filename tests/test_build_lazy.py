"""build_training_model(lazy=True) -- the FSDP path, which never holds the whole model:
bitwise the model of the eager path (initialise everything, then load the checkpoints) in
every stage shape: from scratch, init_from an image checkpoint, init_text_from a trunk,
video pretraining from an image checkpoint (fresh video modules and placeholder), video
SFT from a video checkpoint at another frames_per_group (resized on load); and what the
checkpoints provide is their memory-mapped storage, not a copy."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from _helpers import ROOT, randomize, tiny_params, tiny_train_overrides
from llama_vision.checkpoint import save_meta_checkpoint
from llama_vision.config import load_config
from llama_vision.model import build_model
from llama_vision.model.video import VideoConfig, add_video_adapters
from llama_vision.tokenizer import load_tokenizer
from llama_vision.training.build import build_training_model
from llama_vision.training.precision import DTYPES, PrecisionPolicy
from llama_vision.training.train_config import TrainConfig

CFG = ROOT / "configs" / "train"


@pytest.fixture(scope="module")
def checkpoints(shapes_corpus, tmp_path_factory):
    """An image checkpoint and a video one (aggregator at 2 frames per group), random."""
    root = tmp_path_factory.mktemp("lazy_ckpt")
    vocab = load_tokenizer(shapes_corpus["tokenizer"]).n_words
    image = randomize(build_model({**tiny_params(), "vocab_size": vocab}, seed=3), seed=4)
    save_meta_checkpoint(image, root / "image")
    video = randomize(build_model({**tiny_params(), "vocab_size": vocab}, seed=5), seed=6)
    add_video_adapters(video, VideoConfig(num_frames=2, frames_per_group=2, tiles_per_frame=1, n_latents=3, depth=1, heads=4,
                                          every_k_image_layers=1))  # fmt: skip
    randomize(video, seed=7)
    save_meta_checkpoint(video, root / "video")
    return root


def _both(cfg: TrainConfig, tokenizer, precision=None):
    eager = build_training_model(cfg, tokenizer)
    lazy = build_training_model(cfg, tokenizer, lazy=True, precision=precision)
    return eager, lazy


def _assert_same(eager, lazy, precision=None):
    a, b = dict(eager.named_parameters()), dict(lazy.named_parameters())
    assert a.keys() == b.keys()
    for n, p in a.items():
        assert not b[n].is_meta, n
        assert b[n].requires_grad == p.requires_grad, n
        want = p.detach()
        if precision is not None and not p.requires_grad:
            want = want.to(precision.frozen_param_dtype)
        assert b[n].dtype == want.dtype, n
        assert torch.equal(b[n].detach(), want), n


@pytest.mark.parametrize("stage", ["scratch", "image_init_from", "text_trunk", "video_from_image", "video_sft_resized"])
def test_lazy_build_equals_the_eager_build(stage, shapes_corpus, checkpoints, tmp_path):
    config, extra = {
        "scratch": ("tiny_image_pretrain", {"init_from": "null"}),
        "image_init_from": ("tiny_image_sft", {"init_from": str(checkpoints / "image")}),
        "text_trunk": ("tiny_image_pretrain", {"init_from": "null", "init_text_from": str(checkpoints / "image")}),
        "video_from_image": ("tiny_video_pretrain", {"init_from": str(checkpoints / "image"), "video.num_frames": 2,
                                                     "video.frames_per_group": 2, "video.n_latents": 3, "video.depth": 1,
                                                     "video.heads": 4, "video.every_k_image_layers": 1}),
        "video_sft_resized": ("tiny_video_sft", {"init_from": str(checkpoints / "video"), "video.num_frames": 6,
                                                 "video.frames_per_group": 3, "video.n_latents": 3, "video.depth": 1,
                                                 "video.heads": 4, "video.every_k_image_layers": 1}),
    }[stage]
    cfg = load_config(TrainConfig, CFG / f"{config}.yaml", tiny_train_overrides(shapes_corpus, tmp_path, **extra))
    tokenizer = load_tokenizer(cfg.tokenizer)
    eager, lazy = _both(cfg, tokenizer)
    _assert_same(eager, lazy)
    if stage == "image_init_from":
        # The frozen trunk is the checkpoint's memory-mapped storage, not a copy; with the
        # frozen weights to be stored in bf16 the skeleton is cast first, so the float32
        # checkpoint tensors are cast once, straight into bf16 (no float32 copy of the trunk).
        wq = lazy.text_model.layers[0].attention.wq.weight
        assert not wq.requires_grad and not wq.untyped_storage().resizable()  # a file mapping
        # ... a private one: training writes into the mapped tensors never reach the file.
        shard = checkpoints / "image" / "consolidated.00.pth"
        before = hashlib.sha256(shard.read_bytes()).hexdigest()
        gate = lazy.text_model.cross_attention_layers[0].gate_attn
        assert gate.requires_grad and not gate.untyped_storage().resizable()
        with torch.no_grad():
            wq.add_(1.0)
            gate.add_(1.0)
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == before
        policy = PrecisionPolicy(frozen_param_dtype=DTYPES["bf16"])
        eager16, lazy16 = _both(cfg, tokenizer, precision=policy)
        _assert_same(eager16, lazy16, precision=policy)
        assert lazy16.text_model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    if stage == "video_sft_resized":
        assert lazy.video_aggregator.temporal_embedding.shape[0] == 3


def test_lazy_build_rejects_a_checkpoint_that_misses_what_the_stage_needs(shapes_corpus, checkpoints, tmp_path):
    """video_sft must continue a video checkpoint: the image one lacks the video weights."""
    from llama_vision.checkpoint import CheckpointMismatchError

    cfg = load_config(TrainConfig, CFG / "tiny_video_sft.yaml",
                      tiny_train_overrides(shapes_corpus, tmp_path, init_from=str(checkpoints / "image")))
    with pytest.raises(CheckpointMismatchError, match="video"):
        build_training_model(cfg, load_tokenizer(cfg.tokenizer), lazy=True)
    assert dataclasses.is_dataclass(cfg)
