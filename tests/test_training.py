"""Training stack on CPU: data parallel and tensor parallel equal the single-process run,
the decoder stays frozen, SIGKILL + resume reproduces the uninterrupted losses, bad data
is skipped and reported, stage losses fall."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _helpers import ROOT, run_torchrun, tiny_train_overrides
from llama_vision.config import load_config
from llama_vision.training.dcp_checkpoint import read_tensors
from llama_vision.training.metrics import read_metrics
from llama_vision.training.train_config import TrainConfig
from llama_vision.training.trainer import Trainer, train

PRETRAIN = str(ROOT / "configs/train/tiny_image_pretrain.yaml")
WORKER = Path(__file__).resolve().parent / "dist_train_worker.py"


def _cfg(corpus, out, **extra):
    return load_config(TrainConfig, PRETRAIN, tiny_train_overrides(corpus, out, **extra))


def _trainable(out: Path, step: int) -> dict:
    """The trainable parameters of checkpoint `step`, whole (every rank's pieces merged)."""
    return read_tensors(out / "checkpoints" / f"step_{step}", "model.")


COMMON = dict(max_steps=3, checkpoint_every=1, keep_last=5, save_final="false", **{"data.shuffle": "false", "optim.warmup_steps": 1})


def test_data_parallel_equals_single_process(shapes_corpus, tmp_path):
    one = tmp_path / "dp1"
    train(_cfg(shapes_corpus, one, micro_batch_size=8, **COMMON))
    two = tmp_path / "dp2"
    run_torchrun(WORKER, PRETRAIN, json.dumps(tiny_train_overrides(shapes_corpus, two, micro_batch_size=4, **COMMON)))
    ref, got = _trainable(one, 3), _trainable(two, 3)
    assert set(got) == set(ref)
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, atol=1e-6, rtol=0, msg=name)
    losses1 = [m["loss"] for m in read_metrics(one / "metrics.jsonl")]
    losses2 = [m["loss"] for m in read_metrics(two / "metrics.jsonl")]
    assert losses1 == pytest.approx(losses2, abs=1e-5)


def test_tensor_parallel_equals_single_process(shapes_corpus, tmp_path, shared_dir):
    """TP=2 (vocabulary, heads and FFN split over 2 processes) trains to the same weights.
    Uses the real Llama 3 tokenizer: its 128256-row vocabulary splits evenly."""
    llama_tok = {"tokenizer": str(shared_dir / "reference" / "tokenizer.model")}
    one = tmp_path / "tp1"
    train(_cfg(shapes_corpus, one, micro_batch_size=4, **COMMON, **llama_tok))
    two = tmp_path / "tp2"
    run_torchrun(WORKER, PRETRAIN, json.dumps(tiny_train_overrides(shapes_corpus, two, micro_batch_size=4, tp=2, **COMMON, **llama_tok)))
    # The checkpoint holds every tensor whole (DCP places each TP rank's shard).
    ref, merged = _trainable(one, 3), _trainable(two, 3)
    assert set(merged) == set(ref)
    for name, t in ref.items():
        torch.testing.assert_close(merged[name], t, atol=1e-5, rtol=0, msg=name)


def test_frozen_decoder_unchanged_and_without_optimizer_state(shapes_corpus, tmp_path):
    cfg = _cfg(shapes_corpus, tmp_path / "frozen", max_steps=4, checkpoint_every=4, save_final="false")
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("text_model.layers.")}
    vision_before = trainer.model.vision_model.vision_encoder.class_embedding.detach().clone()
    trainer.fit()
    for n, p in trainer.model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
            assert p.grad is None and p not in trainer.optimizer.state, n
    assert not torch.equal(trainer.model.vision_model.vision_encoder.class_embedding, vision_before)
    n_state = len(trainer.optimizer.state)
    assert n_state == len(trainer.params) and all(p.requires_grad for p in trainer.optimizer.state)


