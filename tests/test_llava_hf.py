"""Our LLaVA (projector modality + CLIP tower on a Llama trunk) against transformers'
LlavaForConditionalGeneration, an independent implementation, on a tiny random config after
weight conversion (llama_vision/checkpoint/llava_hf.py): logits (1e-4) for one image, two
images, text only and a ragged batch; 16 greedy tokens; the saved (file) layout converts
the same as the in-memory one."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

from _helpers import randomize_hf_llava  # noqa: E402
from llama_vision.checkpoint.llava_hf import hf_tokens_to_ours, llava_from_hf  # noqa: E402
from llama_vision.generation import Generator  # noqa: E402

ATOL = 1e-4
IMAGE = 250  # LLaVA's <image> id: a row of its vocabulary
PIX, PATCH = 28, 7  # 16 patches per image


def _config(act: str = "quick_gelu", layer: int = -2) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=PIX, patch_size=PATCH, hidden_act=act)
    text = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, vision_feature_layer=layer,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def _pair(**kw):
    torch.manual_seed(0)
    cfg = _config(**kw)
    hf = LlavaForConditionalGeneration(cfg).eval()
    randomize_hf_llava(hf, 1)
    return hf, llava_from_hf(hf.state_dict(), cfg.to_dict()), cfg


@pytest.fixture(scope="module")
def pair():
    return _pair()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, PIX, PIX, generator=torch.Generator().manual_seed(seed))


def _ours_media(per_row: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row its images [k, 3, H, W] -> (pixel_values [B, N, 1, 3, H, W], image_sizes [B, N, 2])."""
    n = max(max(len(x) for x in per_row), 1)
    px = torch.zeros(len(per_row), n, 1, 3, PIX, PIX)
    sizes = torch.zeros(len(per_row), n, 2, dtype=torch.long)
    for b, imgs in enumerate(per_row):
        px[b, : len(imgs), 0] = imgs
        sizes[b, : len(imgs)] = torch.tensor([PIX, PIX])
    return px, sizes


