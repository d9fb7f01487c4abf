"""Meta checkpoints: params.json + consolidated.NN.pth, saved and loaded (single process;
the tensor-parallel loads are in test_checkpoint_tp.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import TINY_IMAGE_TOKEN, tiny_inputs, tiny_model, tiny_params

import model_parallel as mp
from llama_vision.checkpoint import (
    CheckpointMismatchError,
    load_into,
    load_meta_state_dict,
    load_model,
    save_meta_checkpoint,
)
from llama_vision.checkpoint import meta as meta_mod
from llama_vision.model import build_model
from llama_vision.model.vision import resize_local_position_embedding
from llama_vision.utils.io import CheckpointFormatError

IMG = TINY_IMAGE_TOKEN


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("num_shards", [1, 2, 4])
@torch.no_grad()
def test_round_trip_any_number_of_shards(model, tmp_path, num_shards):
    out = save_meta_checkpoint(model, model.args, tmp_path / "ckpt", num_shards=num_shards)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"consolidated.{i:02d}.pth" for i in range(num_shards)] + ["params.json"]
    loaded = load_model(out)
    assert not loaded.training
    _assert_same_weights(model, loaded)
    # The RoPE table is not in the checkpoint: every row of it must be right after to_empty.
    every = torch.arange(2 * model.args.max_seq_len)[None]
    assert torch.equal(loaded.text_model.rope(every), model.text_model.rope(every))
    assert torch.equal(loaded(*tiny_inputs()), model(*tiny_inputs()))


def test_files_follow_the_checkpoint_plan(model, tmp_path):
    """Column-parallel weights split on dim 0, row-parallel on dim 1, the rest replicated:
    each file is exactly split_state_dict's shard."""
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path, num_shards=2)
    want = mp.split_state_dict(model.state_dict(), mp.shard_plan(model, "checkpoint"), 2)
    for i in range(2):
        got = torch.load(tmp_path / f"consolidated.{i:02d}.pth", weights_only=True)
        assert got.keys() == want[i].keys()
        for k in got:
            assert torch.equal(got[k], want[i][k]), k
    wq = "text_model.layers.0.attention.wq.weight"
    assert got[wq].shape[0] == model.state_dict()[wq].shape[0] // 2


def test_bf16_save_and_dtype_on_load(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path, dtype=torch.bfloat16)
    raw = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert {t.dtype for t in raw.values()} == {torch.bfloat16}
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert loaded.text_model.output.weight.dtype == torch.bfloat16
    key = "text_model.output.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key].bfloat16())
    assert loaded(*tiny_inputs()).dtype == torch.float32  # logits are float32 whatever the weights


