"""Every tiny_* stage config runs end to end through the real trainer (chained through
checkpoints as on a cluster) and its loss falls; the video stage changes video parameters
only."""
from __future__ import annotations

import pytest
import torch

from _helpers import ROOT, make_shapes_corpus, tiny_train_overrides
from llama_vision.checkpoint import load_model
from llama_vision.config import load_config
from llama_vision.data.synthetic.chat_sets import write_chat_sets
from llama_vision.training.metrics import read_metrics
from llama_vision.training.train_config import TrainConfig
from llama_vision.training.trainer import train

CFG = ROOT / "configs" / "train"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    c = make_shapes_corpus(root, n_train=48, n_test=4, n_videos=12)
    c["chat"] = write_chat_sets(root / "data" / "chat", n=24)
    return c


def _run(name, corpus, out, **extra):
    cfg = load_config(TrainConfig, CFG / f"{name}.yaml", tiny_train_overrides(corpus, out, checkpoint_every=1000, **extra))
    train(cfg)
    return [m["loss"] for m in read_metrics(out / "metrics.jsonl")]


def _falls(losses, k=3):
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def test_image_stages_chain(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    losses = _run("tiny_text_pretrain", corpus, tmp / "text", max_steps=30)
    assert _falls(losses)
    losses = _run("tiny_image_pretrain", corpus, tmp / "pre", max_steps=15, init_from=tmp / "text" / "final")
    assert _falls(losses)
    # Anneal at a higher tile size: position embeddings are resized from the 28 px checkpoint.
    losses = _run("tiny_image_anneal", corpus, tmp / "anneal", max_steps=8, init_from=tmp / "pre" / "final")
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert load_model(tmp / "anneal" / "final").vision_model.vision_encoder.positional_embedding.shape[0] == 10
    chat = {"data.paths": f'["{corpus["chat"]["sft"]}"]'}
    losses = _run("tiny_image_sft", corpus, tmp / "sft", max_steps=15, init_from=tmp / "pre" / "final", **chat)
    assert _falls(losses)
    dpo = {"data.paths": f'["{corpus["chat"]["dpo"]}"]'}
    losses = _run("tiny_image_dpo", corpus, tmp / "dpo", max_steps=10, init_from=tmp / "sft" / "final", **dpo)
    assert _falls(losses)
    rows = read_metrics(tmp / "dpo" / "metrics.jsonl")
    assert "reward_margin" in rows[-1]


def test_video_stage_trains_only_video_parameters(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("video")
    _run("tiny_image_pretrain", corpus, tmp / "pre", max_steps=3)
    before = load_model(tmp / "pre" / "final").state_dict()
    videos = {"data.paths": f'["{corpus["root"] / "data" / "videos" / "train.jsonl"}"]'}
    losses = _run("tiny_video_pretrain", corpus, tmp / "video", max_steps=15, init_from=tmp / "pre" / "final", **videos)
    assert _falls(losses)
    after = load_model(tmp / "video" / "final")
    assert "video" in after.modalities  # params.json carries the video config
    changed_video = 0
    for k, v in after.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), f"{k} changed in the video stage"
        else:
            assert k.startswith(("video_aggregator.", "text_model.video_cross_attention_layers.", "text_model.placeholder_embeddings.video.")), k
            changed_video += 1
    assert changed_video > 0
