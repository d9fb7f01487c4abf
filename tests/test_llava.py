"""The projector (LLaVA-style, early fusion) image modality, llama_vision/model/llava.py:
its tokens replace their placeholders in the decoder input; adding it to a cross-attention
model leaves every row without its placeholder bitwise unchanged, and adding a
cross-attention modality to a projector model does the same; KV-cache generation equals
full forwards; bad inputs are named."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import llama_vision
from _helpers import TINY_IMAGE_TOKEN, randomize, tiny_inputs, tiny_model, tiny_params
from llama_vision.model.llava import LlavaConfig, add_llava_modality
from llama_vision.model.modality import MediaTokens

PIX = 28  # tiny tower input: 2x2 patches of 14 px


class PatchTower(nn.Module):
    """A small stand-in vision tower for the fusion mechanics (the CLIP/SigLIP towers
    are tested against transformers in test_clip_vision.py): [M, 3, 28, 28] -> [M, 4, 24]."""

    num_tokens = 4

    def __init__(self, width: int = 24):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 14, stride=14)
        self.mix = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.patch(x).flatten(2).transpose(1, 2)))


def _pixels(n_per_row: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values [B, N, 1, 3, 28, 28] and image_sizes [B, N, 2] ((0, 0): empty slot)."""
    g = torch.Generator().manual_seed(seed)
    n = max(max(n_per_row), 1)
    px = torch.zeros(len(n_per_row), n, 1, 3, PIX, PIX)
    sizes = torch.zeros(len(n_per_row), n, 2, dtype=torch.long)
    for b, k in enumerate(n_per_row):
        px[b, :k] = torch.randn(k, 1, 3, PIX, PIX, generator=g)
        sizes[b, :k] = torch.tensor([PIX, PIX])
    return px, sizes


def _llava_trunk(seed: int = 0):
    torch.manual_seed(seed)
    model = llama_vision.build_model(tiny_params(vision_num_cross_attention_layers=0))
    add_llava_modality(model, PatchTower(), 24)
    return randomize(model, seed).eval()


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


@torch.no_grad()
def test_projector_tokens_take_their_placeholders_places():
    """The logits equal a forward whose input embeddings are built by hand: the projector's
    tokens at the placeholder positions, the token embedding elsewhere."""
    from llama_vision.model.decoder_input import DecoderInput

    model = _llava_trunk()
    p = model.modalities["image"].token_id
    assert model.modalities["image"].fusion == "projector" and p == TINY_IMAGE_TOKEN
    assert model.modalities["image"].tokens_per_item() == 4
    tokens = torch.tensor([[1, p, p, p, p, 5, 9, p, p, p, p, 7]])  # two images
    px, sizes = _pixels([2], seed=1)
    got = model(tokens, media_inputs={"image": (px, sizes)})
    feats = model.vision_model.projector(model.vision_model.vision_encoder(px[0, :, 0]))  # [2, 4, D]
    embeds = model.text_model.embed(tokens).clone()
    embeds[0, 1:5], embeds[0, 7:11] = feats[0], feats[1]
    want = model(tokens, decoder_input=DecoderInput(input_embeds=embeds))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - model(tokens)).abs().max() > 1e-3  # the images matter


