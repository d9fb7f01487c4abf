"""Model-core behaviour: caches, masks, freezing, modality extension, bad inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import llama_vision
from _helpers import tiny_model, tiny_params
from llama_vision.model import MediaTokens, zero_gates

IMG = 512


def _images(ratios, seed=0, n_tiles=4, size=28):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.zeros(len(ratios), max(len(r) for r in ratios) or 1, n_tiles, 3, size, size)
    ar = torch.ones(imgs.shape[0], imgs.shape[1], 2, dtype=torch.long)
    for b, row in enumerate(ratios):
        for i, (h, w) in enumerate(row):
            imgs[b, i, : h * w] = torch.randn(h * w, 3, size, size, generator=g)
            ar[b, i] = torch.tensor([h, w])
    return imgs, ar


@torch.no_grad()
def test_incremental_decoding_equals_full_forward():
    """Prefill + one-token steps with the static caches (ragged rows, per-row positions,
    images in one row only) give the logits of one full forward, within 1e-5."""
    model = tiny_model(seed=2)
    rows = [[IMG, 1, 5, 6, 7, IMG, 8, 9, 10, 11, 12, 13], [3, 4, 5, 6, 7, 8, 9]]
    imgs, ar = _images([[(1, 2), (2, 2)], []], seed=1)
    full = [model(torch.tensor([r]), imgs[i : i + 1], ar[i : i + 1])[0] for i, r in enumerate(rows)]
    prompt_len = [5, 3]
    b = len(rows)
    tok = torch.zeros(b, max(prompt_len), dtype=torch.long)
    for i, n in enumerate(prompt_len):
        tok[i, :n] = torch.tensor(rows[i][:n])
    full_tok = torch.zeros(b, max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        full_tok[i, : len(r)] = torch.tensor(r)
    media = model.prepare_media(full_tok, {"image": (imgs, ar)})
    caches = model.init_caches(b, 32)
    logits = model(tok, media=media, caches=caches)
    for i, n in enumerate(prompt_len):
        torch.testing.assert_close(logits[i, :n], full[i][:n], atol=1e-5, rtol=0)
    pos = torch.tensor(prompt_len)
    for _ in range(4):
        step = torch.stack([torch.tensor(rows[i][p]) for i, p in enumerate(pos.tolist())])
        out = model(step[:, None], media=media, caches=caches, positions=pos[:, None])[:, 0]
        for i, p in enumerate(pos.tolist()):
            torch.testing.assert_close(out[i], full[i][p], atol=1e-5, rtol=0)
        pos = pos + 1


@torch.no_grad()
def test_prefill_with_logit_index_equals_full_forward_and_fills_the_caches():
    """logit_index runs the last layer for the kept position of each row only: its logits
    equal the full forward's at that position (ragged rows, with and without caches), and
    the caches it fills serve the next decode step exactly as a full prefill's do."""
    model = tiny_model(seed=4)
    rows = [[IMG, 1, 5, 6, 7, 8, 9], [3, 4, 5], [IMG, 9, 8]]
    imgs, ar = _images([[(2, 2)], [], [(1, 1)]], seed=3)
    full = [model(torch.tensor([r]), imgs[i : i + 1], ar[i : i + 1])[0] for i, r in enumerate(rows)]
    tok = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        tok[i, : len(r)] = torch.tensor(r)
    last = torch.tensor([len(r) - 1 for r in rows])
    media = model.prepare_media(tok, {"image": (imgs, ar)})
    for index in (last, torch.tensor([2, 1, 0])):  # last prompt positions; inner positions
        out = model(tok, media=media, logit_index=index)
        assert out.shape == (len(rows), 1, model.args.vocab_size)
        for i, p in enumerate(index.tolist()):
            torch.testing.assert_close(out[i, 0], full[i][p], atol=1e-5, rtol=0)
    kept, whole = model.init_caches(len(rows), 16), model.init_caches(len(rows), 16)
    out = model(tok, media=media, caches=kept, logit_index=last)
    model(tok, media=media, caches=whole)
    for i, p in enumerate(last.tolist()):
        torch.testing.assert_close(out[i, 0], full[i][p], atol=1e-5, rtol=0)
    for a, b in zip(kept, whole):
        torch.testing.assert_close(a.k, b.k, atol=0, rtol=0)
        torch.testing.assert_close(a.v, b.v, atol=0, rtol=0)
    nxt = torch.tensor([[11], [12], [13]])
    step = model(nxt, media=media, caches=kept, positions=(last + 1)[:, None])[:, 0]
    for i, r in enumerate(rows):
        ref = model(torch.tensor([r + [int(nxt[i])]]), imgs[i : i + 1], ar[i : i + 1])[0, -1]
        torch.testing.assert_close(step[i], ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_text_rows_before_any_image_pass_unchanged():
    """Full-text-row mask: a row with no image before it equals the text-only model."""
    model = tiny_model(seed=3)
    tokens = torch.tensor([[1, 2, 3, IMG, 4, 5]])
    imgs, ar = _images([[(1, 1)]])
    with_img = model(tokens, imgs, ar)[0]
    text_only = model(tokens[:, :3])[0]
    torch.testing.assert_close(with_img[:3], text_only, atol=1e-5, rtol=0)
    assert (with_img[4:] - model(torch.tensor([[1, 2, 3, 7, 4, 5]]))[0, 4:]).abs().max() > 1e-3


@torch.no_grad()
def test_each_text_span_sees_only_its_image():
    """Text between image 1 and image 2 attends to image 1 only; changing image 2 leaves
    it unchanged and changes what follows image 2."""
    model = tiny_model(seed=4)
    tokens = torch.tensor([[IMG, 1, 2, 3, IMG, 4, 5]])
    imgs, ar = _images([[(1, 1), (1, 2)]], seed=0)
    a = model(tokens, imgs, ar)[0]
    imgs2 = imgs.clone()
    imgs2[0, 1] = torch.randn_like(imgs2[0, 1])
    b = model(tokens, imgs2, ar)[0]
    torch.testing.assert_close(a[:4], b[:4], atol=0, rtol=0)
    assert (a[4:] - b[4:]).abs().max() > 1e-4


def test_adapter_training_freezes_decoder():
    model = tiny_model(seed=5).train()
    counts = llama_vision.set_trainable(model, decoder=False, vision=True, adapters=True)
    assert counts["decoder"] == 0 and counts["vision"] > 0 and counts["adapters"] > 0
    imgs, ar = _images([[(2, 2)]])
    tokens = torch.tensor([[IMG, 1, 2, 3, 4]])
    model(tokens, imgs, ar).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.startswith(("text_model.layers.", "text_model.tok_embeddings", "text_model.norm", "text_model.output")):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    with pytest.raises(ValueError, match="unknown trainability group"):
        llama_vision.set_trainable(model, decodr=True)


class ToyEncoder(nn.Module):
    """A third modality defined in this test file only: vectors -> 3 tokens each."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 3 * dim)

    def forward(self, x: torch.Tensor) -> MediaTokens:  # x [B, N, dim_in]
        b, n, _ = x.shape
        tokens = self.proj(x).view(b, n, 3, -1)
        return MediaTokens(tokens, torch.ones(b, n, 3, dtype=torch.bool))


@torch.no_grad()
def test_toy_third_modality_plugs_in_without_editing_the_model():
    model = tiny_model(seed=6)
    imgs, ar = _images([[(1, 2)]])
    tokens = torch.tensor([[IMG, 1, 2, 514, 3, 4]])
    before = model(tokens.masked_fill(tokens == 514, 9), imgs, ar)
    enc = ToyEncoder(5, model.args.dim)
    model.add_modality("toy", token_id=514, encode=enc, encoder=enc, layers=[0, 2], order=-1)
    assert "toy_encoder.proj.weight" in model.state_dict()
    assert "text_model.toy_cross_attention_layers.1.gate_attn" in model.state_dict()
    x = torch.randn(1, 1, 5)
    # Zero gates: image/text outputs bitwise equal (the placeholder is a different token,
    # so compare on a prompt without it).
    same = model(tokens.masked_fill(tokens == 514, 9), imgs, ar, media_inputs={"toy": x})
    assert torch.equal(same, before)
    with_toy = model(tokens, imgs, ar, media_inputs={"toy": x})
    torch.testing.assert_close(with_toy[:, :3], before[:, :3], atol=0, rtol=0)
    for name, p in model.named_parameters():
        if "toy_cross_attention_layers" in name and "gate" in name:
            p.fill_(0.7)
    changed = model(tokens, imgs, ar, media_inputs={"toy": x})
    assert (changed[:, 4:] - with_toy[:, 4:]).abs().max() > 1e-4
    torch.testing.assert_close(changed[:, :3], with_toy[:, :3], atol=0, rtol=0)
    counts = llama_vision.set_trainable(model, decoder=False, vision=False, adapters=False, toy=True)
    assert counts["toy"] > 0 and sum(v for k, v in counts.items() if k != "toy") == 0


@torch.no_grad()
def test_zero_gates_make_adapters_a_no_op():
    model = tiny_model(seed=7)
    imgs, ar = _images([[(1, 1)]])
    tokens = torch.tensor([[IMG, 1, 2, 3]])
    zero_gates(model)
    torch.testing.assert_close(model(tokens, imgs, ar), model(tokens), atol=0, rtol=0)


@pytest.mark.parametrize(
    "tokens, ratios, match",
    [
        ([[IMG, IMG, 1, 2]], [[(1, 1)]], "2 image placeholder tokens but only 1 image slots"),
        ([[520, 1, 2]], [[(1, 1)]], "token id 520 is outside the vocabulary"),
        ([[-1, 1, 2]], None, "token id -1 is outside the vocabulary"),
    ],
)
def test_bad_token_inputs_raise_clear_errors(tokens, ratios, match):
    model = tiny_model(seed=8)
    imgs, ar = _images(ratios) if ratios else (None, None)
    with pytest.raises(ValueError, match=match):
        model(torch.tensor(tokens), imgs, ar)


def test_too_many_tiles_and_too_long_sequences_raise():
    model = tiny_model(seed=8)
    with pytest.raises(ValueError, match="more than vision_max_num_tiles=4"):
        model(torch.tensor([[IMG, 1]]), torch.zeros(1, 1, 6, 3, 28, 28), torch.tensor([[[2, 3]]]))
    with pytest.raises(ValueError, match="longer than max_seq_len=256"):
        model(torch.ones(1, 300, dtype=torch.long))


def test_image_count_mismatch_in_logits_api():
    from PIL import Image

    model = tiny_model(seed=8)
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    with pytest.raises(ValueError, match=r"row 0: 1 image token\(s\) but 2 image\(s\) given"):
        model.logits([[IMG, 1, 2]], [[img, img]])
    with pytest.raises(ValueError, match=r"row 0: 2 image token\(s\) but 1 image\(s\) given"):
        model.logits([[IMG, IMG, 1, 2]], [[img]])
    with pytest.raises(ValueError, match=r"row 0: 1 image token\(s\) but 0 image\(s\) given"):
        model.logits([[IMG, 1, 2]], None)


def test_meta_special_image_id_accepted_for_llama3_vocab():
    """Meta's tokenizer file has <|image|> at 128011; the model treats it as 128256."""
    model = llama_vision.build_model(tiny_params(vocab_size=128256, dim=32, n_heads=2, n_kv_heads=1), device="meta")
    assert 128011 in model.modalities["image"].placeholder_ids
    small = tiny_model(seed=0)
    assert small.modalities["image"].placeholder_ids == {IMG}


def test_position_embedding_resize_on_load():
    """A checkpoint trained at 28 px tiles loads into a 42 px model: the load hook resizes
    position embeddings bilinearly (align_corners=True); identity at equal size."""
    from llama_vision.model.vision import resize_global_position_embedding, resize_local_position_embedding

    src = tiny_model(seed=9)
    dst = llama_vision.build_model(tiny_params(vision_chunk_size=42))
    dst.load_state_dict(src.state_dict(), strict=True)
    enc = dst.vision_model.vision_encoder
    assert enc.positional_embedding.shape == (10, 32)
    assert enc.gated_positional_embedding.shape == (4, 4, 10, 32)
    pe = src.vision_model.vision_encoder.positional_embedding
    torch.testing.assert_close(resize_local_position_embedding(pe, 2), pe, atol=0, rtol=0)
    gpe = src.vision_model.vision_encoder.gated_positional_embedding
    torch.testing.assert_close(resize_global_position_embedding(gpe, 2, 4), gpe, atol=1e-6, rtol=0)
    # A linear ramp over the patch grid stays a linear ramp (independent torch math).
    ramp = torch.zeros(1 + 4, 1)
    ramp[1:, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # 2x2 grid: value = 2*row + col
    out = resize_local_position_embedding(ramp, 3)[1:, 0].view(3, 3)
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 3), torch.linspace(0, 1, 3), indexing="ij")
    torch.testing.assert_close(out, 2 * rows + cols, atol=1e-6, rtol=0)
