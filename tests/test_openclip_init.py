"""Image encoder initialised from an OpenCLIP ViT, checked against open_clip's own forward.

What this proves, on a tiny random open_clip VisionTransformer (nothing downloaded):
1. the embedding stage (patches via unfold + linear, class token, positional embedding,
   ln_pre) equals open_clip's for every tile when the tile gates are 0;
2. every transformer block, ln_post and the taps (block INPUTS) equal open_clip's -- with
   a non-zero key bias, which is dropped exactly, and with LayerScale folded;
3. the WHOLE encoder (pad to a multiple of 8 included) equals open_clip's blocks run on
   the same padded sequence with Meta's padding mask: the pad quirk is the only
   difference from plain open_clip, and nothing else is hidden by it;
4. biases Meta's encoder cannot hold (q, v, out_proj) are refused, or dropped with a
   warning and a report.
"""
from __future__ import annotations

import pytest
import torch

from _helpers import randomize, tiny_model

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402

from llama_vision.checkpoint import init_vision_from_openclip, vision_state_dict_from_openclip  # noqa: E402
from llama_vision.model.vision import resize_local_position_embedding  # noqa: E402

WIDTH = 32


@torch.no_grad()
def _vit(seed: int, image_size: int = 28, ls_init_value=None, qv_bias: bool = False, out_bias: bool = False) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(image_size=image_size, patch_size=14, width=WIDTH, layers=4, heads=4, mlp_ratio=4.0,
                            output_dim=16, ls_init_value=ls_init_value).eval()
    randomize(vit, seed=seed, scale=0.15)  # every weight, k bias and LayerScale included
    for block in vit.transformer.resblocks:
        bias = block.attn.in_proj_bias.view(3, WIDTH)
        if not qv_bias:
            bias[0] = 0
            bias[2] = 0
        if not out_bias:
            block.attn.out_proj.bias.zero_()
    return vit


def _encoder_from(vit, seed: int = 0, allow_lossy: bool = False):
    model = tiny_model(seed=seed)  # random gates everywhere: the init must zero them
    report = init_vision_from_openclip(model, vit.state_dict(), allow_lossy=allow_lossy)
    return model.vision_model.vision_encoder, report


def _record(vit, images: torch.Tensor) -> dict:
    """open_clip activations: ln_pre output, each block's input and output, ln_post output."""
    rec = {"in": [], "out": []}
    hooks = [vit.ln_pre.register_forward_hook(lambda m, i, o: rec.__setitem__("ln_pre", o)),
             vit.ln_post.register_forward_hook(lambda m, i, o: rec.__setitem__("ln_post", o))]

    def on_block(module, args, output):  # a forward hook returning non-None would replace the output
        rec["in"].append(args[0])
        rec["out"].append(output)

    hooks += [block.register_forward_hook(on_block) for block in vit.transformer.resblocks]
    with torch.no_grad():
        vit(images)
    for h in hooks:
        h.remove()
    return rec


