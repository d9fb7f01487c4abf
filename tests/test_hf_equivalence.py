"""Our model vs transformers' MllamaForConditionalGeneration (an independent
implementation) on tiny random configs with non-zero gates, after weight conversion."""
from __future__ import annotations

import pytest
import torch

from _helpers import tiny_model

transformers = pytest.importorskip("transformers")
from transformers import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from transformers.models.mllama import modeling_mllama  # noqa: E402

from _hf_mllama import IMG, hf_inputs, tile_images, taps_are_layer_inputs  # noqa: E402
from llama_vision.checkpoint.hf import hf_config_from_args, meta_to_hf  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_mllama.MllamaVisionEncoder, "forward", taps_are_layer_inputs)
        yield _build_pair()


@torch.no_grad()
def test_transformers_5_taps_are_one_layer_late():
    """Pinned divergence: unpatched transformers takes the intermediate features from the
    outputs of layers 3, 7, ... instead of their inputs. Final features still agree."""
    ours, hf = _build_pair()
    imgs, ar = tile_images([(1, 2)], seed=2)
    inp = hf_inputs([IMG, 1], [(1, 2)], imgs)
    got = ours.vision_model.vision_encoder(imgs, ar)
    theirs = hf.model.vision_model(
        pixel_values=imgs, aspect_ratio_ids=inp["aspect_ratio_ids"], aspect_ratio_mask=inp["aspect_ratio_mask"]
    ).last_hidden_state
    width = ours.args.vision_width
    torch.testing.assert_close(got[..., :width], theirs[..., :width], atol=1e-5, rtol=0)
    assert (got[..., width:] - theirs[..., width:]).abs().max() > 1e-3


def _build_pair():
    ours = tiny_model(seed=1)
    cfg = MllamaConfig(**hf_config_from_args(ours.args))
    hf = MllamaForConditionalGeneration(cfg).eval()
    missing = hf.load_state_dict(meta_to_hf(ours.state_dict(), ours.args), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours, hf


CASES = {
    "one_image_one_tile": ([IMG, 1, 5, 9, 33, 17, 4, 250], [(1, 1)]),
    "multi_tile_non_square": ([IMG, 1, 44, 3, 91, 200, 7], [(1, 3)]),
    "multi_tile_tall": ([IMG, 1, 44, 3, 91, 200, 7, 8, 9], [(2, 1)]),
    "two_by_two": ([IMG, 1, 60, 61, 62], [(2, 2)]),
    "two_images": ([IMG, 1, 11, 12, 13, IMG, 14, 15, 16, 17], [(1, 2), (2, 2)]),
    "consecutive_images": ([IMG, IMG, 1, 11, 12, 13, 99], [(1, 1), (2, 1)]),
    "text_only": ([1, 20, 21, 22, 23, 24], []),
}


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_logits_match_transformers(pair, case):
    ours, hf = pair
    tokens, ratios = CASES[case]
    imgs, ar = tile_images(ratios, seed=len(case)) if ratios else (None, None)
    got = ours(torch.tensor([tokens]), imgs, ar)
    want = hf(**hf_inputs(tokens, ratios, imgs)).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0)


@torch.no_grad()
def test_ragged_batch_mixing_image_and_text_rows(pair):
    """Batch of 2 rows of different lengths: an image row and a text-only row, one forward.
    Each row must equal transformers run on that row alone (HF's own batch would let the
    text-only row attend to padding images; Meta's semantics zero it)."""
    ours, hf = pair
    row_img, ratios = CASES["multi_tile_non_square"]
    row_txt, _ = CASES["text_only"]
    row_txt = row_txt + [30, 31, 32, 33]  # longer than the image row
    imgs, ar = tile_images(ratios, seed=3)
    tok = torch.zeros(2, len(row_txt), dtype=torch.long)
    tok[0, : len(row_img)] = torch.tensor(row_img)
    tok[1] = torch.tensor(row_txt)
    images = torch.cat([imgs, torch.zeros_like(imgs)])
    ars = torch.cat([ar, torch.ones_like(ar)])
    got = ours(tok, images, ars)
    want0 = hf(**hf_inputs(row_img, ratios, imgs)).logits[0]
    want1 = hf(**hf_inputs(row_txt, [], None)).logits[0]
    torch.testing.assert_close(got[0, : len(row_img)], want0, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], want1, atol=ATOL, rtol=0)


@torch.no_grad()
def test_text_before_image_follows_meta_not_transformers(pair):
    """Pinned divergence: text rows before the first image. Meta zeroes both the
    cross-attention output and its FFN there, so those rows equal the text-only model;
    transformers zeroes only the FFN and lets them attend to every vision token."""
    ours, hf = pair
    tokens, ratios = [1, 40, 41, IMG, 42, 43], [(1, 2)]
    imgs, ar = tile_images(ratios, seed=9)
    got = ours(torch.tensor([tokens]), imgs, ar)[0]
    text_only = ours(torch.tensor([tokens[:3]]))[0]
    torch.testing.assert_close(got[:3], text_only, atol=1e-5, rtol=0)
    hf_got = hf(**hf_inputs(tokens, ratios, imgs)).logits[0]
    assert (hf_got[:3] - text_only).abs().max() > 1e-3, "transformers' known divergence disappeared"


@torch.no_grad()
def test_greedy_16_tokens_identical(pair):
    from llama_vision.generation import Generator

    ours, hf = pair
    tokens, ratios = CASES["two_images"]
    imgs, ar = tile_images(ratios, seed=5)
    inputs = hf_inputs(tokens, ratios, imgs)
    hf_out = hf.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, len(tokens) :].tolist()
    gen = Generator(ours)
    ours_out = gen.generate_from_tensors([tokens], images=imgs, aspect_ratios=ar, max_new_tokens=16, stop_tokens=[])[0]
    assert ours_out == hf_out
