"""Hugging Face checkpoints (config.json + safetensors) and text-only Llama trunks, checked
against transformers (an independent implementation) on tiny random configs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import ROOT, randomize, tiny_model, tiny_params

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from transformers.models.mllama import modeling_mllama  # noqa: E402

from _hf_mllama import IMG, hf_inputs, taps_are_layer_inputs, tile_images  # noqa: E402

from llama_vision.checkpoint import (  # noqa: E402
    convert_checkpoint,
    hf_config_from_args,
    init_from_text_checkpoint,
    llama_hf_to_meta,
    load_hf_state_dict,
    load_model,
    save_hf_checkpoint,
    save_meta_checkpoint,
)
from llama_vision.checkpoint.hf import precompute_by_aspect_ratio, supported_aspect_ratios  # noqa: E402
from llama_vision.generation import Generator  # noqa: E402
from llama_vision.utils.io import CheckpointFormatError  # noqa: E402

TOKENS = [IMG, 1, 44, 3, 91, IMG, 200, 7, 8]
RATIOS = [(1, 3), (2, 2)]


@pytest.fixture
def hf_taps_patched():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_mllama.MllamaVisionEncoder, "forward", taps_are_layer_inputs)
        yield


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- format round trips ---------------------------------------------------------------------
def test_hf_meta_hf_is_tensor_identical(tmp_path):
    model = tiny_model(seed=2)
    hf1 = save_hf_checkpoint(model, tmp_path / "hf1", max_shard_bytes=200_000)
    index = json.loads((hf1 / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in hf1.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    (hf1 / "tokenizer.model").write_bytes(b"tok")
    meta = convert_checkpoint(hf1, tmp_path / "meta", "meta", num_shards=2)
    assert (meta / "tokenizer.model").read_bytes() == b"tok"
    hf2 = convert_checkpoint(meta, tmp_path / "hf2", "hf", max_shard_bytes=200_000)
    a, b = _safetensors(hf1), _safetensors(hf2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((hf1 / "config.json").read_text()) == json.loads((hf2 / "config.json").read_text())


def test_meta_hf_meta_identical_except_unreachable_tile_cells(tmp_path):
    """HF stores tile tables per supported aspect ratio, so cells of Meta's [T, T] grid no
    ratio reaches (e.g. (2, 3) when h*w > 4) do not survive -- they come back as zeros.
    No forward ever reads them."""
    model = tiny_model(seed=3)
    meta1 = save_meta_checkpoint(model, model.args, tmp_path / "meta1")
    hf = convert_checkpoint(meta1, tmp_path / "hf", "hf")
    meta2 = convert_checkpoint(hf, tmp_path / "meta2", "meta")
    a = torch.load(meta1 / "consolidated.00.pth", weights_only=True)
    b = torch.load(meta2 / "consolidated.00.pth", weights_only=True)
    assert a.keys() == b.keys()
    reach = torch.zeros(4, 4, dtype=torch.bool)
    for h, w in supported_aspect_ratios(4):
        reach[:h, :w] = True
    assert (~reach).sum() == 8
    tables = {f"vision_model.vision_encoder.{k}" for k in ("gated_positional_embedding", "pre_tile_pos_embed.embedding", "post_tile_pos_embed.embedding")}
    for k in a:
        if k in tables:
            assert torch.equal(a[k][reach], b[k][reach]), k
            assert (b[k][~reach] == 0).all() and (a[k][~reach] != 0).any(), k
        else:
            assert torch.equal(a[k], b[k]), k
    x = (torch.tensor([TOKENS]), *tile_images(RATIOS, seed=1))
    with torch.no_grad():
        assert torch.equal(load_model(meta2)(*x), model(*x))


def test_cli_converts_and_checks_the_input_format(tmp_path):
    model = tiny_model(seed=5)
    meta = save_meta_checkpoint(model, model.args, tmp_path / "meta")
    cli = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    ok = subprocess.run(cli + ["--from", "meta", "--to", "hf", "--input", str(meta), "--output", str(tmp_path / "hf"), "--dtype", "bf16"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert {t.dtype for t in _safetensors(tmp_path / "hf").values()} == {torch.bfloat16}
    tool = _load_tool()
    with pytest.raises(SystemExit, match="is a meta checkpoint"):
        tool.main(["--from", "hf", "--to", "meta", "--input", str(meta), "--output", str(tmp_path / "x")])
    assert tool.main(["--from", "meta", "--to", "meta", "--input", str(meta), "--output", str(tmp_path / "m4"), "--num-shards", "4"]) == 0
    assert len(list((tmp_path / "m4").glob("consolidated.*.pth"))) == 4


def _load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_tile_tables_that_meta_cannot_hold_warn(transformers_dir, tmp_path):
    """Per-ratio tile rows that disagree on a shared cell (an HF-layout fine-tune) cannot
    be represented in Meta's layout: loading says so."""
    path, hf = transformers_dir
    with torch.no_grad():
        hf.model.vision_model.pre_tile_positional_embedding.embedding.weight[3, :32] += 1.0  # ratio (1, 3), tile 0
    try:
        hf.save_pretrained(tmp_path, safe_serialization=True)
    finally:
        with torch.no_grad():
            hf.model.vision_model.pre_tile_positional_embedding.embedding.weight[3, :32] -= 1.0
    with pytest.warns(UserWarning, match=r"pre_tile_positional_embedding.*max difference 1"):
        load_model(tmp_path)


