"""build_model: the ambient default device, and clear errors for unresolved or mistyped
params (issue #12, item 10)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import tiny_params

import llama_vision.model.builder as builder_mod
from llama_vision.model import ModelArgs, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs/model/tiny.yaml"


@pytest.fixture
def init_calls(monkeypatch):
    """Records every init_weights call build_model makes (and still runs it)."""
    calls = []
    real = builder_mod.init_weights

    def spy(model, *a, **kw):
        calls.append(model)
        return real(model, *a, **kw)

    monkeypatch.setattr(builder_mod, "init_weights", spy)
    return calls


def test_ambient_meta_device_builds_on_meta_without_init(init_calls):
    """`with torch.device("meta")` is honoured: shapes only, nothing allocated or drawn (a
    90B build there used to allocate ~360 GB on the host)."""
    with torch.device("meta"):
        model = build_model(tiny_params())
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert tensors and {n for n, t in tensors.items() if not t.is_meta} == set()
    assert init_calls == []
    assert model.text_model.output.weight.shape == (512, 64)


def test_explicit_device_wins_over_the_ambient_one(init_calls):
    """device="cpu" under an ambient meta device: a real, initialised CPU model with exactly
    the weights of a plain build (the draws do not follow the ambient device)."""
    want = build_model(tiny_params(), seed=3)
    with torch.device("meta"):
        got = build_model(tiny_params(), device="cpu", seed=3)
    assert any(m is got for m in init_calls)  # initialised, on the CPU
    sw, sg = want.state_dict(), got.state_dict()
    assert sg.keys() == sw.keys()
    for k in sw:
        assert sg[k].device.type == "cpu", k
        assert torch.equal(sg[k], sw[k]), k
    with torch.device("cpu"):
        meta = build_model(tiny_params(), device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_vocab_size_auto_is_a_clear_error():
    """tiny.yaml says `vocab_size: auto` (the trainer resolves it from the tokenizer); built
    directly it used to die with "not all arguments converted during string formatting"."""
    with pytest.raises(ValueError, match=r"vocab_size='auto' \(in .*tiny\.yaml\) must be resolved to a number.*build_model\(path, vocab_size=N\).*trainer with a tokenizer"):
        build_model(TINY_YAML)
    with pytest.raises(ValueError, match=r"vocab_size=None must be resolved"):
        ModelArgs.from_params(tiny_params(vocab_size=None))


def test_vocab_size_override_resolves_auto():
    """An override is the number the error asks for: tiny.yaml + vocab_size=512 is exactly
    the tests' tiny config, and it builds and runs."""
    assert ModelArgs.from_params(TINY_YAML, vocab_size=512) == ModelArgs.from_params(tiny_params())
    model = build_model(TINY_YAML, vocab_size=512, device="meta")
    assert model.args.vocab_size == 512 and model.text_model.output.weight.shape[0] == 512


@pytest.mark.parametrize("key, value, expected", [
    ("dim", "abc", "int"),
    ("dim", 64.0, "int"),
    ("n_layers", True, "int"),
    ("n_kv_heads", "two", "int | None"),
    ("use_scaled_rope", "yes", "bool"),
    ("attn_backend", 3, "str"),
    ("vision_intermediate_layers", [1, "x"], "tuple[int, ...]"),
    ("video", "on", "dict | None"),
])
def test_mistyped_param_names_key_expected_type_and_value(key, value, expected):
    want = f"model param {key}: expected {expected}, got {value!r} ({type(value).__name__})"
    with pytest.raises(ValueError, match=re.escape(want)):
        ModelArgs.from_params(tiny_params(**{key: value}))


def test_mistyped_param_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(TINY_YAML.read_text().replace("vocab_size: auto", "vocab_size: 512").replace("dim: 64", "dim: sixty-four"))
    with pytest.raises(ValueError, match=re.escape(f"model param dim (in {path}): expected int, got 'sixty-four' (str)")):
        build_model(path)
    path.write_text(TINY_YAML.read_text().replace("vocab_size: auto", "vocab_size: 512").replace("norm_eps: 1.0e-5", "norm_eps: tiny"))
    with pytest.raises(ValueError, match=r"model param norm_eps='tiny' \(in .*model\.yaml\) is not a number"):
        build_model(path)


def test_well_typed_values_still_accepted():
    """Numbers from numpy, ints for float fields and YAML 1.1's string floats ("1e-05") are fine."""
    args = ModelArgs.from_params(tiny_params(dim=np.int64(64), rope_theta=500000, norm_eps="1e-05", vision_mlp_ratio="4.0"))
    assert args.dim == 64 and args.norm_eps == 1e-5 and args.vision_mlp_ratio == 4.0