def _ids(*parts) -> list[int]:
    """Text ids and images ("I") -> HF ids (an image = 16 <image> tokens, as its processor expands it)."""
    out = []
    for part in parts:
        out += [IMAGE] * (PIX // PATCH) ** 2 if part == "I" else list(part)
    return out


CASES = {
    "one_image": ([_ids([1, 5], "I", [9, 33, 17, 4])], [1]),
    "two_images": ([_ids([1], "I", [11, 12], "I", [13, 14, 15])], [2]),
    "text_only": ([_ids([1, 20, 21, 22, 23])], [0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_logits_match_transformers(pair, case):
    hf, ours, cfg = pair
    (ids,), (k,) = CASES[case]
    imgs = _images(k, seed=len(case))
    hf_inputs = {"input_ids": torch.tensor([ids])}
    if k:
        hf_inputs["pixel_values"] = imgs
    want = hf(**hf_inputs).logits
    tokens = hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours)
    got = ours(tokens, media_inputs={"image": _ours_media([imgs])} if k else None)
    torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0)


@torch.no_grad()
def test_ragged_batch_matches_transformers(pair):
    """Two rows of different lengths (an image row, a text row; right-padded) in one forward."""
    hf, ours, cfg = pair
    rows = [_ids([1, 5], "I", [9, 33]), _ids([1, 40, 41])]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    imgs = _images(1, seed=3)
    want = hf(input_ids=ids, attention_mask=mask, pixel_values=imgs).logits
    got = ours(hf_tokens_to_ours(ids, cfg.to_dict(), ours), media_inputs={"image": _ours_media([imgs, imgs[:0]])})
    for b, r in enumerate(rows):
        torch.testing.assert_close(got[b, : len(r)], want[b, : len(r)].float(), atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_16_tokens_identical(pair):
    hf, ours, cfg = pair
    ids = _ids([1, 5], "I", [9, 33])
    imgs = _images(1, seed=4)
    want = hf.generate(input_ids=torch.tensor([ids]), pixel_values=imgs, max_new_tokens=16, min_new_tokens=16,
                       do_sample=False)[0, len(ids):].tolist()
    tokens = hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours)[0].tolist()
    got = Generator(ours, streaming_layout=False).generate_from_tensors(
        [tokens], media_inputs={"image": _ours_media([imgs])}, max_new_tokens=16, stop_tokens=[])[0]
    assert len(want) == 16 and got == want


@torch.no_grad()
def test_gelu_tower_last_layer_and_the_saved_layout(tmp_path):
    """Another selection (the last layer, exact GELU), converted from the files
    save_pretrained writes (language_model.model.*, vision_tower.*) instead of memory."""
    from safetensors.torch import load_file

    hf, _, cfg = _pair(act="gelu", layer=-1)
    hf.save_pretrained(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    state = {k: v for f in files for k, v in load_file(str(f)).items()}
    assert any(k.startswith("language_model.model.") for k in state), sorted(state)[:5]
    ours = llava_from_hf(state, json.loads((tmp_path / "config.json").read_text()))
    (ids,), _ = CASES["two_images"]
    imgs = _images(2, seed=5)
    want = hf(input_ids=torch.tensor([ids]), pixel_values=imgs).logits
    got = ours(hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours), media_inputs={"image": _ours_media([imgs])})
    torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0)


def test_unsupported_configs_and_stray_keys_are_named():
    from llama_vision.checkpoint.meta import CheckpointMismatchError

    hf, _, cfg = _pair()
    bad = cfg.to_dict() | {"projector_hidden_act": "relu"}
    with pytest.raises(ValueError, match="projector_hidden_act 'relu'"):
        llava_from_hf(hf.state_dict(), bad)
    state = dict(hf.state_dict()) | {"model.something_else.weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError, match="something_else"):
        llava_from_hf(state, cfg.to_dict())


@torch.no_grad()
def test_llava_next_anyres_matches_transformers():
    """LLaVA-NeXT: AnyRes crops of images of varied sizes (our preprocessing, equal to
    transformers' PIL processor: test_anyres.py), unpadding and image_newline rows, as
    many <image> tokens as our tokens_per_item says: logits == LlavaNextForConditionalGeneration's."""
    import numpy as np
    from PIL import Image
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from llama_vision.data.anyres import preprocess_anyres

    base = _config()
    pinpoints = [[PIX, 2 * PIX], [2 * PIX, PIX], [2 * PIX, 2 * PIX]]
    cfg = LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config, image_token_index=IMAGE,
                          image_grid_pinpoints=pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(cfg).eval()
    randomize_hf_llava(hf, 2)
    ours = llava_from_hf(hf.state_dict(), cfg.to_dict())
    anyres = ours.vision_model.config.anyres
    rng = np.random.default_rng(0)
    for h, w in [(20, 45), (50, 30), (28, 28), (60, 61)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        item = preprocess_anyres(image, anyres)
        n = ours.modalities["image"].tokens_per_item((h, w))
        ids = [1, 5] + [IMAGE] * n + [9, 33]
        want = hf(input_ids=torch.tensor([ids]), pixel_values=item.pixel_values[None],
                  image_sizes=torch.tensor([[h, w]])).logits
        px = item.pixel_values[None, None]
        got = ours(hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours),
                   media_inputs={"image": (px, torch.tensor([[[h, w]]]))})
        torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0, msg=lambda m: f"{h}x{w}: {m}")
    # exported back (image_newline, pinpoints), transformers reads it as the model it came from
    import tempfile

    from llama_vision.checkpoint.llava_hf import save_llava_hf

    with tempfile.TemporaryDirectory() as tmp:
        save_llava_hf(ours, tmp)
        back = LlavaNextForConditionalGeneration.from_pretrained(tmp).eval()
    again = back(input_ids=torch.tensor([ids]), pixel_values=item.pixel_values[None], image_sizes=torch.tensor([[h, w]])).logits
    assert torch.equal(again, want)


@torch.no_grad()
def test_saved_as_our_checkpoint_and_loaded_back(pair, tmp_path):
    """params.json carries the LLaVA modality (tower, projector, layout): load_model
    re-creates it and the logits are the converted model's."""
    from llama_vision.checkpoint import load_model, read_params, save_meta_checkpoint

    _, ours, cfg = pair
    save_meta_checkpoint(ours, tmp_path / "ckpt")
    params = read_params(tmp_path / "ckpt")
    assert params["vision_num_cross_attention_layers"] == 0 and params["llava"]["tower"]["width"] == 32
    back = load_model(tmp_path / "ckpt")
    assert back.modalities["image"].fusion == "projector"
    (ids,), _ = CASES["two_images"]
    tokens = hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours)
    media = {"image": _ours_media([_images(2, seed=6)])}
    assert torch.equal(back(tokens, media_inputs=media), ours(tokens, media_inputs=media))


@torch.no_grad()
def test_exported_llava_loads_in_transformers(pair, tmp_path):
    """Our model -> save_llava_hf -> LlavaForConditionalGeneration.from_pretrained: the
    same logits as ours (and as the HF model it came from)."""
    from llama_vision.checkpoint.llava_hf import save_llava_hf

    hf, ours, cfg = pair
    save_llava_hf(ours, tmp_path / "hf")
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    (ids,), _ = CASES["two_images"]
    imgs = _images(2, seed=7)
    want = ours(hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours), media_inputs={"image": _ours_media([imgs])})
    got = back(input_ids=torch.tensor([ids]), pixel_values=imgs).logits
    torch.testing.assert_close(got.float(), want, atol=ATOL, rtol=0)
    assert torch.equal(got, hf(input_ids=torch.tensor([ids]), pixel_values=imgs).logits)