def test_sigkill_and_resume_reproduce_uninterrupted_losses(shapes_corpus, tmp_path):
    steps = 8
    ref = tmp_path / "ref"
    train(_cfg(shapes_corpus, ref, max_steps=steps, checkpoint_every=2, save_final="false"))
    want = [m["loss"] for m in read_metrics(ref / "metrics.jsonl")]

    out = tmp_path / "killed"
    args = [sys.executable, str(ROOT / "tools/train.py"), "--config", PRETRAIN,
            *tiny_train_overrides(shapes_corpus, out, max_steps=steps, checkpoint_every=2, save_final="false")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a checkpoint exists and training is past it
        rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        if any(d.name == "step_4" for d in (out / "checkpoints").glob("step_*")) and len(rows) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not any(p.name.endswith(".tmp") and (p / "meta.json").exists() for p in (out / "checkpoints").iterdir())
    subprocess.run([*args, "--resume"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))
    assert got == want  # bitwise: deterministic CPU


def test_corrupt_data_is_skipped_and_reported(shapes_corpus, tmp_path):
    """A manifest with a truncated JPEG, a corrupt file, a missing file, a bad JSON line
    and an empty caption trains to the end and reports each skip in metrics.jsonl."""
    from PIL import Image

    d = tmp_path / "bad"
    d.mkdir()
    good = []
    for i in range(6):
        Image.new("RGB", (56, 28), (40 * i, 200, 30)).save(d / f"ok{i}.jpg")
        good.append({"image": f"ok{i}.jpg", "caption": "a red circle at the top left."})
    Image.new("RGB", (64, 64), (9, 9, 9)).save(d / "full.jpg")
    (d / "trunc.jpg").write_bytes((d / "full.jpg").read_bytes()[:200])
    (d / "garbage.jpg").write_bytes(b"not an image at all")
    lines = [json.dumps(g) for g in good]
    lines += [json.dumps({"image": "trunc.jpg", "caption": "a blue square at the top right."}),
              json.dumps({"image": "garbage.jpg", "caption": "a blue square at the top right."}),
              json.dumps({"image": "missing.jpg", "caption": "a blue square at the top right."}),
              '{"image": "ok1.jpg", "caption": ',
              json.dumps({"image": "ok2.jpg", "caption": "   "})]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    cfg = load_config(TrainConfig, PRETRAIN, tiny_train_overrides(
        shapes_corpus, out, max_steps=4, checkpoint_every=4, save_final="false", micro_batch_size=4,
        **{"data.kind": "caption_jsonl", "data.paths": f'["{d / "train.jsonl"}"]'}))
    trainer = Trainer(cfg)
    trainer.fit()
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 4 and rows[-1]["skipped_samples"] >= 5
    reasons = trainer.loader.skipped
    assert reasons.get("bad_image", 0) >= 2 and reasons.get("missing_image", 0) >= 1
    assert reasons.get("bad_json", 0) >= 1 and reasons.get("empty_text", 0) >= 1


def test_dpo_loss_hand_computed():
    import math

    from llama_vision.training.losses import dpo_loss, sequence_logps

    losses, margin = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]), beta=0.5)
    # margin = (-3 + 5) - (-4 + 4.5) = 1.5 ; loss = -log(sigmoid(0.75))
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.75))), abs=1e-6)
    assert margin.item() == pytest.approx(0.75)
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), 0.0]]])  # p = [1/4, 3/4], [2/3, 1/3]
    labels = torch.tensor([[1, -100]])
    assert sequence_logps(logits, labels).item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_init_block_sets_trainable_gates_and_scales_vision_positions(shapes_corpus, tmp_path):
    from llama_vision.training.build import build_training_model, is_gate
    from llama_vision.tokenizer import load_tokenizer

    base_cfg = _cfg(shapes_corpus, tmp_path / "a")
    tok = load_tokenizer(base_cfg.tokenizer)
    base = build_training_model(base_cfg, tok)
    cfg = _cfg(shapes_corpus, tmp_path / "b", **{"init.gates": 1.0, "init.vision_pos_embed_scale": 3.0,
                                                 "trainable.vision": "false"})
    model = build_training_model(cfg, tok)
    ref = dict(base.named_parameters())
    gates = [n for n, _ in model.named_parameters() if is_gate(n)]
    assert any(n.startswith("text_model.cross_attention_layers") for n in gates)
    for n, p in model.named_parameters():
        if is_gate(n):
            # Trainable gates (adapters) open; the frozen encoder's gates keep their values.
            expected = torch.full_like(p, 1.0) if p.requires_grad else ref[n]
            assert torch.equal(p, expected), n
        elif "pos_embed" not in n and n != "vision_model.vision_encoder.positional_embedding":
            assert torch.equal(p, ref[n]), n
    enc, enc0 = model.vision_model.vision_encoder, base.vision_model.vision_encoder
    assert torch.equal(enc.positional_embedding, enc0.positional_embedding)  # frozen: untouched
    cfg = _cfg(shapes_corpus, tmp_path / "c", **{"init.vision_pos_embed_scale": 3.0})
    enc = build_training_model(cfg, tok).vision_model.vision_encoder
    assert torch.allclose(enc.positional_embedding, 3 * enc0.positional_embedding)
    assert torch.allclose(enc.pre_tile_pos_embed.embedding, 3 * enc0.pre_tile_pos_embed.embedding)
    assert torch.allclose(enc.post_tile_pos_embed.embedding, 3 * enc0.post_tile_pos_embed.embedding)


