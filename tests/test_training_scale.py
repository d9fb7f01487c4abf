"""Training at scale on CPU (gloo, loopback): FSDP2 inside fairscale TP, and distributed
checkpoints that resume at another layout.

* 4 processes, TP=2 x FSDP DP=2, equal one process on the same global batch (1e-5); each
  rank holds a quarter of the TP-split frozen weights, and of their AdamW state none.
* The 2 x 2 run stopped at step 3 resumes on ONE process (TP=1, DP=1) to step 6 equal to
  an uninterrupted one-process run: TP shards and FSDP shards both re-cut by DCP.
* DP=2 FSDP (also with activation checkpointing) equals one process; stopped at step 3 it
  resumes on one process, and at DP=2 with 2 DataLoader workers per rank, both equal to
  the uninterrupted runs; a rank loading the DP=2 checkpoint at DP=2 asks DCP for its
  half only; final/ of a bf16-frozen FSDP run equals one process's.
* async checkpoints hold the state of their step although training went on while they
  were written; a checkpoint killed mid-write is never picked.

Shuffling is on: the record order is one global order whatever the layout.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _helpers import ROOT, run_torchrun, tiny_train_overrides
from llama_vision.config import load_config
from llama_vision.training.dcp_checkpoint import DistributedCheckpointer, read_tensors
from llama_vision.training.checkpointing import CheckpointManager
from llama_vision.training.metrics import read_metrics
from llama_vision.training.train_config import TrainConfig
from llama_vision.training.trainer import Trainer

PRETRAIN = str(ROOT / "configs" / "train" / "tiny_image_pretrain.yaml")
WORKER = Path(__file__).resolve().parent / "dist_train_scenarios.py"
STEPS = 6
COMMON = {"max_steps": STEPS, "checkpoint_every": 3, "keep_last": 5, "save_final": "false", "optim.warmup_steps": 2,
          "init_from": "null", "data.shuffle_buffer": 16}
GLOBAL_BATCH = 8


def _overrides(corpus, out, **extra):
    return tiny_train_overrides(corpus, out, **{**COMMON, **extra})


def _fit(corpus, out, **extra) -> Trainer:
    trainer = Trainer(load_config(TrainConfig, PRETRAIN, _overrides(corpus, out, **extra)))
    trainer.fit()
    return trainer


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Trainable params and AdamW moments by name, of a one-process trainer."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    out = {f"model.{n}": p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    for p, s in trainer.optimizer.state.items():
        out.update({f"optim.{names[id(p)]}.{k}": v for k, v in s.items()})
    return out


def _dumped(path: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    d = torch.load(f"{path}.rank{rank}.pt", weights_only=True)
    out = {f"model.{n}": t for n, t in d["params"].items()}
    for n, s in d["optim"].items():
        out.update({f"optim.{n}.{k}": v for k, v in s.items()})
    return out


def _assert_same(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:5]
    for k, t in want.items():
        torch.testing.assert_close(got[k].to(t.dtype), t, atol=atol, rtol=0, msg=k)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def test_fsdp_inside_tensor_parallel_and_resume_on_one_process(shapes_corpus, tmp_path, shared_dir):
    llama = {"tokenizer": str(shared_dir / "reference" / "tokenizer.model")}
    grid, cut = tmp_path / "tp2_dp2", tmp_path / "tp2_dp2_cut"
    runs = [
        {"config": PRETRAIN, "overrides": _overrides(shapes_corpus, grid, tp=2, micro_batch_size=4, **llama), "dump": str(grid / "dump")},
        {"config": PRETRAIN, "overrides": _overrides(shapes_corpus, cut, tp=2, micro_batch_size=4, **llama), "stop_after": 3},
        # The GPU settings at this shape: frozen trunk stored in bf16, gradients reduced in bf16.
        {"config": PRETRAIN, "overrides": _overrides(shapes_corpus, tmp_path / "bf16", tp=2, micro_batch_size=4, max_steps=3,
                                                      frozen_param_dtype="bf16", reduce_dtype="bf16", save_final="true", **llama)},
    ]
    run_torchrun(WORKER, json.dumps(runs), nproc=4, timeout=600)

    one = _fit(shapes_corpus, tmp_path / "one", micro_batch_size=GLOBAL_BATCH, **llama)
    want = _state(one)
    # Every rank's dump is the whole state (FSDP shards gathered, TP shards merged by DCP's
    # checkpoint below); rank 0's holds the TP-rank-0 shards: compare through the checkpoint.
    _assert_same({f"model.{n}": t for n, t in read_tensors(grid / "checkpoints" / f"step_{STEPS}", "model.").items()},
                 {k: v for k, v in want.items() if k.startswith("model.")}, atol=1e-5)
    optim = read_tensors(grid / "checkpoints" / f"step_{STEPS}", "optim.")
    _assert_same({f"optim.{k}": v for k, v in optim.items()}, {k: v for k, v in want.items() if k.startswith("optim.")}, atol=1e-5)
    assert _losses(grid) == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    for rank in range(4):
        numel = torch.load(f"{grid / 'dump'}.rank{rank}.pt", weights_only=True)["numel"]
        frozen_held = sum(local for local, whole, trains in numel.values() if not trains)
        frozen_whole = sum(whole for local, whole, trains in numel.values() if not trains)
        # whole = the TP-local tensor: each rank holds half of its TP shard (a quarter of
        # the TP-split weights), never the replica's whole trunk.
        assert frozen_held <= 0.52 * frozen_whole, (rank, frozen_held, frozen_whole)
        # ... and a quarter of the whole model's (TP-split weights are most of it).
        full_frozen = sum(p.numel() for p in one.model.parameters() if not p.requires_grad)
        assert frozen_held <= 0.3 * full_frozen, (rank, frozen_held, full_frozen)
    no_state = {n for n, (_, _, trains) in numel.items() if not trains}
    assert not {n for n in torch.load(f"{grid / 'dump'}.rank0.pt", weights_only=True)["optim"]} & no_state

    # bf16 storage and reduction track the float32 run (same batches, 3 steps) and final/
    # holds the trunk as stored: bf16 (a file per TP rank).
    bf16 = _losses(tmp_path / "bf16")
    assert len(bf16) == 3 and bf16 == pytest.approx(_losses(grid)[:3], abs=2e-2)
    final = torch.load(tmp_path / "bf16" / "final" / "consolidated.00.pth", weights_only=True)
    assert final["text_model.layers.0.attention.wq.weight"].dtype == torch.bfloat16

    # 2 x 2 -> 1 x 1: DCP re-cuts the TP shards and the FSDP shards.
    resumed = _fit(shapes_corpus, tmp_path / "resumed", micro_batch_size=GLOBAL_BATCH,
                   resume_from=str(cut / "checkpoints" / "step_3"), **llama)
    _assert_same(_state(resumed), want, atol=1e-5)
    rows = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert [r["loss"] for r in rows] == pytest.approx(_losses(tmp_path / "one")[3:], abs=1e-5)


def test_dcp_resume_at_another_data_parallel_degree_and_worker_count(shapes_corpus, tmp_path):
    dp2 = tmp_path / "dp2"
    runs = [
        # DP=2, FSDP, micro-batch 4: the same global batch as one process with 8.
        {"config": PRETRAIN, "overrides": _overrides(shapes_corpus, dp2, micro_batch_size=4), "dump": str(dp2 / "dump")},
        # DP=2 resumed from that run's step 3 with 2 DataLoader workers per rank.
        {"config": PRETRAIN, "overrides": _overrides(shapes_corpus, tmp_path / "dp2_workers", micro_batch_size=4,
                                                      resume_from=str(dp2 / "checkpoints" / "step_3"), **{"data.num_workers": 2}),
         "dump": str(tmp_path / "dp2_workers" / "dump")},
        # FSDP units recomputed in backward (activation checkpointing of every kind).
        {"config": PRETRAIN, "overrides": _overrides(shapes_corpus, tmp_path / "dp2_ac", micro_batch_size=4, activation_checkpointing="true"),
         "dump": str(tmp_path / "dp2_ac" / "dump")},
        # FSDP with the frozen trunk stored in bf16, to the final Meta-format checkpoint.
        {"config": PRETRAIN, "overrides": _overrides(shapes_corpus, tmp_path / "dp2_bf16", micro_batch_size=4, max_steps=2,
                                                      save_final="true", frozen_param_dtype="bf16")},
    ]
    run_torchrun(WORKER, json.dumps(runs), timeout=600)

    one = _fit(shapes_corpus, tmp_path / "one", micro_batch_size=GLOBAL_BATCH)
    want = _state(one)
    _assert_same(_dumped(dp2 / "dump"), want, atol=1e-6)
    _assert_same(_dumped(tmp_path / "dp2_ac" / "dump"), want, atol=1e-6)
    # The worker-count change at DP=2: the same global batches, so the same run.
    _assert_same(_dumped(tmp_path / "dp2_workers" / "dump"), want, atol=1e-6)
    for rank in range(2):  # what a rank asked DCP for while loading: its half, not the whole
        loaded = torch.load(f"{tmp_path / 'dp2_workers' / 'dump'}.rank{rank}.pt", weights_only=True)["loaded"]
        assert 0 < loaded["local"] <= 0.55 * loaded["whole"], loaded

    # DP=2 -> one process, and one process with 0 -> 2 workers.
    resumed = _fit(shapes_corpus, tmp_path / "dp1", micro_batch_size=GLOBAL_BATCH, resume_from=str(dp2 / "checkpoints" / "step_3"))
    _assert_same(_state(resumed), want, atol=1e-6)
    workers = _fit(shapes_corpus, tmp_path / "dp1_workers", micro_batch_size=GLOBAL_BATCH, **{"data.num_workers": 2},
                   resume_from=str(tmp_path / "one" / "checkpoints" / "step_3"))
    _assert_same(_state(workers), want, atol=1e-6)
    assert [r["loss"] for r in read_metrics(tmp_path / "dp1_workers" / "metrics.jsonl")] == pytest.approx(_losses(tmp_path / "one")[3:], abs=1e-6)

    # final/ of the FSDP run: every tensor gathered whole, frozen ones as stored (bf16),
    # equal to one process's final/ of the same bf16-frozen run.
    _fit(shapes_corpus, tmp_path / "dp1_bf16", micro_batch_size=GLOBAL_BATCH, max_steps=2, save_final="true", frozen_param_dtype="bf16")
    got, want = (torch.load(tmp_path / d / "final" / "consolidated.00.pth", weights_only=True) for d in ("dp2_bf16", "dp1_bf16"))
    assert got.keys() == want.keys()
    assert got["text_model.layers.0.attention.wq.weight"].dtype == torch.bfloat16
    assert got["vision_model.vision_encoder.class_embedding"].dtype == torch.float32
    for k, t in want.items():
        assert got[k].dtype == t.dtype, k
        torch.testing.assert_close(got[k], t, atol=1e-6, rtol=0, msg=k)


def test_async_checkpoint_holds_its_step_and_torn_saves_are_never_picked(shapes_corpus, tmp_path):
    ref = _fit(shapes_corpus, tmp_path / "ref", micro_batch_size=4)
    out = tmp_path / "async"
    # Step 3 is written in the background while steps 4-6 train, committed at step 6's save.
    _fit(shapes_corpus, out, micro_batch_size=4, checkpoint_async="true")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]
    _assert_same({f"model.{n}": t for n, t in read_tensors(out / "checkpoints" / "step_6", "model.").items()},
                 {k: v for k, v in _state(ref).items() if k.startswith("model.")}, atol=0)
    shutil.rmtree(out / "checkpoints" / "step_6")
    resumed = Trainer(load_config(TrainConfig, PRETRAIN, _overrides(shapes_corpus, out, micro_batch_size=4)))
    resumed.fit(resume=True)
    _assert_same(_state(resumed), _state(ref), atol=0)  # bitwise: the snapshot was not disturbed

    # A save killed after DCP wrote everything but before the commit, and one killed while
    # writing the tensors: neither is picked.
    manager = CheckpointManager(out, keep_last=None)
    torn = out / "checkpoints" / "step_9.tmp"
    shutil.copytree(out / "checkpoints" / "step_6", torn)
    (torn / "meta.json").unlink()
    half = out / "checkpoints" / "step_8"
    shutil.copytree(out / "checkpoints" / "step_6", half)
    (half / ".metadata").unlink()
    assert DistributedCheckpointer(manager).latest() == out / "checkpoints" / "step_6"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        DistributedCheckpointer.checked(half)


def test_old_per_rank_checkpoints_are_refused_clearly(shapes_corpus, tmp_path):
    CheckpointManager(tmp_path).save(3, {"step": 3, "trainable": {}})  # the older layout
    trainer = Trainer(load_config(TrainConfig, PRETRAIN, _overrides(shapes_corpus, tmp_path, micro_batch_size=4)))
    with pytest.raises(ValueError, match="older per-rank layout"):
        trainer.fit(resume=True)