def test_pickle_weights_are_refused(tmp_path):
    model = tiny_model(seed=6)
    hf = save_hf_checkpoint(model, tmp_path)
    (hf / "model.safetensors").unlink()
    torch.save({}, hf / "pytorch_model.bin")
    with pytest.raises(ValueError, match="neither a Meta checkpoint"):
        load_model(hf)
    with pytest.raises(CheckpointFormatError, match="only safetensors are read"):
        load_hf_state_dict(hf)


# --- a checkpoint written by transformers ---------------------------------------------------------
@pytest.fixture(scope="module")
def transformers_dir(tmp_path_factory):
    """MllamaForConditionalGeneration with random weights, saved by transformers itself."""
    args = tiny_model(seed=0).args
    torch.manual_seed(0)
    hf = MllamaForConditionalGeneration(MllamaConfig(**hf_config_from_args(args))).eval()
    randomize(hf, seed=7)
    _tile_tables_from_meta_grids(hf, args)
    out = tmp_path_factory.mktemp("transformers_mllama")
    hf.save_pretrained(out, safe_serialization=True)
    return out, hf


@torch.no_grad()
def _tile_tables_from_meta_grids(hf, args):
    """HF stores one tile-embedding row per aspect ratio, Meta one per grid cell shared by
    all ratios (HF's own converter precomputes HF's from Meta's). Random per-ratio rows
    are not a Meta model, so draw random Meta grids and precompute them the same way."""
    t, g = args.vision_max_num_chunks, torch.Generator().manual_seed(5)
    vm = hf.model.vision_model
    for emb in (vm.gated_positional_embedding.tile_embedding, vm.pre_tile_positional_embedding.embedding, vm.post_tile_positional_embedding.embedding):
        grid = 0.1 * torch.randn(t, t, emb.weight.shape[1] // (t * args.vision_width), args.vision_width, generator=g)
        emb.weight.copy_(precompute_by_aspect_ratio(grid))


@torch.no_grad()
def test_load_transformers_written_dir_matches_transformers(transformers_dir, hf_taps_patched):
    path, hf = transformers_dir
    ours = load_model(path)
    imgs, ar = tile_images(RATIOS, seed=4)
    got = ours(torch.tensor([TOKENS]), imgs, ar)
    want = hf(**hf_inputs(TOKENS, RATIOS, imgs)).logits
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)
    hf_out = hf.generate(**hf_inputs(TOKENS, RATIOS, imgs), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ours_out = Generator(ours).generate_from_tensors([TOKENS], images=imgs, aspect_ratios=ar, max_new_tokens=12, stop_tokens=[])[0]
    assert ours_out == hf_out[0, len(TOKENS) :].tolist()


@torch.no_grad()
def test_transformers_reads_what_we_write(tmp_path, hf_taps_patched):
    model = tiny_model(seed=8)
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=300_000)
    hf = MllamaForConditionalGeneration.from_pretrained(tmp_path).eval()
    imgs, ar = tile_images(RATIOS, seed=2)
    torch.testing.assert_close(model(torch.tensor([TOKENS]), imgs, ar), hf(**hf_inputs(TOKENS, RATIOS, imgs)).logits.float(), atol=1e-4, rtol=0)


