"""LoRA in PEFT's layout (llama_vision.checkpoint.peft) against peft + transformers' Mllama
(an independent implementation): our adaptors exported and loaded by `PeftModel` give our
logits, and a PEFT adapter made with peft on transformers' model, imported, gives peft's
logits -- with LoRA on the self-attention q/k (rows permuted for rotate-half RoPE), on the
cross-attention layers (renumbered inside HF's merged stack), on the ViT's patch
embedding (a Conv2d in HF) and with whole modules / special-token rows saved beside it."""
from __future__ import annotations

import json

import pytest
import torch

from _helpers import randomize, tiny_model

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from transformers.models.mllama import modeling_mllama  # noqa: E402

from _hf_mllama import IMG, hf_inputs, taps_are_layer_inputs, tile_images  # noqa: E402
from llama_vision.checkpoint import load_model, save_meta_checkpoint  # noqa: E402
from llama_vision.checkpoint.hf import hf_config_from_args, meta_to_hf  # noqa: E402
from llama_vision.checkpoint.lora import load_base, load_lora, save_lora  # noqa: E402
from llama_vision.checkpoint.peft import export_peft, import_peft, peft_to_lora_dir  # noqa: E402
from llama_vision.model.lora import apply_lora, lora_modules, merged_state_dict  # noqa: E402

ATOL = 1e-4
CASES = {
    "two_tiles": ([IMG, 1, 44, 3, 91, 200, 7], [(1, 2)]),
    "two_images": ([IMG, 1, 11, 12, 13, IMG, 14, 15, 16, 17], [(1, 2), (2, 2)]),
    "text_only": ([1, 20, 21, 22, 23, 24], []),
}
# Every linear family: trunk q/k/v/o + MLP, the cross-attention layers and projection,
# the ViT (patch embedding included) and the output head.
OURS_TARGETS = ["trunk_attention", "trunk_mlp", "adapters", "vision", "text_model.output"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2",
              "multi_modal_projector", "patch_embedding", "lm_head"]


@pytest.fixture(autouse=True, scope="module")
def meta_vision_taps():
    """transformers 5.23 takes the ViT's intermediate features one layer late (pinned in
    test_hf_equivalence.py): compare with Meta's taps."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_mllama.MllamaVisionEncoder, "forward", taps_are_layer_inputs)
        yield


def _hf_of(model) -> MllamaForConditionalGeneration:
    """transformers' Mllama holding `model`'s (LoRA-free) weights."""
    hf = MllamaForConditionalGeneration(MllamaConfig(**hf_config_from_args(model.args))).eval()
    state = {k: v for k, v in model.state_dict().items() if ".adaptor." not in k}
    result = hf.load_state_dict(meta_to_hf(state, model.args), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return hf


@torch.no_grad()
def _assert_same_logits(ours, theirs):
    for name, (tokens, ratios) in CASES.items():
        imgs, ar = tile_images(ratios, seed=len(name)) if ratios else (None, None)
        got = ours(torch.tensor([tokens]), imgs, ar)
        want = theirs(**hf_inputs(tokens, ratios, imgs)).logits
        torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


@torch.no_grad()
def _randomize_lora(model, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    for host in lora_modules(model).values():
        for w in (host.adaptor.A.weight, host.adaptor.B.weight):
            w.copy_(scale * torch.randn(w.shape, generator=g))


def test_ours_exported_to_peft_gives_our_logits(tmp_path):
    ours = tiny_model(seed=1)
    save_meta_checkpoint(ours, tmp_path / "base")
    hf = _hf_of(ours)
    modules = apply_lora(ours, OURS_TARGETS, rank=4, alpha=12.0)
    assert any("cross_attention_layers" in m for m in modules) and "vision_model.vision_encoder.conv1._linear" in modules
    _randomize_lora(ours, seed=3)
    save_lora(ours, tmp_path / "lora", targets=OURS_TARGETS, base_checkpoint=tmp_path / "base")
    out = export_peft(tmp_path / "lora", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12.0 and config["modules_to_save"] is None
    # the cross-attention blocks 0 and 1 sit at merged indices 1 and 4 of HF's stack
    assert "model.language_model.layers.1.cross_attn.q_proj" in config["target_modules"]
    assert "model.language_model.layers.4.cross_attn.k_proj" in config["target_modules"]
    text = torch.tensor([CASES["text_only"][0]])
    with torch.no_grad():  # the adaptors matter: without them the logits are HF's base ones
        assert (ours(text) - hf(input_ids=text).logits).abs().max() > 1e-3
    loaded = peft.PeftModel.from_pretrained(hf, out).eval()
    _assert_same_logits(ours.eval(), loaded)


def _peft_adapter(tmp_path, seed: int, **config):
    """A base pair (ours, HF) and a PEFT adapter made by peft on the HF model, with random
    lora_A / lora_B (and saved modules / token rows), saved to tmp_path / "peft"."""
    ours = tiny_model(seed=seed)
    hf = _hf_of(ours)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, **config))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # LoRA A/B, modules_to_save copies, trainable token rows
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
    model.eval().save_pretrained(tmp_path / "peft")
    return ours, model


def test_peft_adapter_imported_gives_peft_logits(tmp_path):
    ours, theirs = _peft_adapter(tmp_path, seed=2, target_modules=HF_TARGETS)
    modules = import_peft(ours, tmp_path / "peft")
    assert len(modules) == len(lora_modules(ours)) and "text_model.layers.0.attention.wq" in modules
    _assert_same_logits(ours.eval(), theirs)


def test_rslora_scaling_is_read(tmp_path):
    ours, theirs = _peft_adapter(tmp_path, seed=4, target_modules=["q_proj", "k_proj"], use_rslora=True)
    import_peft(ours, tmp_path / "peft")
    assert next(iter(lora_modules(ours).values())).adaptor.scale == pytest.approx(8 / 4 ** 0.5)
    _assert_same_logits(ours.eval(), theirs)


def test_saved_modules_and_token_rows_come_along_both_ways(tmp_path):
    """peft -> ours with modules_to_save + trainable_token_indices, then our LoRA dir written
    from it, then that exported back to PEFT: every hop gives peft's logits."""
    ours, theirs = _peft_adapter(tmp_path, seed=6, target_modules=["q_proj", "k_proj", "v_proj"],
                                 modules_to_save=["multi_modal_projector", "model.language_model.layers.4"],
                                 trainable_token_indices={"embed_tokens": list(range(IMG, IMG + 8))})
    import_peft(ours, tmp_path / "peft")
    _assert_same_logits(ours.eval(), theirs)
    # as our LoRA dir: the base with the saved modules is written beside the adaptors
    base = tiny_model(seed=6)
    save_meta_checkpoint(base, tmp_path / "base")
    lora_dir = peft_to_lora_dir(tmp_path / "peft", tmp_path / "ours", tmp_path / "base")
    rebuilt = load_base(lora_dir)
    load_lora(rebuilt, lora_dir)
    _assert_same_logits(rebuilt.eval(), theirs)


