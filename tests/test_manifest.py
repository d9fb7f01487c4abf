"""Built on the meta device, our state dict equals Meta's released 11B/90B checkpoints
key-for-key (names, shapes, dtypes), from the manifests in ../shared/reference."""
from __future__ import annotations

import json

import pytest
import torch

import llama_vision
from llama_vision.model.args import fusion_schedule

MANIFESTS = ["llama3_2_11b_vision.json", "llama3_2_90b_vision.json"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_state_dict_matches_meta_manifest(shared_dir, name):
    manifest = json.loads((shared_dir / "reference" / "manifests" / name).read_text())
    model = llama_vision.build_model(manifest["params"], device="meta", dtype=torch.bfloat16)
    ours = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    theirs = {e["key"]: (e["shape"], e["dtype"]) for e in manifest["state_dict"]}
    assert sorted(set(theirs) - set(ours)) == []
    assert sorted(set(ours) - set(theirs)) == []
    mismatched = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert mismatched == {}
    assert sum(p.numel() for p in model.parameters()) == manifest["total_parameters"]
    assert len(ours) == manifest["num_keys"]
    assert model.args.fusion_schedule == manifest["derived"]["fusion_schedule"]
    assert model.args.ffn_hidden_dim == manifest["derived"]["ffn_hidden_dim"]


def test_base_448_variant_changes_only_position_embeddings(shared_dir):
    manifest = json.loads((shared_dir / "reference" / "manifests" / MANIFESTS[0]).read_text())
    variant = manifest["variant_vision_chunk_size_448"]["changed_shapes"]
    model = llama_vision.build_model({**manifest["params"], "vision_chunk_size": 448}, device="meta")
    sd = model.state_dict()
    for key, shape in variant.items():
        assert list(sd[key].shape) == shape


def test_fusion_schedule_rule():
    assert fusion_schedule(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert fusion_schedule(80, 20) == list(range(3, 80, 4))
    assert fusion_schedule(4, 2) == [1, 3]
    assert fusion_schedule(5, 2) == [1, 4]  # k = ceil(5/2) = 3, counted from the top


def test_meta_params_json_accepted_as_is(tmp_path):
    params = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "ffn_dim_multiplier": 1.3,
              "multiple_of": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
              "vision_chunk_size": 560, "vision_max_num_chunks": 4, "vision_num_cross_attention_layers": 2}
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    model = llama_vision.build_model(path, device="meta")
    assert model.args.vision_width == 1280 and model.args.vision_layers == 32  # ViT-H defaults
    assert model.args.vision_output_dim == 7680
    with pytest.raises(ValueError, match="unknown model params.*vision_widht"):
        llama_vision.build_model({**params, "vision_widht": 3}, device="meta")
