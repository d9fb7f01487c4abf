"""training/parallelize.py on every model kind, without a process group: FSDP's units
(`fsdp_units`) for Meta's ViT, a LLaVA model (tower blocks, tower, projector) and a
LLaVA modality added to a cross-attention model under its own name; activation
checkpointing of a LLaVA tower. The sharded runs themselves are torchrun scenarios
(tests/test_training_cluster.py: the DP=2 family)."""
from __future__ import annotations

import pytest
import torch
import yaml

import llama_vision
from _helpers import ROOT, randomize, tiny_model, tiny_params
from llama_vision.training.parallelize import apply_activation_checkpointing, fsdp_units

TOWER = yaml.safe_load((ROOT / "configs/model/tiny_llava.yaml").read_text())["llava"]["tower"]


def _llava_model(seed: int = 0, **llava):
    """The tiny LLaVA model (configs/model/tiny_llava.yaml's tower and projector)."""
    torch.manual_seed(seed)
    params = tiny_params(vision_num_cross_attention_layers=0, llava={"projector": "mlp2x_gelu", "tower": TOWER, **llava})
    return randomize(llama_vision.build_model(params), seed)


def _cross_attention_with_llava(seed: int = 0):
    """Meta's cross-attention model with a LLaVA modality "llava" (at `llava_encoder`)."""
    from llama_vision.model.clip_vision import ClipVisionConfig, ClipVisionTower
    from llama_vision.model.llava import LlavaConfig, add_llava_modality

    model = tiny_model(seed)
    add_llava_modality(model, ClipVisionTower(ClipVisionConfig(**TOWER)), TOWER["width"], LlavaConfig(name="llava"))
    return model


def _units(model) -> tuple[list[str], dict[str, str]]:
    """(unit module names in order, {parameter: its unit}) as fully_shard assigns them:
    a parameter belongs to the first (innermost) unit holding it."""
    names = {id(m): n for n, m in model.named_modules()}
    units, methods = fsdp_units(model)
    order = [names[id(u)] for u in units]
    assert len(set(order)) == len(order), "a module is a unit twice"
    for i, outer in enumerate(order):  # innermost first: no unit after one that holds it
        assert not [inner for inner in order[i + 1:] if inner.startswith(outer + ".")], outer
    owner = {}
    for unit in order:
        for p, _ in model.get_submodule(unit).named_parameters(prefix=unit):
            owner.setdefault(p, unit)
    assert owner.keys() == {n for n, _ in model.named_parameters()}, "the root holds parameters of its own"
    assert (model, "prepare_media") in methods
    return order, owner


def test_fsdp_units_of_a_llava_model_are_its_tower_blocks_tower_and_projector():
    model = _llava_model(image_newline=False)
    order, owner = _units(model)
    tower = "vision_model.vision_encoder"
    blocks = [f"{tower}.blocks.{i}" for i in range(TOWER["layers"])]  # the unused last block too
    assert [u for u in order if u.startswith("vision_model")] == [*blocks, tower, "vision_model.projector", "vision_model"]
    assert owner[f"{tower}.blocks.1.attn.q_proj.weight"] == f"{tower}.blocks.1"
    assert owner[f"{tower}.positional_embedding"] == owner[f"{tower}.ln_pre.weight"] == tower
    assert owner["vision_model.projector.linear_2.weight"] == "vision_model.projector"
    assert [f"text_model.layers.{i}" for i in range(model.args.n_layers)] == [u for u in order if u.startswith("text_model.layers")]


def test_fsdp_units_keep_image_newline_with_the_llava_model():
    model = _llava_model(anyres={"grid_pinpoints": [[28, 28], [28, 56]], "crop_size": 28, "patches_per_side": 4},
                         image_newline=True)
    _, owner = _units(model)
    assert owner["vision_model.image_newline"] == "vision_model"


def test_fsdp_units_of_meta_vit_are_unchanged():
    """Meta's model: every ViT layer (local and global), the vision projection, the
    decoder layers and adapter blocks; the ViT's embeddings stay with the vision model."""
    model = tiny_model()
    order, owner = _units(model)
    vit = "vision_model.vision_encoder"
    a = model.args
    want = [f"{vit}.transformer.resblocks.{i}" for i in range(a.vision_layers)]
    want += [f"{vit}.global_transformer.resblocks.{i}" for i in range(a.vision_global_layers)]
    want += ["vision_model.vision_projection", "vision_model"]
    assert [u for u in order if u.startswith("vision_model")] == want
    assert owner[f"{vit}.class_embedding"] == "vision_model"
    assert {"text_model.tok_embeddings", "text_model.output", "text_model"} <= set(order)
    assert sum(u.startswith("text_model.cross_attention_layers.") for u in order) == len(a.fusion_schedule)


def test_fsdp_units_of_a_llava_modality_on_a_cross_attention_model():
    """A LLaVA modality added under its own name: its encoder (`llava_encoder`) is split
    like the LLaVA model's, beside Meta's ViT."""
    model = _cross_attention_with_llava()
    order, owner = _units(model)
    tower = "llava_encoder.vision_encoder"
    assert [u for u in order if u.startswith("llava_encoder")] == [
        *[f"{tower}.blocks.{i}" for i in range(TOWER["layers"])], tower, "llava_encoder.projector", "llava_encoder"]
    assert "vision_model.vision_projection" in order and "vision_model" in order
    assert owner["llava_encoder.projector.linear_1.weight"] == "llava_encoder.projector"


def test_activation_checkpointing_reaches_the_llava_tower_and_keeps_gradients():
    """A LLaVA model's switches: the decoder's and the tower's (kind "vision"); it has no
    adapter blocks, so "adapters" turns nothing on. Gradients equal the plain run's."""
    def grads(model):
        model.train()
        p, n = model.modalities["image"].token_id, model.vision_model.tokens_per_item()
        tokens = torch.tensor([[1] + [p] * n + [5, 9, 33]])
        pixels = torch.randn(1, 1, 1, 3, TOWER["image_size"], TOWER["image_size"], generator=torch.Generator().manual_seed(0))
        out = model(tokens, media_inputs={"image": (pixels, torch.tensor([[[28, 28]]]))})
        out.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = _llava_model(), _llava_model()
    assert apply_activation_checkpointing(checkpointed) == 2
    assert checkpointed.vision_model.vision_encoder.checkpoint_activations and checkpointed.text_model.checkpoint_activations
    assert apply_activation_checkpointing(_llava_model(), ["adapters"]) == 0
    want, got = grads(plain), grads(checkpointed)
    assert want.keys() == got.keys() and any(n.startswith("vision_model.vision_encoder.blocks.") for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("make", [_llava_model, _cross_attention_with_llava], ids=["llava", "cross_attention+llava"])
def test_block_modules_describe_structure_only(make):
    """block_modules() adds no module and no parameter: state-dict keys are unchanged."""
    model = make()
    keys = list(model.state_dict())
    fsdp_units(model)
    assert list(model.state_dict()) == keys
