"""Tests for llama_vision.utils.io and llama_vision.training (CPU only, fast)."""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import signal
import socket
import struct
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llama_vision.training import (
    CheckpointManager,
    MetricsLogger,
    ThroughputMeter,
    build_adamw,
    build_lr_scheduler,
    capture_rng_state,
    clip_grad_norm_,
    count_parameters,
    estimate_mfu,
    plot_metrics,
    read_metrics,
    restore_rng_state,
    warmup_cosine,
)
from llama_vision.utils import io as lv_io
from llama_vision.utils.io import (
    CheckpointFormatError,
    atomic_dir,
    atomic_save_safetensors,
    atomic_save_torch,
    atomic_write_bytes,
    atomic_write_text,
    load_torch,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def listing(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def all_files(root) -> list:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


# ============================================================================ utils/io


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "hello")
    atomic_write_bytes(target, b"world")
    assert target.read_bytes() == b"world"
    assert listing(target.parent) == ["f.txt"]


def test_crash_during_replace_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(*args, **kwargs):
        raise OSError("simulated crash at rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(target, b"new")
    with pytest.raises(OSError, match="simulated"):
        atomic_save_torch({"x": torch.ones(2)}, target)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["f.bin"]


def test_exception_while_writing_keeps_old_file(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with lv_io.atomic_open(target) as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["f.bin"]


def test_torch_save_load_weights_only(tmp_path):
    obj = {"w": torch.arange(6.0).view(2, 3), "step": 3, "names": ["a", "b"], "lr": 0.5, "none": None}
    atomic_save_torch(obj, tmp_path / "x.pt")
    loaded = load_torch(tmp_path / "x.pt")
    assert torch.equal(loaded["w"], obj["w"]) and loaded["step"] == 3 and loaded["names"] == ["a", "b"]
    assert torch.load(tmp_path / "x.pt", weights_only=True)["lr"] == 0.5


class _NotPlain:
    def __init__(self):
        self.x = 1


def test_load_torch_errors_name_the_file(tmp_path):
    bad = tmp_path / "pickled.pt"
    torch.save({"obj": _NotPlain()}, bad)
    with pytest.raises(CheckpointFormatError, match="pickled.pt"):
        load_torch(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointFormatError, match="garbage.pt"):
        load_torch(garbage)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_torch(tmp_path / "missing.pt")


def test_atomic_save_safetensors(tmp_path):
    from safetensors import safe_open

    t = torch.randn(4, 5)
    atomic_save_safetensors({"a": t.t(), "b": torch.zeros(2)}, tmp_path / "m.safetensors", metadata={"fmt": "pt"})
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == {"fmt": "pt"}
        assert torch.equal(f.get_tensor("a"), t.t())
    assert listing(tmp_path) == ["m.safetensors"]


def test_atomic_dir_success_and_replace(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("1")
        assert not final.exists()  # invisible until the block succeeds
    assert listing(final) == ["a.txt"]
    with atomic_dir(final) as d:
        (d / "b.txt").write_text("2")
    assert listing(final) == ["b.txt"]
    assert listing(tmp_path) == ["ckpt"]  # no temp or .old dirs left


def test_atomic_dir_exception_keeps_old_dir(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(final) as d:
            (d / "a.txt").write_text("new")
            raise ValueError("crash while writing the checkpoint")
    assert (final / "a.txt").read_text() == "old"
    assert listing(tmp_path) == ["ckpt"]


def test_atomic_dir_failed_rename_rolls_back(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # 1st: move old aside, 2nd: move new into place -> fails
            raise OSError("simulated crash at rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        with atomic_dir(final) as d:
            (d / "a.txt").write_text("new")
    monkeypatch.undo()
    assert (final / "a.txt").read_text() == "old"
    assert listing(tmp_path) == ["ckpt"]


# ============================================================================ checkpointing


def _tiny_training_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = build_adamw(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    sched = build_lr_scheduler(opt, warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "step": 3,
        "np_loss": np.float64(0.25),
    }


def test_checkpoint_roundtrip_every_file_weights_only(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    state = _tiny_training_state()
    path = mgr.save(3, state, metadata={"config": {"lr": 0.01}})
    assert path == tmp_path / "checkpoints" / "step_3" and mgr.latest() == path
    assert listing(path) == ["meta.json", "rank_00000.pt"]
    for f in all_files(tmp_path):  # every file we wrote loads as plain data
        if f.endswith(".pt"):
            torch.load(f, weights_only=True)
    meta = CheckpointManager.read_meta(path)
    assert meta["step"] == 3 and meta["world_size"] == 1 and meta["metadata"] == {"config": {"lr": 0.01}}
    loaded = mgr.load()
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["step"] == 3 and loaded["np_loss"] == 0.25 and type(loaded["np_loss"]) is float
    # The loaded optimizer/scheduler state resumes into fresh objects.
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = build_adamw(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    sched = build_lr_scheduler(opt, warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    opt.load_state_dict(loaded["optimizer"])
    sched.load_state_dict(loaded["scheduler"])
    assert sched.last_epoch == 3 and sched.get_last_lr() == state["scheduler"]["_last_lr"]


def test_checkpoint_compacts_views_and_rejects_non_plain(tmp_path):
    mgr = CheckpointManager(tmp_path)
    big = torch.zeros(1_000_000)
    mgr.save(1, {"view": big[:10]})
    assert os.path.getsize(mgr.latest() / "rank_00000.pt") < 100_000  # not the 4 MB storage
    with pytest.raises(TypeError, match=r"state\['bad'\]\[0\].*ndarray.*from_numpy"):
        mgr.save(2, {"bad": [np.zeros(3)]})
    with pytest.raises(TypeError, match="_NotPlain"):
        mgr.save(2, {"obj": _NotPlain()})
    with pytest.raises(TypeError, match="JSON serializable"):
        mgr.save(2, {}, metadata={"obj": _NotPlain()})
    assert [s for s, _ in mgr.list_checkpoints()] == [1]


def test_keep_last_pruning(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        mgr.save(step, {"step": step})
    assert listing(tmp_path / "checkpoints") == ["step_30", "step_40"]
    assert mgr.load()["step"] == 40
    # Re-saving an older step (resume from an earlier checkpoint) never prunes the new save.
    mgr.save(5, {"step": 5})
    assert "step_5" in listing(tmp_path / "checkpoints")
    keep_all = CheckpointManager(tmp_path / "all", keep_last=None)
    for step in range(4):
        keep_all.save(step, {})
    assert len(keep_all.list_checkpoints()) == 4


def test_resave_same_step_replaces(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(7, {"v": 1})
    mgr.save(7, {"v": 2})
    assert mgr.load()["v"] == 2 and listing(tmp_path / "checkpoints") == ["step_7"]


def test_latest_ignores_incomplete_dirs(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=None)
    assert mgr.latest() is None
    mgr.save(1, {"x": torch.ones(1)})
    root = tmp_path / "checkpoints"
    # A save killed before the rename: staging dir with rank file and even meta.json.
    (root / "step_9.tmp").mkdir()
    atomic_save_torch({}, root / "step_9.tmp" / "rank_00000.pt")
    (root / "step_9.tmp" / "meta.json").write_text(json.dumps({"step": 9, "world_size": 1}))
    # A step dir without meta.json, one with a torn meta.json, one missing a rank file.
    (root / "step_10").mkdir()
    atomic_save_torch({}, root / "step_10" / "rank_00000.pt")
    (root / "step_11").mkdir()
    atomic_save_torch({}, root / "step_11" / "rank_00000.pt")
    (root / "step_11" / "meta.json").write_text('{"step": 11, "world_')
    (root / "step_12").mkdir()
    atomic_save_torch({}, root / "step_12" / "rank_00000.pt")
    (root / "step_12" / "meta.json").write_text(json.dumps({"step": 12, "world_size": 2}))
    (root / ".trash-step_13-abcd").mkdir()
    assert mgr.latest() == root / "step_1"
    with pytest.raises(FileNotFoundError, match="step_12"):
        mgr.load(root / "step_12")
    # The next successful save removes the stale staging/trash dirs, but leaves foreign dirs.
    mgr.save(2, {})
    assert listing(root) == ["step_1", "step_10", "step_11", "step_12", "step_2"]


def test_two_rank_save_simulated_in_one_process(tmp_path):
    noop = lambda: None  # noqa: E731
    r0 = CheckpointManager(tmp_path, keep_last=1, rank=0, world_size=2, barrier=noop)
    r1 = CheckpointManager(tmp_path, keep_last=1, rank=1, world_size=2, barrier=noop)
    for step in (100, 200):
        r1.save(step, {"rank": 1, "w": torch.full((2,), 1.0)})
        assert r0.latest() is None if step == 100 else r0.latest().name == "step_100"  # not yet committed
        r0.save(step, {"rank": 0, "w": torch.zeros(2)})
    root = tmp_path / "checkpoints"
    assert listing(root) == ["step_200"]
    assert listing(root / "step_200") == ["meta.json", "rank_00000.pt", "rank_00001.pt"]
    assert r1.load()["rank"] == 1 and r0.load()["rank"] == 0 and r0.load(rank=1)["rank"] == 1
    single = CheckpointManager(tmp_path, world_size=1)
    with pytest.raises(ValueError, match="saved by 2 ranks"):
        single.load(root / "step_200")


def test_rank0_refuses_to_commit_without_other_ranks(tmp_path):
    r0 = CheckpointManager(tmp_path, rank=0, world_size=2, barrier=lambda: None)
    with pytest.raises(RuntimeError, match="rank_00001.pt"):
        r0.save(1, {"x": 1})
    assert r0.latest() is None
    with pytest.raises(RuntimeError, match="needs a barrier"):
        CheckpointManager(tmp_path, rank=0, world_size=2).save(1, {})


def test_stale_staging_files_from_killed_run_are_dropped(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_5.tmp").mkdir(parents=True)
    atomic_save_torch({"old": True}, root / "step_5.tmp" / "rank_00000.pt")
    atomic_save_torch({"old": True}, root / "step_5.tmp" / "rank_00003.pt")  # bigger old world
    (root / "step_5.tmp" / ".rank_00000.pt.tmp-xyz").write_bytes(b"torn")
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, {"old": False})
    assert listing(root / "step_5") == ["meta.json", "rank_00000.pt"]
    assert mgr.load()["old"] is False


def _save_forever(root, state):
    mgr = CheckpointManager(root, keep_last=2)
    step = 0
    while True:
        step += 1
        mgr.save(step, dict(state, step=step))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_random_moments_never_exposes_incomplete_checkpoint(tmp_path):
    state = {"w": torch.randn(256, 256), "b": torch.randn(4096)}  # created before fork
    rng = random.Random(0)
    for trial in range(6):
        root = tmp_path / f"trial{trial}"
        pid = os.fork()
        if pid == 0:  # child: save in a loop until killed
            try:
                _save_forever(root, state)
            finally:
                os._exit(1)
        time.sleep(0.05 + rng.random() * 0.3)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mgr = CheckpointManager(root, keep_last=2)
        latest = mgr.latest()
        if latest is None:
            continue
        loaded = mgr.load(latest)
        assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == int(latest.name.split("_")[1])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        mgr = CheckpointManager(out_dir, keep_last=1, rank=rank, world_size=world_size, barrier=dist.barrier)
        for step in (1, 2):
            if rank == 1:
                time.sleep(0.2)  # make rank 0 wait at the barrier for the slower rank
            mgr.save(step, {"rank": rank, "step": step, "w": torch.full((3,), float(rank)), "rng": capture_rng_state()})
        # save() returns only after the commit, so every rank sees the new checkpoint now.
        latest = mgr.latest()
        assert latest is not None and latest.name == "step_2", latest
        state = mgr.load(latest)
        assert state["rank"] == rank and state["step"] == 2 and torch.equal(state["w"], torch.full((3,), float(rank)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_save_and_reload(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    root = tmp_path / "checkpoints"
    assert listing(root) == ["step_2"]
    assert listing(root / "step_2") == ["meta.json", "rank_00000.pt", "rank_00001.pt"]
    assert CheckpointManager.read_meta(root / "step_2")["world_size"] == 2
    for r in range(2):
        state = torch.load(root / "step_2" / f"rank_{r:05d}.pt", weights_only=True)
        assert state["rank"] == r


# ============================================================================ RNG


def _draw() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (4,)).tolist(),
    )


def test_rng_capture_restore_reproduces_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in both generators
    np.random.standard_normal()
    state = capture_rng_state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    expected = _draw()
    # Through a weights_only checkpoint, as in real training.
    atomic_save_torch({"rng": state}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    _draw()  # advance everything
    restore_rng_state(loaded)
    assert _draw() == expected


# ============================================================================ LR schedule


def test_warmup_cosine_hand_values():
    kw = dict(warmup_steps=10, max_steps=110, lr=1.0, min_lr=0.1)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)  # lr * 1/10
    assert warmup_cosine(4, **kw) == pytest.approx(0.5)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)  # cos(0)
    assert warmup_cosine(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(60, **kw) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine(500, **kw) == pytest.approx(0.1)
    assert warmup_cosine(0, warmup_steps=0, max_steps=10, lr=2.0, min_lr=0.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        warmup_cosine(0, warmup_steps=1, max_steps=10, lr=1.0, min_lr=2.0)


@settings(max_examples=200, deadline=None)
@given(
    warmup=st.integers(0, 50),
    extra=st.integers(1, 500),
    lr=st.floats(1e-6, 1.0),
    ratio=st.floats(0.0, 1.0),
    step=st.integers(0, 1000),
)
def test_warmup_cosine_properties(warmup, extra, lr, ratio, step):
    kw = dict(warmup_steps=warmup, max_steps=warmup + extra, lr=lr, min_lr=lr * ratio)
    value = warmup_cosine(step, **kw)
    assert value <= lr * (1 + 1e-12)
    if step < warmup:
        assert value > 0  # warmup starts at lr / warmup, never at 0
    else:
        assert value >= kw["min_lr"] * (1 - 1e-12)
        assert warmup_cosine(step + 1, **kw) <= value * (1 + 1e-12)  # non-increasing after warmup


def test_lr_scheduler_values_and_resume(tmp_path):
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_lr_scheduler(opt, warmup_steps=4, max_steps=12, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])
    assert lrs[8] == pytest.approx(2.0 * 0.55)  # halfway through the cosine
    assert lrs[12:] == pytest.approx([0.2, 0.2])
    # Resume at step 6 from a weights_only round trip.
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_lr_scheduler(opt, warmup_steps=4, max_steps=12, min_lr_ratio=0.1)
    for _ in range(6):
        opt.step()
        sched.step()
    atomic_save_torch({"s": sched.state_dict(), "o": opt.state_dict()}, tmp_path / "s.pt")
    loaded = load_torch(tmp_path / "s.pt")
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=2.0)
    sched2 = build_lr_scheduler(opt2, warmup_steps=4, max_steps=12, min_lr_ratio=0.1)
    opt2.load_state_dict(loaded["o"])
    sched2.load_state_dict(loaded["s"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[6])
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[7])


# ============================================================================ optimizer


class _AdapterModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(10, 4)
        self.frozen = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.gate = nn.Parameter(torch.zeros(1))
        self.frozen.requires_grad_(False)

    def forward(self, idx):
        h = self.frozen(self.tok_embeddings(idx))
        return self.norm(h + torch.tanh(self.gate) * self.proj(h))


def test_build_adamw_groups_frozen_and_decay():
    torch.manual_seed(0)
    model = _AdapterModel()
    opt = build_adamw(model.named_parameters(), lr=0.1, weight_decay=0.5)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 0.5 and groups["no_decay"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["decay"]["params"]} == {id(model.proj.weight)}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    expected = (model.tok_embeddings.weight, model.proj.bias, model.norm.weight, model.norm.bias, model.gate)
    assert no_decay == {id(p) for p in expected}
    frozen = {id(p) for p in model.frozen.parameters()}
    assert not frozen & (no_decay | {id(model.proj.weight)})

    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    assert all(id(p) not in frozen for p in opt.state)  # no Adam moments for frozen params
    assert len(opt.state) == 6

    # On a fresh optimizer's first step with zero gradients Adam's update is exactly 0, so only
    # decoupled weight decay can move weights.
    opt = build_adamw(model.named_parameters(), lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    opt.step()
    after = dict(model.named_parameters())
    assert not torch.allclose(after["proj.weight"], before["proj.weight"])
    for name in ("tok_embeddings.weight", "norm.weight", "norm.bias", "proj.bias", "gate", "frozen.weight"):
        assert torch.allclose(after[name], before[name], atol=1e-6), name


def test_build_adamw_rejects_all_frozen():
    lin = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_adamw(lin.named_parameters(), lr=1e-3)


def test_clip_grad_norm_with_none_grads():
    model = _AdapterModel()
    assert clip_grad_norm_(model.parameters(), 1.0) == 0.0  # no grads at all
    model.proj.weight.grad = torch.full((4, 4), 3.0)  # norm 12
    model.gate.grad = torch.tensor([5.0])
    expected = math.sqrt(16 * 9 + 25)
    assert clip_grad_norm_(model.parameters(), None) == pytest.approx(expected)
    assert model.gate.grad.item() == 5.0  # measuring does not modify
    total = clip_grad_norm_(model.parameters(), 1.0)
    assert total == pytest.approx(expected)
    after = math.sqrt(model.proj.weight.grad.pow(2).sum().item() + model.gate.grad.pow(2).sum().item())
    assert after == pytest.approx(1.0, rel=1e-4)


def test_count_parameters():
    model = _AdapterModel()
    counts = count_parameters(model)
    assert counts["total"] == 40 + 20 + 20 + 8 + 1
    assert counts["trainable"] == counts["total"] - 20


# ============================================================================ metrics


def test_metrics_jsonl_tensorboard_and_plot(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 6):
            log.log(step, loss=torch.tensor(3.0 / step), lr=1e-3 * step, tag="train", n=np.int64(step))
        log.log(6, loss=float("nan"), lr=float("inf"), grad_norm=float("-inf"))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    raw = [json.loads(line) for line in lines]  # strict JSON: no NaN/Infinity tokens
    assert raw[0]["step"] == 1 and raw[0]["loss"] == 3.0 and raw[0]["tag"] == "train" and raw[0]["n"] == 1
    assert "wall_time" in raw[0]
    assert raw[5]["loss"] == "NaN" and raw[5]["lr"] == "Infinity" and raw[5]["grad_norm"] == "-Infinity"
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(records[5]["loss"]) and records[5]["lr"] == math.inf
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100
    assert any("tfevents" in f for f in all_files(tmp_path / "tensorboard"))
    assert sorted(listing(tmp_path)) == ["loss.png", "metrics.jsonl", "tensorboard"]


def test_metrics_resume_truncates_later_steps(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 11):
        log.log(step, loss=1.0 / step)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss"')  # torn last line from a killed run
    # Resume from the checkpoint at step 6: steps 7..11 are redone.
    log = MetricsLogger(tmp_path, tensorboard=False, resume_step=6)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    for step in range(7, 9):
        log.log(step, loss=0.5)
    log.close()
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 9))
    assert not [f for f in listing(tmp_path) if ".tmp" in f]
    # A fresh run (no resume_step) starts a new file.
    MetricsLogger(tmp_path, tensorboard=False).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_metrics_nonzero_rank_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "r1", rank=1)
    log.log(1, loss=1.0)
    log.close()
    assert not (tmp_path / "r1").exists()


def test_metrics_without_tensorboard_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.warns(UserWarning, match="TensorBoard unavailable"):
        log = MetricsLogger(tmp_path)
    log.log(1, loss=2.0)
    log.close()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1 and not (tmp_path / "tensorboard").exists()


def test_plot_metrics_standalone(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps({"step": s, "loss": 1 / s, "val_loss": 2 / s}) + "\n" for s in range(1, 5)))
    plot_metrics(jsonl, tmp_path / "p.png", keys=("loss", "val_loss"))
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)
    plot_metrics(tmp_path / "absent.jsonl", tmp_path / "empty.png")  # no data still gives a PNG
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG_MAGIC)


def test_throughput_meter_and_mfu():
    meter = ThroughputMeter(window=2)
    assert meter.summary() == {"tokens_per_s": 0.0, "images_per_s": 0.0, "step_time_s": 0.0}
    meter.update(tokens=1000, images=4, seconds=1.0)
    meter.update(tokens=3000, images=4, seconds=1.0)
    assert meter.tokens_per_s == 2000 and meter.images_per_s == 4 and meter.step_time_s == 1.0
    meter.update(tokens=1000, images=0, seconds=2.0)  # window drops the first step
    assert meter.tokens_per_s == pytest.approx(4000 / 3) and meter.step_time_s == 1.5
    assert estimate_mfu(989e12, 2.0, peak_flops=989e12) == pytest.approx(0.5)
    assert estimate_mfu(1e12, 0.0, peak_flops=1e15) is None
    if not torch.cuda.is_available():
        assert estimate_mfu(1e12, 1.0) is None  # no peak on CPU