@torch.no_grad()
def test_embedding_stage_matches_per_tile():
    vit = _vit(1)
    enc, _ = _encoder_from(vit)
    tiles = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    got = {}
    h = enc.ln_pre.register_forward_hook(lambda m, i, o: got.__setitem__("x", o))
    images = torch.zeros(1, 1, 4, 3, 28, 28)
    images[0, 0, :2] = tiles
    enc(images, torch.tensor([[[1, 2]]]))
    h.remove()
    for t in range(2):
        want = _record(vit, tiles[t : t + 1])["ln_pre"][0]
        torch.testing.assert_close(got["x"][0, t], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ls_init_value", [None, 0.5], ids=["plain", "layerscale"])
@torch.no_grad()
def test_blocks_taps_and_ln_post_match(ls_init_value):
    vit = _vit(2, ls_init_value=ls_init_value)
    enc, report = _encoder_from(vit)
    assert any("in_proj_bias[k]" in k for k in report.dropped_exact)
    assert report.unused == ["proj"] and not report.dropped_lossy
    rec = _record(vit, torch.randn(3, 3, 28, 28))
    for i, block in enumerate(enc.transformer.resblocks):
        torch.testing.assert_close(block(rec["in"][i], None), rec["out"][i], atol=1e-5, rtol=0)
    x, taps = enc.transformer(rec["ln_pre"], None, enc.taps)
    torch.testing.assert_close(x, rec["out"][-1], atol=1e-5, rtol=0)
    for j, layer in enumerate(enc.taps):
        torch.testing.assert_close(taps[..., j], rec["in"][layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.ln_post(x), rec["ln_post"], atol=1e-5, rtol=0)
    # The fresh global layers start as identities (gates 0).
    assert torch.equal(enc.global_transformer(x, None)[0], x)


@torch.no_grad()
def test_whole_encoder_equals_openclip_under_metas_padding():
    """5 tokens per tile are padded to 8; pads attend to real tokens, real tokens attend to
    pads (the released encoder's quirk). Run open_clip's blocks on the same padded
    sequence with the same mask: the full encoder output (final + taps) must match."""
    vit = _vit(3)
    enc, _ = _encoder_from(vit)
    tile = torch.randn(1, 3, 28, 28)
    out = enc(tile[:, None, None], torch.tensor([[[1, 1]]]))[0, 0, 0]  # [5, (1 + taps) * W]

    x = torch.nn.functional.pad(_record(vit, tile)["ln_pre"], (0, 0, 0, 3))  # [1, 8, W]
    real = torch.arange(8) < 5
    blocked = ~(real[:, None] | real[None, :])
    mask = torch.zeros(8, 8).masked_fill(blocked, float("-inf"))
    inputs = []
    for block in vit.transformer.resblocks:
        inputs.append(x)
        x = block(x, attn_mask=mask)
    final = vit.ln_post(x)[0, :5]
    torch.testing.assert_close(out[:, :WIDTH], final, atol=1e-5, rtol=0)
    taps = out[:, WIDTH:].reshape(5, WIDTH, len(enc.taps))  # feature index = d * n_taps + j
    for j, layer in enumerate(enc.taps):
        torch.testing.assert_close(taps[..., j], inputs[layer][0, :5], atol=1e-5, rtol=0)
    # ... and it is NOT plain open_clip: the pads change the real tokens.
    assert (out[:, :WIDTH] - _record(vit, tile)["ln_post"][0]).abs().max() > 1e-4


def test_unrepresentable_biases_are_refused_or_dropped_with_a_report():
    vit = _vit(4, qv_bias=True, out_bias=True)
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.0\.attn\.in_proj_bias\[q\].*allow_lossy=True"):
        _encoder_from(vit)
    with pytest.warns(UserWarning, match="non-zero attention bias"):
        enc, report = _encoder_from(vit, allow_lossy=True)
    assert len(report.dropped_lossy) == 4 * 3 and all(v > 0 for v in report.dropped_lossy.values())
    rec = _record(vit, torch.randn(1, 3, 28, 28))
    with torch.no_grad():
        assert (enc.transformer.resblocks[0](rec["in"][0], None) - rec["out"][0]).abs().max() > 1e-3


def test_other_image_size_is_resized_and_full_clip_dicts_are_accepted():
    """A ViT trained at another resolution (ViT-H-14 is 224 px, Meta's tiles 448/560):
    the encoder's load hook resizes the position table; a whole CLIP state dict (text
    tower included) gives its `visual.` part and reports the rest as unused."""
    vit = _vit(5, image_size=42)  # 3 x 3 patches into the 2 x 2 model
    clip_state = {f"visual.{k}": v for k, v in vit.state_dict().items()}
    clip_state["text_projection"] = torch.zeros(2, 2)
    enc, report = _encoder_from_state(clip_state)
    assert "text_projection" in report.unused
    want = resize_local_position_embedding(vit.positional_embedding.detach(), 2)
    assert torch.equal(enc.positional_embedding.detach(), want)
    assert torch.equal(enc.gated_positional_embedding.detach(), want[None, None].expand(4, 4, -1, -1))
    assert float(enc.gated_positional_embedding_gate.detach()) == 0.0
    assert set(report.fresh) == {k for k in enc.state_dict() if k.startswith(("global_transformer.", "pre_tile", "post_tile"))}


def _encoder_from_state(state):
    model = tiny_model(seed=0)
    return model.vision_model.vision_encoder, init_vision_from_openclip(model, state)


def test_models_that_do_not_fit_are_refused():
    vit = _vit(6)
    args = tiny_model(seed=0).args
    state = vit.state_dict()
    with pytest.raises(ValueError, match="4 transformer blocks != vision_layers 6"):
        vision_state_dict_from_openclip(state, type(args)(**{**args.__dict__, "vision_layers": 6}))
    with pytest.raises(ValueError, match="does not understand.*attn.ln_inner"):
        vision_state_dict_from_openclip({**state, "transformer.resblocks.0.attn.ln_inner.weight": torch.ones(WIDTH)}, args)