@torch.no_grad()
def test_adding_a_projector_modality_leaves_other_rows_bitwise_unchanged():
    """A cross-attention model (Meta's image modality, non-zero gates) gains a LLaVA
    modality "llava": in one batch with a Meta-image row, a llava row and a text row, the
    Meta-image and text rows' logits are bitwise those of the model without it."""
    base = tiny_model(seed=3)
    model = copy.deepcopy(base)
    add_llava_modality(model, PatchTower(), 24, LlavaConfig(name="llava"))
    randomize(model.llava_encoder, seed=4)
    q = model.modalities["llava"].token_id
    assert q != base.args.image_token_id and "llava" in llama_vision.model.trainability.trainable_groups(model)
    rows = [[TINY_IMAGE_TOKEN, 1, 5, 9, 33, 17], [1, q, q, q, q, 8, 9], [1, 20, 21, 22]]
    tokens = _pad(rows)
    _, imgs, ar = tiny_inputs()
    images = torch.zeros(3, 1, *imgs.shape[2:])
    images[0] = imgs[0]
    ratios = torch.tensor([[[1, 3]], [[1, 1]], [[1, 1]]])
    px, sizes = _pixels([0, 1, 0], seed=5)
    got = model(tokens, images, ratios, media_inputs={"llava": (px, sizes)})
    want = base(tokens, images, ratios)
    for i in (0, 2):
        assert torch.equal(got[i], want[i]), i
    assert (got[1] - want[1]).abs().max() > 1e-3


@torch.no_grad()
def test_adding_a_cross_attention_modality_to_a_projector_model_leaves_other_rows_bitwise_unchanged():
    base = _llava_trunk(seed=6)
    model = copy.deepcopy(base)
    encoder = nn.Linear(5, model.args.dim)
    model.add_modality("sensor", token_id=model.args.vocab_size + 3, layers=[1, 3], encoder=encoder,
                       encode=lambda x: MediaTokens(encoder(x), torch.ones(x.shape[:3], dtype=torch.bool)))
    randomize(model.text_model.sensor_cross_attention_layers, seed=7)  # non-zero gates: the adapters act
    randomize(model.sensor_encoder, seed=8)
    p, s = base.modalities["image"].token_id, model.modalities["sensor"].token_id
    rows = [[1, p, p, p, p, 5, 9], [s, 1, 20, 21, 22], [1, 30, 31]]
    tokens = _pad(rows)
    px, sizes = _pixels([1, 0, 0], seed=9)
    readings = torch.randn(3, 1, 6, 5, generator=torch.Generator().manual_seed(10))
    got = model(tokens, media_inputs={"image": (px, sizes), "sensor": readings})
    want = base(tokens, media_inputs={"image": (px, sizes)})
    for i in (0, 2):
        assert torch.equal(got[i], want[i]), i
    assert (got[1] - want[1]).abs().max() > 1e-3


@torch.no_grad()
def test_cached_generation_equals_full_forwards_on_ragged_rows():
    """Generator (prefill with the projector tokens, then KV-cache decode steps without
    them) == greedy decoding by full forwards, on ragged rows with 0, 1 and 2 images."""
    from llama_vision.generation import Generator

    model = _llava_trunk(seed=11)
    p = model.modalities["image"].token_id
    rows = [[1, p, p, p, p, 5, 9], [1, 40, 41], [p, p, p, p, 1, 7, p, p, p, p, 3]]
    px, sizes = _pixels([1, 0, 2], seed=12)
    got = Generator(model, streaming_layout=False).generate_from_tensors(
        rows, media_inputs={"image": (px, sizes)}, max_new_tokens=8, stop_tokens=[])
    for i, row in enumerate(rows):
        seq = list(row)
        k = sizes[i, :, 0].gt(0).sum().item()
        inputs = {"image": (px[i : i + 1, : max(k, 1)], sizes[i : i + 1, : max(k, 1)])}
        for _ in range(8):
            logits = model(torch.tensor([seq]), media_inputs=inputs)
            seq.append(int(logits[0, -1].argmax()))
        assert got[i] == seq[len(row):], i


def test_placeholder_count_must_match_the_tokens_the_images_give():
    model = _llava_trunk()
    p = model.modalities["image"].token_id
    px, sizes = _pixels([1])
    with pytest.raises(ValueError, match="row 0 has 3 image placeholder tokens but its image inputs give 4 tokens"):
        model(torch.tensor([[1, p, p, p, 5]]), media_inputs={"image": (px, sizes)})
    with pytest.raises(ValueError, match="projector modality has no adapter layers"):
        model.add_modality("x", token_id=model.args.vocab_size + 5, encode=lambda x: x, layers=[1], fusion="projector")
    with pytest.raises(ValueError, match="fusion must be one of"):
        model.add_modality("y", token_id=model.args.vocab_size + 5, encode=lambda x: x, layers=[1], fusion="early")


