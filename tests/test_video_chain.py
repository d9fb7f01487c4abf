"""The paper's video stage chain: the aggregator trained at one frames_per_group / group
count (pretraining 16 -> 1) loads into another (SFT 32 -> 2). Pins the resize rule of the
temporal and group embeddings (TemporalAggregator's load hook), every loader path through
it, and the tiny video_pretrain -> video_sft chain through the real trainer."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from _helpers import ROOT, make_shapes_corpus, randomize, tiny_model, tiny_params, tiny_train_overrides
from llama_vision.checkpoint import CheckpointMismatchError, load_into, load_model, rank_state_dict, save_meta_checkpoint
from llama_vision.checkpoint.load import materialize
from llama_vision.checkpoint.meta import build_skeleton, load_meta_state_dict, load_strict, read_params
from llama_vision.config import load_config
from llama_vision.model import build_model
from llama_vision.model.video import (
    TemporalAggregator,
    VideoConfig,
    add_video_adapters,
    resize_group_embedding,
    resize_temporal_embedding,
)
from llama_vision.tokenizer import load_tokenizer
from llama_vision.training.metrics import read_metrics
from llama_vision.training.train_config import TrainConfig
from llama_vision.training.build import build_training_model
from llama_vision.training.trainer import train

CFG = ROOT / "configs" / "train"
AGG = "video_aggregator."
VIDEO_PREFIXES = (AGG, "text_model.video_cross_attention_layers.", "text_model.placeholder_embeddings.video.")
# Trained at 2 frames per group, 1 group; loaded at 3 frames per group, 2 groups.
OLD = VideoConfig(num_frames=2, frames_per_group=2, tiles_per_frame=1, n_latents=3, depth=1, heads=4, every_k_image_layers=1)
NEW = dataclasses.replace(OLD, num_frames=6, frames_per_group=3)


# --- the resize rule, by hand -----------------------------------------------------------
def test_temporal_embedding_resize_hand_values():
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 6.0, 0.25])
    two = torch.stack([a, b])  # [F0=2, D=3]
    assert torch.equal(resize_temporal_embedding(two, 3), torch.stack([a, (a + b) / 2, b]))
    # Downsampling reads positions 0, 1.5, 3 of four trained frames.
    four = torch.arange(8.0).view(4, 2)
    assert torch.equal(resize_temporal_embedding(four, 3), torch.tensor([[0.0, 1.0], [3.0, 4.0], [6.0, 7.0]]))
    assert torch.equal(resize_temporal_embedding(two[:1], 3), a.expand(3, 3))  # one trained frame: repeated
    assert torch.equal(resize_temporal_embedding(four, 1), four[:1])  # one frame: the first
    assert resize_temporal_embedding(four, 4) is four  # same size: untouched


def test_temporal_embedding_resize_is_aligned_corners_linear_with_exact_ends():
    g = torch.Generator().manual_seed(0)
    for f0, f in ((16, 32), (4, 6), (8, 6), (3, 64)):
        e = torch.randn(f0, 5, generator=g)
        got = resize_temporal_embedding(e, f)
        want = F.interpolate(e.T[None], size=f, mode="linear", align_corners=True)[0].T
        torch.testing.assert_close(got, want)
        # First and last frame embeddings (and every row on a trained position) bitwise kept.
        for i in range(f):
            if (i * (f0 - 1)) % (f - 1) == 0:
                assert torch.equal(got[i], e[i * (f0 - 1) // (f - 1)]), (f0, f, i)
    bf16 = torch.randn(16, 4, generator=g).bfloat16()
    out = resize_temporal_embedding(bf16, 32)
    assert out.dtype == torch.bfloat16 and torch.equal(out[0], bf16[0]) and torch.equal(out[-1], bf16[-1])


def test_group_embedding_resize_hand_values():
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert torch.equal(resize_group_embedding(r[:1], 2), torch.stack([r[0], r[0]]))  # paper: 1 -> 2
    assert torch.equal(resize_group_embedding(r[:2], 4), torch.stack([r[0], r[1], r[1], r[1]]))
    assert torch.equal(resize_group_embedding(r, 2), r[:2])
    assert resize_group_embedding(r, 3) is r


# --- the aggregator's load hook ---------------------------------------------------------
def _aggregator(frames_per_group: int, max_groups: int, n_latents: int = 3, dim: int = 8, seed: int = 0) -> TemporalAggregator:
    agg = TemporalAggregator(dim, frames_per_group=frames_per_group, max_groups=max_groups, n_latents=n_latents,
                             depth=1, heads=2, ffn_hidden_dim=16, seed=seed)
    return randomize(agg, seed)


@torch.no_grad()
def test_aggregator_loads_another_frames_per_group_and_group_count():
    trained = _aggregator(2, 1, seed=1).state_dict()
    agg = _aggregator(3, 2, seed=2)
    agg.load_state_dict(trained)
    te, ge = trained["temporal_embedding"], trained["group_embedding"]
    assert torch.equal(agg.temporal_embedding, torch.stack([te[0], (te[0] + te[1]) / 2, te[1]]))
    assert torch.equal(agg.group_embedding, torch.stack([ge[0], ge[0]]))
    for k, v in agg.state_dict().items():
        if k not in TemporalAggregator.RESIZED_ON_LOAD:
            assert torch.equal(v, trained[k]), k
    out, valid = agg(torch.randn(1, 1, 6, 2, 8))  # 6 frames = 2 groups of 3
    assert out.shape == (1, 1, 2, 3, 8) and torch.isfinite(out).all() and valid.all()


@torch.no_grad()
def test_same_shape_aggregator_load_is_bitwise_and_other_shapes_fail_clearly():
    trained = _aggregator(2, 1, seed=1).state_dict()
    same = _aggregator(2, 1, seed=2)
    same.load_state_dict(trained)
    for k, v in same.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(RuntimeError, match=r"latents.*\[3, 8\].*\[4, 8\]"):
        _aggregator(3, 2, n_latents=4).load_state_dict(trained)
    wide = {**trained, "temporal_embedding": torch.zeros(2, 9)}  # another width: not resizable
    with pytest.raises(RuntimeError, match=r"temporal_embedding.*\[2, 9\].*\[3, 8\]"):
        _aggregator(3, 2).load_state_dict(wide)
    assert not same.resizes_on_load("latents", (4, 8)) and not same.resizes_on_load("temporal_embedding", (2, 9))
    assert same.resizes_on_load("temporal_embedding", (5, 8)) and same.resizes_on_load("group_embedding", (3, 8))


# --- every checkpoint loader goes through the hook --------------------------------------
@pytest.fixture(scope="module")
def old_ckpt(tmp_path_factory):
    """A Meta checkpoint of a tiny video model trained (randomised) at OLD's shapes."""
    model = tiny_model(seed=5)
    add_video_adapters(model, OLD)
    randomize(model.video_aggregator, 6)
    out = save_meta_checkpoint(model, tmp_path_factory.mktemp("old_video"))
    return out, {k: v.clone() for k, v in model.state_dict().items()}


