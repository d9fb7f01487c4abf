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