def test_a_run_that_also_trained_adapters_and_vit_exports_them_whole(tmp_path):
    """The image_sft_lora.yaml layout: LoRA on the trunk, the adapters and ViT trained whole,
    final/ = the merged model + the adaptors (as Trainer.save_final writes it)."""
    ours = tiny_model(seed=7)
    save_meta_checkpoint(ours, tmp_path / "base")
    hf_base = _hf_of(ours)
    apply_lora(ours, ["trunk_attention", "trunk_mlp"], rank=4, alpha=8.0)
    _randomize_lora(ours, seed=8)
    trained = [n for n, _ in ours.named_parameters()
               if n.startswith(("vision_model.", "text_model.cross_attention_layers.", "text_model.learnable_embedding"))]
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for n, p in ours.named_parameters():
            if n in trained:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    final = tmp_path / "final"
    save_meta_checkpoint(merged_state_dict(ours), ours.args, final)
    save_lora(ours, final, base_checkpoint=tmp_path / "base", extra={"also_trained": ["adapters", "vision"]})
    out = export_peft(final, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert "model.vision_model" in config["modules_to_save"] and config["trainable_token_indices"]
    loaded = peft.PeftModel.from_pretrained(hf_base, out).eval()
    _assert_same_logits(ours.eval(), loaded)
    assert torch.equal(load_model(final).text_model.learnable_embedding.weight, ours.text_model.learnable_embedding.weight)


def test_unsupported_peft_features_are_refused_by_name(tmp_path):
    ours, _ = _peft_adapter(tmp_path, seed=10, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        import_peft(ours, tmp_path / "peft")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        import_peft(tiny_model(), tmp_path / "nothing")


def test_lora_on_a_module_transformers_lacks_is_refused(tmp_path):
    ours = tiny_model(seed=1)
    save_meta_checkpoint(ours, tmp_path / "base")
    apply_lora(ours, ["trunk_attention"], rank=2)
    save_lora(ours, tmp_path / "lora", base_checkpoint=tmp_path / "base", extra={"also_trained": ["video"]})
    with pytest.raises(ValueError, match="video"):
        export_peft(tmp_path / "lora", tmp_path / "peft")


def test_export_dtype_casts_the_adapter(tmp_path):
    """dtype= casts the adapter (bf16 export for a bf16 deployment) and nothing else."""
    ours = randomize(tiny_model(seed=1), seed=11)
    save_meta_checkpoint(ours, tmp_path / "base")
    apply_lora(ours, ["trunk_attention"], rank=2)
    _randomize_lora(ours, seed=12)
    save_lora(ours, tmp_path / "lora", base_checkpoint=tmp_path / "base")
    from safetensors.torch import load_file

    out = export_peft(tmp_path / "lora", tmp_path / "peft", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()} == {torch.bfloat16}


def test_cli_round_trip_ours_to_peft_and_back_is_exact(tmp_path):
    import importlib.util

    from safetensors.torch import load_file

    from _helpers import ROOT

    spec = importlib.util.spec_from_file_location("convert_lora", ROOT / "tools" / "convert_lora.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    ours = tiny_model(seed=1)
    save_meta_checkpoint(ours, tmp_path / "base")
    apply_lora(ours, OURS_TARGETS, rank=3, alpha=6.0)
    _randomize_lora(ours, seed=13)
    save_lora(ours, tmp_path / "lora", base_checkpoint=tmp_path / "base")
    assert cli.main(["--to", "peft", "--input", str(tmp_path / "lora"), "--output", str(tmp_path / "peft")]) == 0
    assert cli.main(["--to", "llama_vision", "--input", str(tmp_path / "peft"), "--base", str(tmp_path / "base"),
                     "--output", str(tmp_path / "back")]) == 0
    want, got = load_file(str(tmp_path / "lora" / "lora.safetensors")), load_file(str(tmp_path / "back" / "lora.safetensors"))
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert json.loads((tmp_path / "back" / "lora_config.json").read_text())["alpha"] == 6.0