def _check_resized(model, trained):
    te, ge = trained[AGG + "temporal_embedding"], trained[AGG + "group_embedding"]
    state = model.state_dict()
    assert torch.equal(state[AGG + "temporal_embedding"], resize_temporal_embedding(te, 3))
    assert torch.equal(state[AGG + "temporal_embedding"][[0, 2]], te)
    assert torch.equal(state[AGG + "group_embedding"], ge.expand(2, -1))
    for k, v in state.items():
        if k in trained and not k.endswith(TemporalAggregator.RESIZED_ON_LOAD):
            assert torch.equal(v, trained[k]), k


@torch.no_grad()
def test_every_loader_resizes_the_aggregator(old_ckpt, tmp_path):
    path, trained = old_ckpt
    new = {"video": dataclasses.asdict(NEW)}
    # load_model on the CPU: meta skeleton + memory-mapped tensors assigned (assign_strict).
    assigned = load_model(path, params_overrides=new)
    _check_resized(assigned, trained)
    assert isinstance(assigned.video_aggregator.temporal_embedding, torch.nn.Parameter)
    # The accelerator path (to_empty + load_strict copy), run on the CPU.
    skeleton = materialize(build_skeleton({**read_params(path), **new}), "cpu")
    load_strict(skeleton, rank_state_dict(skeleton, path), path)
    _check_resized(skeleton, trained)
    # load_into a built model (the trainer's init_from), allowing the video keys to be missing.
    built = build_model(tiny_params(), seed=9)
    add_video_adapters(built, NEW)
    load_into(built, path, allow_missing_prefixes=VIDEO_PREFIXES)
    _check_resized(built, trained)
    # The resized model's params.json describes its new shape: it loads back bitwise.
    again = save_meta_checkpoint(assigned, tmp_path / "resized")
    assert read_params(again)["video"]["frames_per_group"] == 3
    reloaded = load_model(again)
    assert reloaded.video_aggregator.temporal_embedding.shape[0] == 3
    for k, v in assigned.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    # Same shapes: bitwise the checkpoint.
    for k, v in load_model(path).state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_other_aggregator_shapes_fail_naming_key_and_shapes(old_ckpt, tmp_path):
    path, trained = old_ckpt
    wrong = {"video": dataclasses.asdict(dataclasses.replace(NEW, n_latents=4))}
    with pytest.raises(CheckpointMismatchError, match=r"video_aggregator\.latents: checkpoint \[3, 64\] vs model \[4, 64\]"):
        load_model(path, params_overrides=wrong)
    built = build_model(tiny_params(), seed=9)
    add_video_adapters(built, dataclasses.replace(NEW, n_latents=4))
    with pytest.raises(CheckpointMismatchError, match=r"video_aggregator\.latents: checkpoint \[3, 64\] vs model \[4, 64\]"):
        load_into(built, path)
    # A temporal embedding of another width is not resizable: the strict check names it.
    bad = {**load_meta_state_dict(path), AGG + "temporal_embedding": torch.zeros(2, 65)}
    save_meta_checkpoint({k: v.clone() for k, v in bad.items()}, read_params(path), tmp_path / "bad")
    with pytest.raises(CheckpointMismatchError, match=r"video_aggregator\.temporal_embedding: checkpoint \[2, 65\] vs model \[3, 64\]"):
        load_model(tmp_path / "bad", params_overrides={"video": dataclasses.asdict(NEW)})


