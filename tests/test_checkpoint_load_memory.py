"""load_model on the CPU holds each weight once: tensors read from the memory-mapped
checkpoint files are assigned to the parameters (no second copy), casts copy once, and the
result behaves like a model whose weights were copied in (performance issue #7)."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from _helpers import tiny_inputs, tiny_model, tiny_params

from llama_vision.checkpoint import load_hf_as_meta, load_model, save_hf_checkpoint, save_meta_checkpoint
from llama_vision.checkpoint.meta import build_skeleton
from llama_vision.generation import use_streaming_layout
from llama_vision.model import build_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=7)


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds `t`'s data (None: anonymous memory)."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) > 5 and parts[5].strip().startswith("/") else None
    return None


def _assert_equal_state(loaded: nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


@torch.no_grad()
def test_fp32_load_assigns_the_mapped_checkpoint_tensors(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path)
    file = str((tmp_path / "consolidated.00.pth").resolve())
    loaded = load_model(tmp_path, dtype=torch.float32)
    # Every parameter IS the checkpoint's memory-mapped tensor: no copy was allocated.
    params = dict(loaded.named_parameters())
    assert params and all(_mapped_file(p) == file for p in params.values()), [
        n for n, p in params.items() if _mapped_file(p) != file
    ][:10]
    _assert_equal_state(loaded, model.state_dict())
    # The RoPE table (in no checkpoint) is complete after the load: every row of it.
    every = torch.arange(2 * model.args.max_seq_len)[None]
    assert torch.equal(loaded.text_model.rope(every), model.text_model.rope(every))
    assert torch.equal(loaded(*tiny_inputs()), model(*tiny_inputs()))


@torch.no_grad()
def test_assigned_parameters_keep_the_skeletons_attributes(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path)
    loaded = load_model(tmp_path)
    skeleton = dict(build_skeleton(tiny_params(), torch.float32).named_parameters(remove_duplicate=False))
    params = dict(loaded.named_parameters(remove_duplicate=False))
    assert params.keys() == skeleton.keys()
    for name, p in params.items():
        assert type(p) is nn.Parameter, name
        assert p.requires_grad == skeleton[name].requires_grad, name
        assert p.is_contiguous(), name
        assert p.__dict__.keys() == skeleton[name].__dict__.keys(), name
    norm = loaded.text_model.cross_attention_layers[0].attention.q_norm.weight
    assert norm.tp_partial_grad is False  # set by the layer at build time (TP=1)
    assert not loaded.training


@torch.no_grad()
def test_mapped_parameters_are_writable_and_the_file_is_untouched(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path)
    loaded = load_model(tmp_path)
    out = loaded(*tiny_inputs())
    # Generation's CPU layout replaces weights; the values (and logits) stay.
    assert use_streaming_layout(loaded) > 0
    torch.testing.assert_close(loaded(*tiny_inputs()), out, rtol=1e-5, atol=1e-5)
    w = loaded.text_model.layers[0].attention.wq.weight
    assert _mapped_file(w) is not None
    w.mul_(2.0)  # copy-on-write private mapping: allowed, and never written back
    on_disk = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)["text_model.layers.0.attention.wq.weight"]
    assert torch.equal(on_disk, model.text_model.layers[0].attention.wq.weight)
    assert torch.equal(w, 2.0 * on_disk)
    # A second load of the same file sees the file, not the first model's write.
    again = load_model(tmp_path)
    assert torch.equal(again.text_model.layers[0].attention.wq.weight, on_disk)


@torch.no_grad()
def test_bf16_load_of_an_fp32_checkpoint_casts_once(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    _assert_equal_state(loaded, want)
    assert all(_mapped_file(p) is None for p in loaded.parameters())  # the casts, not the file
    # Same model as building in bfloat16 and copying the float32 weights in.
    ref = build_model(tiny_params(), dtype=torch.bfloat16, init=False)
    ref.load_state_dict(model.state_dict())
    assert torch.equal(loaded(*tiny_inputs()), ref.eval()(*tiny_inputs()))


@torch.no_grad()
def test_two_shard_checkpoint_and_aliased_keys(model, tmp_path):
    # Keys stored split over 2 files are concatenated (new tensors), replicated keys mapped.
    save_meta_checkpoint(model, model.args, tmp_path / "two", num_shards=2)
    loaded = load_model(tmp_path / "two")
    _assert_equal_state(loaded, model.state_dict())
    assert torch.equal(loaded(*tiny_inputs()), model(*tiny_inputs()))

    # Two keys sharing one storage in the file (saved from a tied model) must not end up
    # as two parameters sharing memory.
    a, b = "text_model.layers.0.attention.wq.weight", "text_model.layers.1.attention.wq.weight"
    save_meta_checkpoint(model, model.args, tmp_path / "tied")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[b] = state[a]
    torch.save(state, tmp_path / "tied" / "consolidated.00.pth")  # one storage, two keys
    raw = torch.load(tmp_path / "tied" / "consolidated.00.pth", weights_only=True, mmap=True)
    assert raw[a].data_ptr() == raw[b].data_ptr()
    loaded = load_model(tmp_path / "tied")
    pa, pb = loaded.get_parameter(a), loaded.get_parameter(b)
    assert torch.equal(pa, pb) and pa.data_ptr() != pb.data_ptr()
    pa.add_(1.0)
    assert torch.equal(pb, state[a])


@torch.no_grad()
def test_hf_checkpoint_tensors_are_assigned(model, tmp_path):
    save_hf_checkpoint(model, tmp_path)
    file = str((tmp_path / "model.safetensors").resolve())
    loaded = load_model(tmp_path)
    # HF's per-aspect-ratio tile tables cannot hold the cells no ratio reaches: compare with
    # the converted state dict (and the logits with the saved model's).
    _assert_equal_state(loaded, {k: v.clone() for k, v in load_hf_as_meta(tmp_path)[1].items()})
    assert torch.equal(loaded(*tiny_inputs()), model(*tiny_inputs()))
    for name in ("text_model.output.weight", "text_model.layers.0.feed_forward.w1.weight", "text_model.tok_embeddings.weight"):
        assert _mapped_file(loaded.get_parameter(name)) == file, name
