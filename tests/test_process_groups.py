"""Process groups on a GPU machine, checked on the CPU: the CUDA device is made current
before NCCL's process group exists (and handed to it), the device comes from the config,
and `device: cpu` keeps multi-process CPU training on gloo."""
from __future__ import annotations

import torch

import model_parallel as mp
from model_parallel import groups


def test_process_device_from_the_config(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert mp.process_device("cuda") == torch.device("cuda", 3)  # its local GPU
    assert mp.process_device("cuda:1") == torch.device("cuda", 1)
    assert mp.process_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mp.process_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mp.process_device(None) == torch.device("cuda", 3)


def test_nccl_binds_the_device_before_the_process_group_exists(monkeypatch):
    calls = []
    monkeypatch.setattr(groups.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))

    def init_process_group(backend, timeout, **kwargs):
        calls.append(("init_process_group", backend, kwargs.get("device_id")))
        raise RuntimeError("stop here")  # the rest needs a real group

    monkeypatch.setattr(groups.dist, "init_process_group", init_process_group)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    try:
        mp.init_model_parallel(1, device="cuda")
    except RuntimeError as e:
        assert "stop here" in str(e)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init_process_group", "nccl", torch.device("cuda", 1))]
    calls.clear()
    try:
        mp.init_model_parallel(1, device="cpu")
    except RuntimeError:
        pass
    assert calls == [("init_process_group", "gloo", None)]


def test_everything_but_tensor_parallelism_runs_without_fairscale(tmp_path):
    """The GPU machine has no fairscale: importing, building, a forward, generation and the
    TP=1 data-parallel groups need none; TP > 1 names the missing package."""
    import subprocess
    import sys

    from _helpers import ROOT

    code = """
import sys
sys.modules["fairscale"] = None  # a machine without fairscale
sys.path.insert(0, "tests")
import model_parallel as mp
from _helpers import tiny_inputs, tiny_model
from llama_vision.generation import Generator
model = tiny_model()
assert model(*tiny_inputs()).shape[-1] == 512
assert Generator(model).generate([[1, 2, 3]], max_new_tokens=2, stop_tokens=[])
mp.init_model_parallel(1)
assert (mp.tp_size(), mp.dp_size(), mp.dp_group() is not None) == (1, 1, True)
try:
    mp.layers._fairscale()
except ImportError as e:
    assert "needs fairscale: pip install fairscale" in str(e)
else:
    raise AssertionError("fairscale imported although blocked")
mp.destroy_model_parallel()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
