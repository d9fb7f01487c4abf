"""benchmarks/serve_load.py --quick runs end to end (tiny model, seconds) and writes the
JSON the docs read. No timing assertions: the speed target lives in the benchmark."""
from __future__ import annotations

import json
import subprocess
import sys

from _helpers import ROOT

RUN_FIELDS = {"requests", "output_tokens", "wall_s", "tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s"}


def test_serve_load_quick(tmp_path):
    out = tmp_path / "serve_load.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/serve_load.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["config"]["quick"] is True
    seq = result["sequential"]
    assert RUN_FIELDS <= seq.keys()
    n, new = result["config"]["requests"], result["config"]["new_tokens"]
    assert seq["requests"] == n and seq["output_tokens"] == n * new  # stop tokens ignored
    assert set(result["engine"]) == {"native", "streaming"}
    for layout, runs in result["engine"].items():
        assert set(runs) == {str(c) for c in result["config"]["concurrency"]}
        for c, run in runs.items():
            assert RUN_FIELDS | {"mean_decode_batch", "speedup_vs_sequential", "agreement_with_sequential", "profile"} <= run.keys()
            assert run["requests"] == n and run["output_tokens"] == n * new, (layout, c)
            assert 1 <= run["mean_decode_batch"] <= int(c)
            assert run["latency_p50_s"] <= run["latency_p99_s"]
            agree = run["agreement_with_sequential"]
            assert 0 <= agree["match_rate"] <= 1 and agree["requests"] == n
            assert {"seconds", "fraction_of_wall", "decode_step_by_batch"} <= run["profile"].keys()
        assert set(result["target"][layout]) >= {"speedup", "met", "target", "concurrency"}
