"""`LlavaConfig.pool_to`: a LLaVA image modality that average-pools its tower's g x g
feature grid to pool_to x pool_to tokens before the projector (the CPU demo's one token per
cell), and the projector video modality's `pool: image` (every frame pooled as an image).
Checked against hand-computed block means, through params.json, the image processor's
placeholder count and generation; bad values and HF export are refused."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

from _helpers import ROOT
from llama_vision.model.llava import LlavaConfig, pool_feature_grid

TINY_LLAVA = yaml.safe_load((ROOT / "configs/model/tiny_llava.yaml").read_text())  # tower: 4 x 4 tokens


def _pooled_model(pool_to=2, vocab_size=512):
    from llama_vision.model.builder import build_model

    params = copy.deepcopy(TINY_LLAVA)
    params.update(vocab_size=vocab_size)
    params["llava"]["pool_to"] = pool_to
    return build_model(params, seed=0).eval()


def test_pool_feature_grid_is_the_mean_of_each_block():
    torch.manual_seed(0)
    x = torch.randn(3, 36, 5)  # a 6 x 6 grid
    got = pool_feature_grid(x, 2)  # 2 x 2 tokens, each the mean of a 3 x 3 block
    grid = x.reshape(3, 6, 6, 5)
    want = torch.stack([grid[:, 3 * r:3 * r + 3, 3 * c:3 * c + 3].mean((1, 2)) for r in range(2) for c in range(2)], 1)
    torch.testing.assert_close(got, want)
    assert torch.equal(pool_feature_grid(x, 6), x)


def test_a_pooled_modality_feeds_the_projector_block_means():
    model = _pooled_model()
    vision = model.vision_model
    assert vision.tokens_per_item() == 4 and model.args.llava["pool_to"] == 2
    pixels = torch.randn(2, 1, 1, 3, 28, 28)
    sizes = torch.tensor([[[28, 28]], [[20, 28]]])
    with torch.no_grad():
        out = vision(pixels, sizes)
        feats = vision.vision_encoder(pixels[:, 0, 0]).reshape(2, 4, 4, -1)  # the 4 x 4 grid
        blocks = torch.stack([feats[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean((1, 2)) for r in range(2) for c in range(2)], 1)
        want = vision.projector(blocks)
    assert out.tokens.shape[:3] == (2, 1, 4) and bool(out.valid.all())
    torch.testing.assert_close(out.tokens[:, 0], want, rtol=1e-5, atol=1e-6)
    # params.json round trip: the same modality comes back, the processor expands to 4 placeholders.
    config, tower = LlavaConfig.from_params(model.args.llava)
    assert config.pool_to == 2 and config.image_tokens(tower) == 4
    from llama_vision.data.llava_images import LlavaImageProcessor

    assert LlavaImageProcessor.for_params(model.args.llava).tokens_per_item((30, 40)) == 4
    assert "pool_to" not in LlavaConfig().to_params(tower)  # earlier params.json stay as they were


def test_generate_expands_a_pooled_image_to_its_tokens(shapes_corpus):
    from PIL import Image

    from llama_vision.data.llava_images import LlavaImageProcessor
    from llama_vision.generation import Generator
    from llama_vision.tokenizer import load_tokenizer

    tok = load_tokenizer(shapes_corpus["tokenizer"])
    model = _pooled_model(vocab_size=tok.n_words)
    gen = Generator(model, tok, streaming_layout=False)
    p = model.modalities["image"].token_id
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    prompt = [p] + tok.encode("a", bos=True, eos=False)
    got = gen.generate([prompt], [[image]], max_new_tokens=5, stop_tokens=[])[0]
    pixels, size = LlavaImageProcessor.for_params(model.args.llava)(image)
    want = gen.generate_from_tensors([[p] * 4 + prompt[1:]], media_inputs={"image": (pixels[None, None], torch.tensor([[size]]))},
                                     max_new_tokens=5, stop_tokens=[])[0]
    assert got == want and len(got) == 5


def test_bad_pool_to_and_export_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pool_to=3 must divide the tower's 4 x 4 token grid"):
        _pooled_model(pool_to=3)
    from llama_vision.checkpoint.llava_hf import save_llava_hf

    with pytest.raises(ValueError, match="pool_to=2: transformers' LLaVA classes"):
        save_llava_hf(_pooled_model(), tmp_path / "hf", image_token_index=0)


def _video_model(pool_to=2, pool="image"):
    from llama_vision.model.builder import build_model

    params = copy.deepcopy(TINY_LLAVA)
    params.update(vocab_size=512)
    if pool_to is not None:
        params["llava"]["pool_to"] = pool_to
    params["llava"]["video"] = {"pool": pool, "num_frames": 3}
    return build_model(params, seed=0).eval()


def test_video_pool_image_pools_every_frame_as_an_image():
    """`llava.video.pool: image` (the CPU demo's video arm): a frame takes the tokens an image
    does -- its tower grid's 2 x 2 block means through the projector -- a video its frames'
    tokens in order; a shorter video in a padded slot only its own frames'."""
    from llama_vision.model.llava import llava_frame_tokens

    model = _video_model()
    vision, video = model.vision_model, model.modalities["video"]
    assert video.tokens_per_item(3) == 12 and llava_frame_tokens(model.args.llava) == 4
    frames = torch.randn(2, 1, 3, 3, 28, 28)
    counts = torch.tensor([[3], [2]])
    with torch.no_grad():
        enc = video.encode((frames, counts))
        feats = vision.vision_encoder(frames[:, 0].reshape(6, 3, 28, 28)).reshape(2, 3, 4, 4, -1)
        blocks = torch.stack([feats[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean((2, 3)) for r in range(2) for c in range(2)], 2)
        want = vision.projector(blocks).reshape(2, 12, -1)  # [video, frame * cell, D]
    assert enc.tokens.shape[:3] == (2, 1, 12)
    assert enc.valid[0, 0].all() and int(enc.valid[1, 0].sum()) == 8
    torch.testing.assert_close(enc.tokens[0, 0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.tokens[1, 0, :8], want[1, :8], rtol=1e-5, atol=1e-6)
    # without pool_to a frame keeps the whole grid, as an image does; params.json round trip
    assert _video_model(pool_to=None).modalities["video"].tokens_per_item(3) == 48

def test_a_saved_video_pool_image_model_loads_back_pooling_as_it_did(tmp_path):
    from llama_vision.checkpoint import load_model, read_params, save_meta_checkpoint

    model = _video_model()
    save_meta_checkpoint(model, tmp_path / "ckpt")
    assert read_params(tmp_path / "ckpt")["llava"]["video"]["pool"] == "image"
    back = load_model(tmp_path / "ckpt").eval()
    frames, counts = torch.randn(1, 1, 3, 3, 28, 28), torch.tensor([[3]])
    with torch.no_grad():
        assert torch.equal(back.modalities["video"].encode((frames, counts)).tokens,
                           model.modalities["video"].encode((frames, counts)).tokens)


def test_bad_video_pool_and_its_export_are_refused(tmp_path):
    from llama_vision.checkpoint.llava_hf import save_llava_hf

    with pytest.raises(ValueError, match=r"video pool must be one of \('bilinear2x', 'image'\), got 'mean'"):
        _video_model(pool="mean")
    with pytest.raises(ValueError, match="video pool 'image': LLaVA-OneVision pools every frame bilinearly"):
        save_llava_hf(_video_model(pool_to=None), tmp_path / "hf", image_token_index=0, video_token_index=1)