# --- the chain through the real trainer -------------------------------------------------
def test_video_pretrain_then_sft_carries_the_trained_aggregator(tmp_path):
    """tiny_video_pretrain at 4 frames in 1 group (the paper's 16 -> 1) -> tiny_video_sft at
    6 frames per group, 2 groups (the paper's 32 -> 2): SFT builds from the pretrained video
    weights (resized as documented, not re-initialised) and trains."""
    corpus = make_shapes_corpus(tmp_path / "corpus", n_train=8, n_test=2, n_videos=8)
    videos = {"data.paths": f'["{corpus["root"] / "data" / "videos" / "train.jsonl"}"]', "checkpoint_every": 1000}
    pre_cfg = load_config(TrainConfig, CFG / "tiny_video_pretrain.yaml", tiny_train_overrides(
        corpus, tmp_path / "pre", max_steps=6, init_from="null", **{"video.num_frames": 4, "video.frames_per_group": 4}, **videos))
    train(pre_cfg)
    pre = tmp_path / "pre" / "final"
    assert read_params(pre)["video"]["frames_per_group"] == 4
    trained = load_model(pre).state_dict()
    assert trained[AGG + "group_embedding"].shape[0] == 1

    sft_cfg = load_config(TrainConfig, CFG / "tiny_video_sft.yaml", tiny_train_overrides(
        corpus, tmp_path / "sft", max_steps=4, init_from=pre, **videos))
    assert (sft_cfg.video.frames_per_group, math.ceil(sft_cfg.video.num_frames / sft_cfg.video.frames_per_group)) == (6, 2)
    tokenizer = load_tokenizer(sft_cfg.tokenizer)
    start = build_training_model(sft_cfg, tokenizer).state_dict()
    fresh = build_training_model(dataclasses.replace(sft_cfg, init_from=None), tokenizer).state_dict()
    te, ge = trained[AGG + "temporal_embedding"], trained[AGG + "group_embedding"]
    # 4 -> 6 frames: rows at positions 0, 0.6, 1.2, 1.8, 2.4, 3 of the trained axis.
    assert torch.equal(start[AGG + "temporal_embedding"][[0, 5]], te[[0, 3]])
    for i in range(1, 5):
        pos = i * 3 / 5
        lo = int(pos)
        torch.testing.assert_close(start[AGG + "temporal_embedding"][i], te[lo] + (pos - lo) * (te[lo + 1] - te[lo]))
    assert torch.equal(start[AGG + "group_embedding"], ge.expand(2, -1))
    video_keys = [k for k in start if k.startswith(VIDEO_PREFIXES)]
    assert any(k.startswith(AGG) for k in video_keys)
    for k in video_keys:
        want = trained[k]
        if k == AGG + "temporal_embedding":
            want = resize_temporal_embedding(want, 6)
        elif k == AGG + "group_embedding":
            want = resize_group_embedding(want, 2)
        assert torch.equal(start[k], want), f"{k} is not the pretrained value"
        # The pretraining moved it, so equal-to-checkpoint really means carried over.
        assert not torch.equal(start[k], fresh[k]), f"{k} equals its fresh initialisation"

    train(sft_cfg)
    losses = [m["loss"] for m in read_metrics(tmp_path / "sft" / "metrics.jsonl")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    final = load_model(tmp_path / "sft" / "final")  # params.json carries the SFT shapes
    assert final.args.video["frames_per_group"] == 6
    assert final.video_aggregator.temporal_embedding.shape[0] == 6 and final.video_aggregator.group_embedding.shape[0] == 2
    for k, v in final.state_dict().items():
        if not k.startswith(VIDEO_PREFIXES):
            assert torch.equal(v, trained[k]), f"{k} changed in video SFT"

    # Video SFT from a checkpoint without video weights (an image stage's) is refused:
    # it would otherwise start from a fresh aggregator without a word.
    image_only = build_model({**read_params(pre), "video": None}, seed=3)
    save_meta_checkpoint(image_only, tmp_path / "image_only")
    bad_cfg = dataclasses.replace(sft_cfg, init_from=str(tmp_path / "image_only"))
    with pytest.raises(CheckpointMismatchError, match="missing key.*video_cross_attention_layers"):
        build_training_model(bad_cfg, tokenizer)
