"""Tensor parallelism for real: 2 CPU processes, gloo, loopback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _helpers import run_torchrun

WORKER = Path(__file__).resolve().parent / "dist_tp_worker.py"


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1}], ids=["kv_sharded", "kv_replicated"])
def test_tp2_logits_equal_tp1(tmp_path, overrides):
    out = tmp_path / "result"
    run_torchrun(WORKER, str(out), json.dumps(overrides))
    for rank in (0, 1):
        r = json.loads(Path(f"{out}.{rank}").read_text())
        assert r["max_diff"] < 1e-5, r
        assert r["max_diff_text"] < 1e-5, r
        assert r["n_sharded"] > 20 and r["all_halves"], r
        assert r["grad_worst"][1] < 1e-5, r  # gradients (after TP sync) equal TP=1's
    sampled = [json.loads(Path(f"{out}.{rank}").read_text())["sampled"] for rank in (0, 1)]
    assert sampled[0] == sampled[1] and len(sampled[0][0]) == 6  # seed=None sampling agrees across TP