def test_llava_trunk_groups_read_as_llava_stages():
    """On a trunk without Meta's image modality the tower is the "vision" group and the
    projector the "adapters" group: LLaVA's pretraining is trainable: {vision: false,
    adapters: true}; the decoder stays frozen."""
    model = _llava_trunk()
    counts = llama_vision.set_trainable(model, decoder=False, vision=False, adapters=True)
    proj = sum(p.numel() for p in model.vision_model.projector.parameters())
    rows = model.text_model.learnable_embedding.weight.numel()
    assert counts["adapters"] == proj + rows and counts["vision"] == 0 and counts["decoder"] == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"vision_model.projector.{n}" for n, _ in model.vision_model.projector.named_parameters()} | {
        "text_model.learnable_embedding.weight"}


def test_packed_projector_rows_equal_unpacked_logits_and_gradients():
    """data.packing on LLaVA rows: several samples (with 0, 1 or 2 images, each image's
    placeholder expanded to its 4 tokens) in one packed row give every sample the logits and
    the summed gradients it has unpacked; absent image slots stay (0, 0)-sized."""
    import torch.nn.functional as F

    from llama_vision.data.batch import IGNORE_INDEX
    from llama_vision.data.collate import collate_examples
    from llama_vision.data.packing import collate_packed
    from llama_vision.model.decoder_input import DecoderInput

    model = _llava_trunk().train()
    p = model.modalities["image"].token_id
    g = torch.Generator().manual_seed(5)

    def sample(key, parts):
        tokens, images = [], []
        for part in parts:
            if part == "img":
                tokens += [p] * PatchTower.num_tokens
                images.append(torch.randn(1, 3, PIX, PIX, generator=g))
            else:
                tokens += [int(t) for t in torch.randint(3, 200, (part,), generator=g)]
        labels = [IGNORE_INDEX if t == p else t for t in tokens[1:]] + [IGNORE_INDEX]
        return {"key": key, "tokens": tokens, "labels": labels, "images": images, "aspect_ratios": [(PIX, PIX)] * len(images),
                "image_token_counts": [PatchTower.num_tokens] * len(images)}

    rows = [[sample("a", ["img", 6]), sample("b", [5])], [sample("c", [3, "img", 2, "img", 4]), sample("d", [7])]]
    packed = collate_packed(rows, pad_id=0, max_num_tiles=1, image_token_id=p)
    flat = [ex for row in rows for ex in row]
    unpacked = collate_examples(flat, pad_id=0, max_num_tiles=1, image_token_id=p)
    assert packed.aspect_ratios.tolist() == [[[PIX, PIX], [0, 0]], [[PIX, PIX], [PIX, PIX]]]

    def run(batch, layout):
        model.zero_grad(set_to_none=True)
        logits = model(batch.tokens, batch.images, batch.aspect_ratios, decoder_input=layout)
        F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").backward()
        return logits.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    for q in model.parameters():
        q.requires_grad_(True)
    logits_p, grads_p = run(packed, DecoderInput(positions=packed.positions, segment_ids=packed.segment_ids))
    logits_u, grads_u = run(unpacked, DecoderInput(lengths=unpacked.lengths))
    k = 0
    for r, row in enumerate(rows):
        off = 0
        for ex in row:
            n = len(ex["tokens"])
            torch.testing.assert_close(logits_p[r, off:off + n], logits_u[k, :n], atol=1e-5, rtol=0)
            off, k = off + n, k + 1
    assert any(n.startswith("vision_model.projector.") for n in grads_p)
    for n, gu in grads_u.items():
        torch.testing.assert_close(grads_p[n], gu, atol=1e-5, rtol=0, msg=n)
