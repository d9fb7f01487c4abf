"""Issue #14: HF Mllama checkpoints our Meta-shaped model used to refuse or approximate.

1. Cross-attention layers at any positions (`text_config.cross_attention_layers` that do
   not follow Meta's fusion schedule) -> `ModelArgs.fusion_schedule`.
2. Tile-position embeddings trained per aspect ratio (transformers' layout, rows that no
   Meta grid can hold) -> `ModelArgs.tile_embedding_layout = "per_aspect_ratio"`.

Checked against transformers' MllamaForConditionalGeneration (vision taps patched back to
Meta's, as in test_hf_equivalence.py; every prompt starts with its image, avoiding the
pinned text-before-image divergence)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from _helpers import randomize, tiny_model, tiny_params

transformers = pytest.importorskip("transformers")
from transformers import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from transformers.models.mllama import modeling_mllama  # noqa: E402

from _hf_mllama import IMG, hf_inputs, taps_are_layer_inputs, tile_images  # noqa: E402

import llama_vision  # noqa: E402
from llama_vision.checkpoint import (  # noqa: E402
    CheckpointMismatchError,
    convert_checkpoint,
    hf_config_from_args,
    load_model,
    save_hf_checkpoint,
    save_meta_checkpoint,
)
from llama_vision.checkpoint.hf import hf_layer_indices, params_from_hf_config, schedule_from_hf_cross_layers  # noqa: E402
from llama_vision.data.tiling import aspect_ratio_id, supported_aspect_ratios  # noqa: E402
from llama_vision.generation import Generator  # noqa: E402
from llama_vision.model import ModelArgs, fusion_schedule  # noqa: E402
from llama_vision.model.vision import aspect_ratio_ids  # noqa: E402

CROSS = [0, 3]  # in a 6-layer HF stack; Meta's rule for 4 + 2 layers gives [1, 4]
SCHEDULE = [0, 2]  # the same positions in Meta's per-layer counting
RATIOS = supported_aspect_ratios(4)
VE = "vision_model.vision_encoder."
TILE_KEYS = (VE + "gated_positional_embedding", VE + "pre_tile_pos_embed.embedding", VE + "post_tile_pos_embed.embedding")


def _safetensors(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_tensor_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def _prompt(i: int) -> list[int]:
    return [IMG, 1, 40 + i, 3, 91, 200 + i, 7]


def _random_transformers_dir(out, cross: list[int] | None, seed: int):
    """A transformers Mllama (cross-attention layers at `cross`, None = Meta's [1, 4]) with
    random weights everywhere -- every tile-table row (row 0, empty tile slots included)
    independent -- saved by transformers itself."""
    cfg = hf_config_from_args(tiny_model(seed=0).args)
    assert cfg["text_config"]["cross_attention_layers"] == [1, 4] and cfg["text_config"]["num_hidden_layers"] == 6
    if cross is not None:
        cfg["text_config"]["cross_attention_layers"] = cross
    torch.manual_seed(0)
    hf = MllamaForConditionalGeneration(MllamaConfig(**cfg)).eval()
    randomize(hf, seed=seed)
    vm = hf.model.vision_model
    tables = (vm.gated_positional_embedding.tile_embedding.weight, vm.pre_tile_positional_embedding.embedding.weight,
              vm.post_tile_positional_embedding.embedding.weight)
    for table in tables:  # no two rows share a value: a grid holds none of them
        assert table.shape[0] == len(RATIOS) + 1 and len(set(table[:, :8].flatten().tolist())) == table[:, :8].numel()
    hf.save_pretrained(out, safe_serialization=True)
    return hf


@pytest.fixture(scope="module")
def custom_hf(tmp_path_factory):
    """Both at once: cross-attention layers at [0, 3] and random per-ratio tile tables."""
    out = tmp_path_factory.mktemp("custom_mllama")
    hf = _random_transformers_dir(out, CROSS, seed=11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_model(out)
    msgs = [str(w.message) for w in caught]  # said once, with the reason
    assert len(msgs) == 1 and "holding them with tile_embedding_layout='per_aspect_ratio'" in msgs[0], msgs
    assert "rows of aspect ratios sharing a tile disagree" in msgs[0]
    return out, hf, ours


@pytest.fixture
def hf_taps_patched():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_mllama.MllamaVisionEncoder, "forward", taps_are_layer_inputs)
        yield


# --- loading: schedule and layout chosen from the checkpoint --------------------------------
def test_load_picks_custom_schedule_and_per_ratio_layout(custom_hf):
    _, hf, ours = custom_hf
    assert ours.args.fusion_schedule == SCHEDULE and ours.modalities["image"].layers == SCHEDULE
    assert ours.args.tile_embedding_layout == "per_aspect_ratio"
    enc = ours.vision_model.vision_encoder
    assert enc.gated_positional_embedding.shape == (len(RATIOS) + 1, 4, 5, 32)
    assert enc.pre_tile_pos_embed.embedding.shape == enc.post_tile_pos_embed.embedding.shape == (len(RATIOS) + 1, 4, 1, 32)
    # Cross-attention block j of ours is HF layer CROSS[j].
    for j, c in enumerate(CROSS):
        theirs = hf.model.language_model.layers[c].cross_attn.q_proj.weight
        assert torch.equal(ours.text_model.cross_attention_layers[j].attention.wq.weight, theirs)


@torch.no_grad()
def test_logits_match_transformers_for_every_aspect_ratio(custom_hf, hf_taps_patched):
    _, hf, ours = custom_hf
    for i, ratio in enumerate(RATIOS):
        tokens = _prompt(i)
        imgs, ar = tile_images([ratio], seed=20 + i)
        got = ours(torch.tensor([tokens]), imgs, ar)
        want = hf(**hf_inputs(tokens, [ratio], imgs)).logits
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0, msg=lambda m: f"ratio {ratio}: {m}")


@torch.no_grad()
def test_per_ratio_tables_alone_match_transformers(tmp_path, hf_taps_patched):
    """Meta's schedule, random per-ratio rows: one prompt with an image of every ratio
    (formerly loaded onto a grid, with a warning and different logits)."""
    hf = _random_transformers_dir(tmp_path, None, seed=12)
    with pytest.warns(UserWarning, match="holding them with tile_embedding_layout='per_aspect_ratio'"):
        ours = load_model(tmp_path)
    assert ours.args.tile_embedding_layout == "per_aspect_ratio" and ours.args.fusion_schedule == [1, 3]
    tokens = [t for i in range(len(RATIOS)) for t in (IMG, 30 + i, 7)]
    imgs, ar = tile_images(list(RATIOS), seed=8)
    got = ours(torch.tensor([tokens]), imgs, ar)
    torch.testing.assert_close(got, hf(**hf_inputs(tokens, list(RATIOS), imgs)).logits.float(), atol=1e-4, rtol=0)


@torch.no_grad()
def test_greedy_16_tokens_match_transformers(custom_hf, hf_taps_patched):
    _, hf, ours = custom_hf
    tokens, ratios = [IMG, 1, 11, 12, 13, IMG, 14, 15], [(1, 3), (4, 1)]
    imgs, ar = tile_images(ratios, seed=5)
    want = hf.generate(**hf_inputs(tokens, ratios, imgs), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    got = Generator(ours).generate_from_tensors([tokens], images=imgs, aspect_ratios=ar, max_new_tokens=16, stop_tokens=[])[0]
    assert got == want[0, len(tokens) :].tolist()


# --- export: back to HF unchanged, and through Meta's format --------------------------------
def test_export_to_hf_is_tensor_identical(custom_hf, tmp_path):
    path, _, ours = custom_hf
    original = _safetensors(path)
    cross = json.loads((path / "config.json").read_text())["text_config"]["cross_attention_layers"]
    assert cross == CROSS
    with pytest.warns(UserWarning, match="per_aspect_ratio"):
        hf2 = convert_checkpoint(path, tmp_path / "hf2", "hf")  # tools/convert_checkpoint.py's function
    hf3 = save_hf_checkpoint(ours, tmp_path / "hf3")  # from the loaded model
    for out in (hf2, hf3):
        _assert_tensor_identical(original, _safetensors(out))
        assert json.loads((out / "config.json").read_text())["text_config"]["cross_attention_layers"] == CROSS
    # transformers reads it back to the same model.
    again = MllamaForConditionalGeneration.from_pretrained(hf3).eval()
    assert again.config.text_config.cross_attention_layers == CROSS


@torch.no_grad()
def test_meta_format_save_keeps_per_ratio_tables_and_reloads_identically(custom_hf, tmp_path):
    path, _, ours = custom_hf
    meta = save_meta_checkpoint(ours, ours.args, tmp_path / "meta", num_shards=2)
    params = json.loads((meta / "params.json").read_text())
    assert params["fusion_schedule"] == SCHEDULE and params["tile_embedding_layout"] == "per_aspect_ratio"
    shard = torch.load(meta / "consolidated.00.pth", weights_only=True)
    assert shard[TILE_KEYS[0]].shape == (len(RATIOS) + 1, 4, 5, 32)  # same key names, per-ratio shapes
    assert shard[TILE_KEYS[1]].shape == (len(RATIOS) + 1, 4, 1, 32)
    back = load_model(meta)
    assert back.args == ours.args
    with pytest.warns(UserWarning, match="per_aspect_ratio"):
        fresh = load_model(path)  # `ours` may have run the Generator, which re-lays weights out (~1e-7)
    for i, ratio in enumerate(RATIOS):
        x = (torch.tensor([_prompt(i)]), *tile_images([ratio], seed=i))
        assert torch.equal(back(*x), fresh(*x)), ratio
    # ... and back to HF, still the original tensors.
    _assert_tensor_identical(_safetensors(path), _safetensors(convert_checkpoint(meta, tmp_path / "hf", "hf")))
    # A Meta-layout (grid) model cannot take per-ratio tables: said clearly, not a shape dump.
    with pytest.raises(CheckpointMismatchError, match="per-aspect-ratio tile embeddings.*tile_embedding_layout='per_aspect_ratio'"):
        load_model(meta, params_overrides={"tile_embedding_layout": "grid"})


def test_forcing_the_grid_layout_on_disagreeing_rows_warns(custom_hf):
    path, _, _ = custom_hf
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(path, params_overrides={"tile_embedding_layout": "grid"})
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 3 and all("different values to the same tile" in m and "outputs will differ" in m for m in msgs), msgs
    assert model.args.tile_embedding_layout == "grid"
    assert model.vision_model.vision_encoder.gated_positional_embedding.shape == (4, 4, 5, 32)


# --- Meta-compatible checkpoints keep Meta's layout, bitwise --------------------------------
@torch.no_grad()
def test_grid_consistent_hf_checkpoint_stays_grid(tmp_path):
    model = tiny_model(seed=4)
    hf = save_hf_checkpoint(model, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layout warning for a Meta-convertible checkpoint
        grid = load_model(hf)
    assert grid.args.tile_embedding_layout == "grid" and grid.args.fusion_schedule == model.args.fusion_schedule
    meta = save_meta_checkpoint(grid, grid.args, tmp_path / "meta")
    params = json.loads((meta / "params.json").read_text())
    assert "fusion_schedule" not in params and "tile_embedding_layout" not in params  # Meta's params.json keys only
    # Forcing the per-ratio layout holds the same model (bitwise) and exports the same tensors.
    per_ratio = load_model(hf, params_overrides={"tile_embedding_layout": "per_aspect_ratio"})
    for i, ratio in enumerate(RATIOS):
        x = (torch.tensor([_prompt(i)]), *tile_images([ratio], seed=i))
        assert torch.equal(per_ratio(*x), model(*x)), ratio
    _assert_tensor_identical(_safetensors(hf), _safetensors(save_hf_checkpoint(per_ratio, tmp_path / "hf2")))
    # A Meta (grid) checkpoint loads into a per-ratio model: the tables are expanded exactly.
    expanded = load_model(meta, params_overrides={"tile_embedding_layout": "per_aspect_ratio"})
    x = (torch.tensor([_prompt(0)]), *tile_images([(2, 2)], seed=3))
    assert torch.equal(expanded(*x), model(*x))


# --- the schedule key ------------------------------------------------------------------------
def test_schedule_index_maps_are_inverse():
    for n_layers, schedule in ((4, [0, 2]), (4, [1, 3]), (32, fusion_schedule(32, 8)), (10, [0, 1, 5, 9]), (6, [5])):
        self_idx, cross = hf_layer_indices(n_layers, schedule)
        assert sorted(self_idx + cross) == list(range(n_layers + len(schedule)))
        assert schedule_from_hf_cross_layers(cross, n_layers + len(schedule)) == schedule
    # Meta's schedule: no new params key (HF configs of Meta models convert as before).
    meta_cfg = hf_config_from_args(ModelArgs.from_params(tiny_params()))
    assert "fusion_schedule" not in params_from_hf_config(meta_cfg)
    cfg = hf_config_from_args(ModelArgs.from_params(tiny_params(fusion_schedule=SCHEDULE)))
    assert cfg["text_config"]["cross_attention_layers"] == CROSS
    assert params_from_hf_config(cfg)["fusion_schedule"] == SCHEDULE


@pytest.mark.parametrize("bad, match", [
    ([2, 0], "fusion_schedule .*ascending"),
    ([1, 1], "fusion_schedule .*without repeats"),
    ([0, 4], r"fusion_schedule .*outside 0\.\.3"),
    ([-1, 2], r"fusion_schedule .*outside 0\.\.3"),
    ([0, 1, 2], "fusion_schedule .*3 entries but vision_num_cross_attention_layers is 2"),
    ([0, "2"], "fusion_schedule"),
    (3, "fusion_schedule"),
])
def test_bad_fusion_schedule_is_a_clear_error(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_params(tiny_params(fusion_schedule=bad))
    (tmp_path / "params.json").write_text(json.dumps(tiny_params(fusion_schedule=bad)))
    (tmp_path / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"params\.json.*" + match.split(" ")[0]):
        load_model(tmp_path)


def test_schedule_sets_the_cross_attention_count_and_bad_layout_is_refused():
    assert ModelArgs.from_params({**tiny_params(fusion_schedule=[0, 1, 3]), "vision_num_cross_attention_layers": None}).vision_num_cross_attention_layers == 3
    with pytest.raises(ValueError, match="tile_embedding_layout must be one of"):
        ModelArgs.from_params(tiny_params(tile_embedding_layout="per_ratio"))


@pytest.mark.parametrize("cross, match", [
    ([2, 3], "directly follow another cross-attention layer"),
    ([1, 5], "after the last self-attention layer"),
    ([1, 6], "outside the 6-layer stack"),
])
def test_hf_cross_layers_our_decoder_cannot_run_are_refused(cross, match, tmp_path):
    cfg = hf_config_from_args(ModelArgs.from_params(tiny_params()))
    cfg["text_config"]["cross_attention_layers"] = cross
    with pytest.raises(ValueError, match=match):
        params_from_hf_config(cfg)


# --- aspect-ratio ids, and the video modality on a custom schedule ---------------------------
def test_aspect_ratio_ids_follow_transformers():
    ar = torch.tensor([[h, w] for h, w in RATIOS] + [[0, 0]])
    assert aspect_ratio_ids(ar, 4).tolist() == [aspect_ratio_id(h, w, 4) for h, w in RATIOS] + [0]
    assert aspect_ratio_ids(ar, 4).tolist() == list(range(1, len(RATIOS) + 1)) + [0]
    with pytest.raises(ValueError, match="aspect ratio 3x2 is not one of the 8 supported"):
        aspect_ratio_ids(torch.tensor([[3, 2]]), 4)


@torch.no_grad()
def test_video_adapters_follow_a_custom_schedule(tmp_path):
    from llama_vision.model.video import VideoConfig, add_video_adapters

    model = tiny_model(seed=2, fusion_schedule=[0, 2], tile_embedding_layout="per_aspect_ratio")
    cfg = VideoConfig(num_frames=2, frames_per_group=2, tiles_per_frame=2, n_latents=2, depth=1, heads=4, every_k_image_layers=2)
    add_video_adapters(model, cfg)
    assert model.modalities["video"].layers == [2]
    randomize(model, seed=3)
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(1, 1, 2, 2, 3, 28, 28, generator=g)
    tokens = torch.tensor([[IMG, 513, 1, 2, 3]])
    imgs, ar = tile_images([(1, 2)], seed=1)
    media = {"image": (imgs, ar), "video": (videos, torch.tensor([[[1, 2]]]), torch.tensor([[2]]))}
    out = model(tokens, media_inputs=media)
    assert torch.isfinite(out).all()
    meta = save_meta_checkpoint(model, model.args, tmp_path / "meta")
    back = load_model(meta)
    assert back.modalities["video"].layers == [2] and back.args.fusion_schedule == [0, 2]
    assert torch.equal(back(tokens, media_inputs=media), out)
    assert llama_vision.build_model(json.loads((meta / "params.json").read_text()), device="meta").modalities["video"].layers == [2]
