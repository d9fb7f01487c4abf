"""Validation during training (eval_every / data.eval_paths): val_loss and greedy token
accuracy over every labelled held-out token, in the step's metrics row; checked against a
per-sample, unbatched recomputation on the final weights."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from _helpers import ROOT, tiny_train_overrides
from llama_vision.checkpoint import load_model
from llama_vision.config import load_config
from llama_vision.training.metrics import read_metrics
from llama_vision.training.train_config import TrainConfig
from llama_vision.training.trainer import Trainer
from llama_vision.training.validation import build_eval_loader

PRETRAIN = ROOT / "configs/train/tiny_image_pretrain.yaml"


def _cfg(corpus, out, **extra):
    return load_config(TrainConfig, PRETRAIN, tiny_train_overrides(corpus, out, **extra))


def test_validation_rows_equal_a_per_sample_recomputation(shapes_corpus, tmp_path):
    out = tmp_path / "run"
    held_out = {"data.eval_paths": f'["{shapes_corpus["shards"]}"]'}
    cfg = _cfg(shapes_corpus, out, max_steps=4, checkpoint_every=100, eval_every=2, eval_max_batches=3,
               micro_batch_size=4, **held_out)
    trainer = Trainer(cfg)
    trainer.fit()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert ["val_loss" in r for r in rows] == [False, True, False, True]
    last = rows[-1]
    assert 0 <= last["val_token_accuracy"] <= 1 and last["val_targets"] > 0

    # The same held-out samples (3 batches of 4), one at a time, unpadded, on final/.
    model = load_model(out / "final").eval()
    nll, correct, targets = 0.0, 0, 0
    for i, batch in enumerate(build_eval_loader(cfg, trainer.tokenizer, model.args)):
        if i == 3:
            break
        for b in range(len(batch)):
            n = int(batch.lengths[b])
            tokens, labels = batch.tokens[b : b + 1, :n], batch.labels[b, :n]
            k = int(batch.num_images[b])
            with torch.no_grad():
                logits = model(tokens, batch.images[b : b + 1, :k], batch.aspect_ratios[b : b + 1, :k])[0]
            keep = labels != -100
            logp = torch.log_softmax(logits.double(), -1)[keep]
            nll -= logp.gather(-1, labels[keep][:, None]).sum().item()
            correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
            targets += int(keep.sum())
    assert last["val_targets"] == targets
    assert last["val_loss"] == pytest.approx(nll / targets, rel=1e-5)
    assert last["val_token_accuracy"] == pytest.approx(correct / targets, abs=1.5 / targets)
    assert math.isfinite(rows[1]["val_loss"]) and rows[1]["val_loss"] != last["val_loss"]


def test_validation_config_errors(shapes_corpus, tmp_path):
    cfg = _cfg(shapes_corpus, tmp_path / "a", eval_every=2)
    with pytest.raises(ValueError, match="data.eval_paths is empty"):
        build_eval_loader(cfg, None, None)
    with pytest.raises(ValueError, match="stage dpo"):
        build_eval_loader(dataclasses.replace(cfg, stage="dpo"), None, None)
    assert build_eval_loader(dataclasses.replace(cfg, eval_every=0), None, None) is None