# --- text-only Llama trunks ------------------------------------------------------------------------
VISION_KEYS = {k: v for k, v in tiny_params().items() if k.startswith("vision_")}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LlamaForCausalLM (transformers' implementation) with random weights,
    Llama 3.1 RoPE scaling and GQA, saved as safetensors."""
    args = tiny_model(seed=0).args
    cfg = LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size,
        rms_norm_eps=1e-5, max_position_embeddings=16384, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    randomize(model, seed=3)
    out = tmp_path_factory.mktemp("llama_hf")
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def _check_trunk_reproduced(vlm, llama_model):
    tokens = torch.tensor([[1, 17, 300, 42, 5, 9, 511, 0, 77, 128]])
    with torch.no_grad():
        want = llama_model(tokens).logits.float()
        got = vlm(tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert all(b.gate_attn.eq(0).all() and b.gate_ffwd.eq(0).all() for b in vlm.text_model.cross_attention_layers)
    # An image placeholder reads the fresh learnable row: its logits are finite, the adapters still no-ops.
    imgs, ar = tile_images([(1, 2)], seed=0)
    with torch.no_grad():
        assert torch.isfinite(vlm(torch.tensor([[IMG, 1, 2]]), imgs, ar)).all()


def test_init_from_hf_llama_reproduces_its_logits(llama):
    path, model = llama
    vlm = init_from_text_checkpoint(path, {**VISION_KEYS, "max_seq_len": 256})
    _check_trunk_reproduced(vlm, model)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_init_from_meta_text_dir_reproduces_its_logits(llama, tmp_path, num_shards):
    """The same trunk written as a Meta text-only dir (our HF -> Meta conversion, split
    into MP files like Meta's releases) loads to the same logits."""
    path, model = llama
    from llama_vision.checkpoint.text_only import text_params
    from llama_vision.model import build_model
    import model_parallel as mp

    params = text_params(path)
    trunk = llama_hf_to_meta(load_hf_state_dict(path)[0], build_model({**params, **VISION_KEYS}, device="meta").args)
    plan = mp.shard_plan(build_model({**params, **VISION_KEYS}, device="meta").text_model, "checkpoint")
    for i, shard in enumerate(mp.split_state_dict(trunk, plan, num_shards)):
        torch.save({k: v.clone() for k, v in shard.items()}, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert not any(k.startswith("vision") for k in params)
    vlm = init_from_text_checkpoint(tmp_path, {**VISION_KEYS, "max_seq_len": 256})
    _check_trunk_reproduced(vlm, model)


def test_text_trunk_from_a_vision_checkpoint_and_mismatch_errors(llama, tmp_path):
    from llama_vision.checkpoint import CheckpointMismatchError, load_text_trunk_into
    from llama_vision.model import build_model

    donor = tiny_model(seed=12)
    save_meta_checkpoint(donor, donor.args, tmp_path / "vision", num_shards=2)
    target = build_model(tiny_params(), seed=1)
    load_text_trunk_into(target, tmp_path / "vision")
    for k, v in target.state_dict().items():
        same = torch.equal(v, donor.state_dict()[k])
        assert same == k.startswith(("text_model.tok_embeddings", "text_model.layers.", "text_model.norm", "text_model.output")), k
    with pytest.raises(CheckpointMismatchError, match="rope_theta: checkpoint 500000.0 vs model 10000.0"):
        load_text_trunk_into(build_model(tiny_params(rope_theta=10000.0)), llama[0])
