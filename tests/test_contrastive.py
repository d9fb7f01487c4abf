"""Contrastive (CLIP) tower pretraining (llama_vision/training/contrastive.py,
tools/pretrain_tower.py): the loss is open_clip's ClipLoss, a short run on shapes-world
captions really learns (in-batch retrieval far above chance), corrupt samples are skipped and
counted, and the saved tower is what `init_vision_from` loads into a LLaVA model."""
from __future__ import annotations

import json

import pytest
import torch

from _helpers import ROOT, tiny_train_overrides
from llama_vision.config import load_config
from llama_vision.training.contrastive import ContrastiveConfig, clip_loss, pretrain_tower, retrieval_accuracy

CONFIG = ROOT / "configs/train/demo_clip.yaml"


def _config(corpus, out, *extra):
    return load_config(ContrastiveConfig, CONFIG, [
        f"model={ROOT / 'configs/model/tiny_llava.yaml'}", f"tokenizer={corpus['tokenizer']}", f"output_dir={out}",
        f'data.paths=["{corpus["shards"]}"]', "data.shuffle_buffer=64", "batch_size=32", "max_steps=80",
        "warmup_steps=5", "lr=3e-3", "log_every=5", "text.width=32", "embed_dim=32", *extra])


@pytest.fixture(scope="module")
def run(shapes_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_tower")
    model, summary = pretrain_tower(_config(shapes_corpus, out, "image_embedding=pooled"), log=lambda *_: None)
    return {"out": out, "model": model, "summary": summary}


def test_clip_loss_is_open_clips():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(12, 16), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(12, 16), dim=-1)
    scale = torch.tensor(14.3)
    torch.testing.assert_close(clip_loss(a, b, scale), open_clip_loss.ClipLoss()(a, b, scale), rtol=1e-6, atol=1e-6)
    assert retrieval_accuracy(a, a) == (1.0, 1.0)


def test_a_short_run_learns_to_match_images_and_captions(run):
    rows = [json.loads(line) for line in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 5 and rows[-1]["step"] == 80
    assert rows[0]["loss"] > 3.0  # ~ln(32): chance
    assert rows[-1]["loss"] < 1.5 and rows[-1]["i2t_acc"] > 0.5 and rows[-1]["t2i_acc"] > 0.5  # chance: 1/32
    assert (run["out"] / "loss.png").stat().st_size > 0 and run["summary"]["skipped"] == 0


def test_data_cache_reads_each_image_once_and_trains_the_same(run, shapes_corpus, tmp_path, monkeypatch):
    import llama_vision.data.image_io as image_io

    calls = []
    real = image_io.load_image
    monkeypatch.setattr(image_io, "load_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    pretrain_tower(_config(shapes_corpus, tmp_path, "data.cache=true", "image_embedding=pooled"), log=lambda *_: None)
    assert len(calls) == 64  # 80 steps x 32 pairs = 40 passes over 64 images, each decoded once
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line)["loss"] for line in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert losses == want  # the same pairs in the same order as re-reading every pass


def test_the_saved_tower_is_what_init_vision_from_loads(run, shapes_corpus, tmp_path):
    from safetensors.torch import load_file

    from llama_vision.tokenizer import load_tokenizer
    from llama_vision.training.build import build_training_model
    from llama_vision.training.train_config import TrainConfig

    saved = load_file(str(run["out"] / "tower.safetensors"))
    trained = run["model"].tower.state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    overrides = tiny_train_overrides(shapes_corpus, tmp_path / "llava", model=ROOT / "configs/model/tiny_llava.yaml",
                                     init_vision_from=run["out"] / "tower.safetensors")
    cfg = load_config(TrainConfig, ROOT / "configs/train/tiny_llava_pretrain.yaml", overrides)
    model = build_training_model(cfg, load_tokenizer(shapes_corpus["tokenizer"]))
    model = model[0] if isinstance(model, tuple) else model
    loaded = model.vision_model.vision_encoder.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved), "the LLaVA tower differs from tower.safetensors"


def test_corrupt_and_captionless_samples_are_skipped_and_counted(shapes_corpus, tmp_path):
    test = [json.loads(line) for line in (shapes_corpus["root"] / "data/images/test.jsonl").read_text().splitlines()]
    image_dir = shapes_corpus["root"] / "data/images"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"image": str(image_dir / r["image"]), "caption": r["caption"]} for r in test]
    rows += [{"image": str(tmp_path / "broken.png"), "caption": "a red circle at the top left."},
             {"image": str(image_dir / test[0]["image"]), "caption": "  "}]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    cfg = _config(shapes_corpus, tmp_path / "out", "data.kind=caption_jsonl", f'data.paths=["{manifest}"]',
                  "batch_size=4", "max_steps=2", "data.shuffle_buffer=4")
    _, summary = pretrain_tower(cfg, log=lambda *_: None)
    reasons = summary["skipped_by_reason"]
    assert reasons.get("bad_image", 0) >= 1 and reasons.get("empty_text", 0) >= 1 and len(reasons) >= 3, reasons
    assert (tmp_path / "out" / "tower.safetensors").exists()


def test_cell_embeddings_learn_too(shapes_corpus, tmp_path):
    model, _ = pretrain_tower(_config(shapes_corpus, tmp_path, "image_embedding=cells", "cells=2"),
                              log=lambda *_: None)
    assert model.image_projection.in_features == 4 * 32  # 2 x 2 cells of the 32-wide tiny tower
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 3.0 and rows[-1]["loss"] < 2.0 and rows[-1]["i2t_acc"] > 0.3, rows[-1]


def test_bad_configs_name_the_problem(shapes_corpus, tmp_path):
    with pytest.raises(ValueError, match="cells=3 must divide the tower's 4 x 4 token grid"):
        pretrain_tower(_config(shapes_corpus, tmp_path, "image_embedding=cells", "cells=3"))
    with pytest.raises(ValueError, match="image_embedding must be"):
        pretrain_tower(_config(shapes_corpus, tmp_path, "image_embedding=mean"))
    with pytest.raises(ValueError, match="llava.tower"):
        pretrain_tower(_config(shapes_corpus, tmp_path, f"model={ROOT / 'configs/model/tiny.yaml'}"))
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        pretrain_tower(_config(shapes_corpus, tmp_path, "batch_size=1"))
    with pytest.raises(ValueError, match="data.kind"):
        pretrain_tower(_config(shapes_corpus, tmp_path, "data.kind=conversations"))


def test_the_cli_trains_and_refuses_unknown_keys(shapes_corpus, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_tower_cli", ROOT / "tools/pretrain_tower.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--config", str(CONFIG), f"model={ROOT / 'configs/model/tiny_llava.yaml'}", f"tokenizer={shapes_corpus['tokenizer']}",
            f"output_dir={tmp_path}", f'data.paths=["{shapes_corpus["shards"]}"]', "batch_size=4", "max_steps=2",
            "data.shuffle_buffer=8", "data.cache=false"]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tower"] == str(tmp_path / "tower.safetensors")
    assert cli.main(args + ["no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
