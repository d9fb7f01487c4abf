"""benchmarks/gpu_check.py --tiny: every stage runs on the CPU and reports real numbers
(the prepared GPU check is exercised in CI; its figures come from a GPU session)."""
from __future__ import annotations

import json
import subprocess
import sys

from _helpers import ROOT


def test_gpu_check_tiny_runs_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    stages = json.loads(out.read_text())["stages"]
    assert list(stages) == ["numerics", "kernels", "decode", "train_step", "compile"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    assert stages["numerics"]["fp32_max_abs_logit_diff"] <= 1e-3 and 0.5 < stages["numerics"]["bf16_top1_agreement"] <= 1
    for s in ("S=1", "S=64"):  # folded GQA equals repeated K/V
        assert stages["kernels"][s]["max_abs_diff"] < 1e-5 and stages["kernels"][s]["folded_ms"] > 0
    assert [r["batch"] for r in stages["decode"]["rows"]] == [1, 16] and all(r["decode_tok_s_batch"] > 0 for r in stages["decode"]["rows"])
    assert stages["train_step"]["step_s"] > 0 and stages["train_step"]["tflops_per_s"] > 0
    assert stages["compile"]["tokens_equal"] is True