def test_params_json_is_written_last_and_stale_shards_go(model, tmp_path, monkeypatch):
    save_meta_checkpoint(model, model.args, tmp_path, num_shards=4)
    save_meta_checkpoint(model, model.args, tmp_path, num_shards=2)
    assert sorted(p.name for p in tmp_path.glob("consolidated*")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert json.loads((tmp_path / "params.json").read_text())["dim"] == 64

    calls = []

    def dying_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        torch.save(obj, path)

    monkeypatch.setattr(meta_mod, "atomic_save_torch", dying_save)
    with pytest.raises(OSError):
        save_meta_checkpoint(model, model.args, tmp_path, num_shards=2)
    # The interrupted overwrite is visibly incomplete: no params.json, so nothing loads it.
    assert not (tmp_path / "params.json").exists()
    with pytest.raises(ValueError, match="neither a Meta checkpoint"):
        load_model(tmp_path)


def _edit_shards(ckpt: Path, edit):
    for p in sorted(ckpt.glob("consolidated.*.pth")):
        sd = torch.load(p, weights_only=True)
        edit(sd)
        torch.save(sd, p)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_missing_key_is_named(model, tmp_path, num_shards):
    save_meta_checkpoint(model, model.args, tmp_path, num_shards=num_shards)
    _edit_shards(tmp_path, lambda sd: sd.pop("text_model.layers.2.feed_forward.w3.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing key.*text_model\.layers\.2\.feed_forward\.w3\.weight"):
        load_model(tmp_path)


def test_unexpected_key_is_named(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path)
    _edit_shards(tmp_path, lambda sd: sd.update({"text_model.layers.9.attention.wq.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key.*text_model\.layers\.9\.attention\.wq\.weight"):
        load_model(tmp_path)


def test_wrong_shape_is_named_with_both_shapes(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path)
    key = "vision_model.vision_projection.weight"
    _edit_shards(tmp_path, lambda sd: sd.update({key: sd[key][:, :-1].clone()}))
    with pytest.raises(CheckpointMismatchError, match=rf"{key}: checkpoint \[64, 95\] vs model \[64, 96\]"):
        load_model(tmp_path)


def test_shards_with_different_keys_are_refused(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path, num_shards=2)
    p = tmp_path / "consolidated.01.pth"
    sd = torch.load(p, weights_only=True)
    sd.pop("text_model.norm.weight")
    torch.save(sd, p)
    with pytest.raises(CheckpointMismatchError, match=r"consolidated\.01\.pth holds different keys.*text_model\.norm\.weight"):
        load_model(tmp_path)


class _Payload:
    """Unpickling this runs os.system -- what weights_only=True must never allow."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_executed(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path)
    marker = tmp_path / "pwned"
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    sd["extra"] = _Payload(marker)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointFormatError, match=r"consolidated\.00\.pth is not a plain-tensor checkpoint loadable with weights_only=True"):
        load_model(tmp_path)
    assert not marker.exists()


def test_non_tensor_entries_are_refused(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path)
    torch.save({"text_model.norm.weight": [1.0, 2.0]}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointFormatError, match="not tensors"):
        load_model(tmp_path)


def test_clear_errors_for_bad_paths_and_params(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"neither a Meta checkpoint.*weights\.npz"):
        load_model(tmp_path / "junk")
    ckpt = save_meta_checkpoint(model, model.args, tmp_path / "ckpt")
    (ckpt / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        load_model(ckpt)
    (ckpt / "params.json").write_text(json.dumps({**tiny_params(), "n_layerz": 3}))
    with pytest.raises(ValueError, match=r"invalid model params in .*params\.json.*n_layerz"):
        load_model(ckpt)
    (ckpt / "params.json").write_text(json.dumps({**tiny_params(), "n_heads": 5}))
    with pytest.raises(ValueError, match="dim 64 is not divisible by n_heads 5"):
        load_model(ckpt)
    (ckpt / "consolidated.02.pth").write_bytes(b"")
    (ckpt / "params.json").write_text(json.dumps(tiny_params()))
    with pytest.raises(CheckpointFormatError, match=r"numbered 00\.\.01"):
        load_model(ckpt)


def test_save_refuses_incomplete_state_dict(model, tmp_path):
    sd = dict(model.state_dict())
    sd.pop("text_model.norm.weight")
    with pytest.raises(CheckpointMismatchError, match=r"text_model\.norm\.weight"):
        save_meta_checkpoint(sd, model.args, tmp_path)
    with pytest.raises(ValueError, match="params are required"):
        save_meta_checkpoint(model.state_dict(), tmp_path)


@torch.no_grad()
def test_other_tile_size_is_resized_by_the_load_hook(model, tmp_path):
    """A checkpoint trained at 28-px tiles loads into a 42-px model: shapes differ on the
    position/tile embeddings only and the hook resizes them by value (not an error)."""
    save_meta_checkpoint(model, model.args, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "vision_chunk_size": 42}))
    loaded = load_model(tmp_path)
    key = "vision_model.vision_encoder.positional_embedding"
    want = resize_local_position_embedding(model.state_dict()[key], 3)
    assert loaded.state_dict()[key].shape == (10, 32)
    assert torch.equal(loaded.state_dict()[key], want)
    imgs = torch.randn(1, 1, 4, 3, 42, 42)
    assert torch.isfinite(loaded(torch.tensor([[IMG, 1, 2]]), imgs, torch.tensor([[[2, 2]]]))).all()


def test_checkpoint_without_tile_aware_embedding_loads(model, tmp_path):
    """Older checkpoints had only the local position embedding: the hook synthesises the
    gated one (gate 0), so those two keys may be absent."""
    save_meta_checkpoint(model, model.args, tmp_path)
    gated = "vision_model.vision_encoder.gated_positional_embedding"
    _edit_shards(tmp_path, lambda sd: (sd.pop(gated), sd.pop(gated + "_gate")))
    loaded = load_model(tmp_path)
    assert float(loaded.state_dict()[gated + "_gate"]) == 0.0


def test_load_into_allows_named_new_modules(model, tmp_path):
    save_meta_checkpoint(model, model.args, tmp_path)
    target = build_model(tiny_params(), seed=9)
    load_into(target, tmp_path)
    _assert_same_weights(model, target)
    _edit_shards(tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("text_model.cross_attention_layers.")])
    with pytest.raises(CheckpointMismatchError, match="cross_attention_layers"):
        load_into(build_model(tiny_params(), seed=9), tmp_path)
    fresh = build_model(tiny_params(), seed=9)
    before = fresh.text_model.cross_attention_layers[0].attention.wq.weight.clone()
    load_into(fresh, tmp_path, allow_missing_prefixes=("text_model.cross_attention_layers.",))
    assert torch.equal(fresh.text_model.cross_attention_layers[0].attention.wq.weight, before)


def test_single_rank_reads_only_the_files_it_needs(model, tmp_path, monkeypatch):
    """The resharding arithmetic, on one process: rank r of TP=M gets rows [r/M, (r+1)/M)
    of every split key, opening only the files those rows live in."""
    save_meta_checkpoint(model, model.args, tmp_path, num_shards=4)
    opened = []
    real = meta_mod.load_tensor_file
    monkeypatch.setattr(meta_mod, "load_tensor_file", lambda p, **kw: opened.append(Path(p).name) or real(p, **kw))
    full = load_meta_state_dict(tmp_path, 0, 1, model)
    assert sorted(set(opened)) == [f"consolidated.{i:02d}.pth" for i in range(4)]
    for k, v in model.state_dict().items():
        assert torch.equal(full[k], v), k