def _poison_gradients(trainer, bad_steps: set[int], value: float) -> None:
    """Replace one trainable parameter's gradient by `value` on the given (1-based) steps."""
    p = trainer.params[0]
    p.register_hook(lambda g: torch.full_like(g, value) if trainer.step + 1 in bad_steps else g)


@pytest.mark.parametrize("value, clip", [(float("inf"), "1.0"), (float("nan"), "null")])
def test_nonfinite_gradient_skips_the_step_counts_it_and_writes_no_checkpoint(shapes_corpus, tmp_path, value, clip):
    out = tmp_path / "run"
    cfg = _cfg(shapes_corpus, out, max_steps=5, checkpoint_every=1, keep_last=10, save_final="false",
               **{"optim.grad_clip": clip})
    trainer = Trainer(cfg)
    _poison_gradients(trainer, {3}, value)
    trainer.fit()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["skipped_nonfinite"] for r in rows] == [0, 0, 1, 1, 1]
    assert sorted(d.name for d in (out / "checkpoints").glob("step_*")) == ["step_1", "step_2", "step_4", "step_5"]
    # Skipped: no optimizer step (every parameter has 4 AdamW steps, not 5), no scheduler
    # step, and the weights stayed finite.
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {4}
    assert trainer.scheduler.last_epoch == 4
    assert all(torch.isfinite(p).all() for p in trainer.params)
    step4 = out / "checkpoints" / "step_4"
    assert json.loads((step4 / "train_state.json").read_text())["progress"]["skipped_nonfinite"] == 1
    assert all(torch.isfinite(t).all() for t in _trainable(out, 4).values())


def test_consecutive_nonfinite_steps_stop_the_run_naming_the_step(shapes_corpus, tmp_path):
    cfg = _cfg(shapes_corpus, tmp_path / "run", max_steps=8, checkpoint_every=100, save_final="false",
               max_consecutive_nonfinite=3)
    trainer = Trainer(cfg)
    _poison_gradients(trainer, {2, 3, 4}, float("inf"))
    with pytest.raises(FloatingPointError, match=r"step 4: 3 consecutive steps with a non-finite"):
        trainer.fit()


def test_global_batch_is_printed_and_paper_configs_reach_the_paper_batches(shapes_corpus, tmp_path, capsys):
    from llama_vision.training.metrics import global_batch_line

    Trainer(_cfg(shapes_corpus, tmp_path / "run", micro_batch_size=4, grad_accum_steps=3))
    assert "4 micro-batch x 3 accumulation x 1 data-parallel (world 1 / TP 1) = 12 samples, up to 768 tokens" in capsys.readouterr().out
    # The paper's batches on the configs' stated cluster: 32 nodes x 8 GPUs.
    for name, want in (("image_pretrain", 16384), ("image_anneal", 16384), ("video_pretrain", 4096)):
        cfg = load_config(TrainConfig, ROOT / "configs" / "train" / f"{name}.yaml")
        dp = 256 // cfg.tp
        assert cfg.micro_batch_size * cfg.grad_accum_steps * dp == want, name
        assert f"= {want:,} samples" in global_batch_line(cfg, 256, cfg.tp, dp)


def test_micro_batches_reach_the_device_one_at_a_time(shapes_corpus, tmp_path, monkeypatch):
    """grad_accum_steps micro-batches: each is moved to the device right before its own
    forward (device memory holds one, not all of them)."""
    from llama_vision.data.batch import Batch

    events = []
    to = Batch.to
    monkeypatch.setattr(Batch, "to", lambda self, *a, **k: events.append("to") or to(self, *a, **k))
    trainer = Trainer(_cfg(shapes_corpus, tmp_path / "run", max_steps=1, micro_batch_size=2, grad_accum_steps=3,
                           checkpoint_every=100, save_final="false"))
    loss_sum = trainer.objective.loss_sum
    monkeypatch.setattr(trainer.objective, "loss_sum", lambda b: events.append("forward") or loss_sum(b))
    trainer.fit()
    assert events == ["to", "forward"] * 3


def test_dpo_pair_scorer_equals_separate_forwards_and_reference_holds_trainables_only(shapes_corpus, tmp_path):
    """The one-forward, one-encoding pair score equals scoring chosen and rejected with two
    ordinary forwards; the reference is the trainable tensors only, and scoring with it
    equals a full copy of the model holding those values."""
    import copy

    from llama_vision.data.synthetic.chat_sets import write_chat_sets
    from llama_vision.training.losses import sequence_logps

    chat = write_chat_sets(tmp_path / "chat", n=4)
    cfg = load_config(TrainConfig, ROOT / "configs/train/tiny_image_dpo.yaml", tiny_train_overrides(
        shapes_corpus, tmp_path / "dpo", max_steps=1, micro_batch_size=3, init_from="null", save_final="false",
        **{"data.paths": f'["{chat["dpo"]}"]', "init.gates": 0.5}))
    trainer = Trainer(cfg)
    objective, model = trainer.objective, trainer.model
    assert set(objective.reference) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text_model.layers.") for n in objective.reference)
    batch = next(iter(trainer.loader))
    assert batch.images is not None and len(batch) == 3

    def separate(m):
        return [sequence_logps(m(b.tokens, b.images, b.aspect_ratios), b.labels) for b in (batch.chosen, batch.rejected)]

    with torch.no_grad():
        got = objective.scorer(batch)
        want = separate(model)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
        # Move the policy away from the reference, then score with the reference.
        full_copy = copy.deepcopy(model)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
        ref = torch.func.functional_call(objective.scorer, {f"model.{n}": t for n, t in objective.reference.items()}, (batch,))
        for g, w in zip(ref, separate(full_copy)):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
        assert not torch.allclose(objective.scorer(batch)[0], ref[0])


def test_unset_model_key_is_a_clear_error(tmp_path):
    from llama_vision.training.build import load_model_params

    with pytest.raises(ValueError, match="config key `model` is not set"):
        load_model_params(TrainConfig().model)
    with pytest.raises(FileNotFoundError, match="model params not found"):
        load_model_params(str(tmp_path / "nope.yaml"))


def test_profile_flag_writes_a_trace_and_metrics_carry_peak_memory(shapes_corpus, tmp_path):
    out = tmp_path / "prof"
    subprocess.run([sys.executable, str(ROOT / "tools/train.py"), "--config", PRETRAIN, "--profile", "1",
                    *tiny_train_overrides(shapes_corpus, out, max_steps=3, checkpoint_every=100, save_final="false")],
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trace = json.loads((out / "profile" / "rank_0.json").read_text())
    assert trace["traceEvents"] and (out / "profile" / "rank_0.txt").read_text().strip()
    rows = read_metrics(out / "metrics.jsonl")
    assert all(r["peak_memory_gib"] == r["peak_memory_gib/rank_0"] > 0.05 for r in rows)


def test_group_lr_multipliers_scale_each_groups_step(shapes_corpus, tmp_path):
    """optim.group_lr_multipliers: AdamW's first step moves each parameter by ~lr (its
    normalised gradient is +-1), so the largest move of the ViT's weights is a quarter of
    the adapters' with {vision: 0.25}; an unknown group is an error naming the known ones."""
    from llama_vision.training.trainer import Trainer

    over = {"max_steps": 1, "save_final": "false", "checkpoint_every": 100, "optim.warmup_steps": 0,
            "optim.weight_decay": 0.0, "optim.grad_clip": "null", "optim.min_lr_ratio": 1.0, "init.gates": 1.0}
    trainer = Trainer(_cfg(shapes_corpus, tmp_path / "g", **over, **{"optim.group_lr_multipliers": "{vision: 0.25}"}))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.fit()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters() if n in before}
    lr = trainer.cfg.optim.lr
    vision = max(v for n, v in moved.items() if n.startswith("vision_model.vision_encoder."))
    adapters = max(v for n, v in moved.items() if n.startswith("text_model.cross_attention_layers.") and "gate" not in n)
    assert adapters == pytest.approx(lr, rel=1e-3) and vision == pytest.approx(0.25 * lr, rel=1e-3)
    with pytest.raises(ValueError, match="unknown group.*'vison'.*adapters"):
        Trainer(_cfg(shapes_corpus, tmp_path / "h", **over, **{"optim.group_lr_multipliers": "{vison: 0.25}"}))
