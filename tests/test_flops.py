"""The training step's FLOP count (llama_vision/training/flops.py): a hand count of the tiny
config, an independent measurement with torch's FlopCounterMode on real forward and
backward passes, and tensor-parallel invariance."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import llama_vision
from _helpers import TINY_IMAGE_TOKEN, run_torchrun, tiny_model, tiny_params
from llama_vision.data.batch import PreferenceBatch
from llama_vision.data.collate import collate_examples
from llama_vision.data.video_dataset import VideoBatch
from llama_vision.model import ModelArgs
from llama_vision.model.video import VideoConfig, add_video_adapters
from llama_vision.training.flops import (
    StepShape,
    VideoItem,
    mfu,
    step_flops,
    step_shape_from_batch,
    trainable_from_model,
)
from llama_vision.training.losses import lm_loss_sum

IMG, VID = TINY_IMAGE_TOKEN, TINY_IMAGE_TOKEN + 1

# The tiny config's sizes, written out (configs/model/tiny.yaml, vocabulary 512: tests/_helpers.py TINY_PARAMS):
D, H, KV, HD = 64, 4, 2, 16  # dim, heads, kv heads, head_dim = 64 / 4
FFN = 176  # int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 16
VOCAB, LAYERS = 512, 4
# 2 cross-attention layers, before self-attention layers 1 and 3 (k = ceil(4 / 2) = 2)
W, VLAYERS, MLP = 32, 4 + 2, 128  # vision width; 4 local + 2 global layers; 4.0 * 32
GRID2, TOK, TOK8 = 4, 5, 8  # (28 / 14)^2 patches per tile; + class token; padded to 8
PATCH_IN = 3 * 14 * 14  # 588 pixels per patch
VOUT = 3 * 32  # final features + 2 taps, concatenated


def decoder_token_flops() -> int:
    """One text token through one self-attention layer's linears."""
    return 2 * (D * H * HD + 2 * D * KV * HD + H * HD * D + 3 * D * FFN)


SETTINGS = {
    "adapters": dict(decoder=False, vision=False, adapters=True),
    "vision+adapters": dict(decoder=False, vision=True, adapters=True),
    "all": dict(decoder=True, vision=True, adapters=True),
    "vision": dict(decoder=False, vision=True, adapters=False),
    "decoder": dict(decoder=True, vision=False, adapters=False),
}


# --- hand count ---------------------------------------------------------------------------
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_hand_count_tiny(setting):
    # 3 rows of 5, 3 and 2 text tokens; row 0 holds an image of 4 tile slots, row 1 none,
    # row 2 one of 2 tile slots.
    shape = StepShape(text_lengths=(5, 3, 2), image_tiles=((4,), (), (2,)))
    text = 5 + 3 + 2
    causal = 5 * 6 // 2 + 3 * 4 // 2 + 2 * 3 // 2  # 24 (query, key) pairs per head
    media = [4 * TOK, 0, 2 * TOK]  # 20, 0, 10 cross-attention keys per row
    cross = 5 * 20 + 3 * 0 + 2 * 10  # 120 (text, media) pairs per head

    dec = LAYERS * text * decoder_token_flops()
    sa = LAYERS * 2 * (2 * HD * H * causal)  # QK^T + AV per layer
    lm = 2 * text * D * VOCAB
    patch = 2 * (6 * GRID2) * PATCH_IN * W  # 6 tiles x 4 patches
    enc_tokens = (4 + 2) * TOK8  # 48: every tile slot, 8 tokens each
    vis_lin = VLAYERS * 2 * enc_tokens * (4 * W * W + 2 * W * MLP)
    vis_attn = VLAYERS * 2 * (2 * W * ((4 * 8) ** 2 + (2 * 8) ** 2))  # all tiles of an image attend
    proj = 2 * (6 * TOK) * VOUT * D  # the 30 output tokens (pad-to-8 dropped)
    # One cross-attention block: Q, O, FFN per text token; K, V per media token.
    xa_q = 2 * text * D * H * HD
    xa_o_ffn = 2 * text * (H * HD * D + 3 * D * FFN)
    xa_kv = 2 * sum(media) * 2 * D * KV * HD
    xa_qk = xa_av = 2 * HD * H * cross
    xa_block = xa_q + xa_o_ffn + xa_kv + xa_qk + xa_av
    forward = dec + sa + lm + patch + vis_lin + vis_attn + proj + 2 * xa_block

    flags = SETTINGS[setting]
    if setting == "vision":
        # Nothing trainable upstream of layer 0 (no learnable row trains): no backward
        # there. Block 1: no dQ/dWq (the stream needs no grad yet), dX for K/V, only dK in
        # QK^T, dP and dV in AV, dX through O and the FFN. Then everything 1x + attention 2x.
        back_xa = (xa_kv + xa_qk + 2 * xa_av + xa_o_ffn) + (xa_q + xa_o_ffn + xa_kv + 2 * xa_qk + 2 * xa_av)
        back_dec = 3 * text * decoder_token_flops() + 3 * 2 * (2 * 2 * HD * H * causal)
        back_lm = lm
        back_proj = proj  # dX only (the projection is frozen)
    elif setting == "decoder":
        # Media frozen end to end: no gradient for K/V (nor dK, dV), the rest 1x.
        back_xa = 2 * (xa_q + xa_o_ffn + xa_qk + xa_av)
        back_dec, back_lm, back_proj = 2 * dec + 2 * sa, 2 * lm, 0
    else:
        # The learnable <|image|> row trains with the adapters: the gradient flows back
        # through every decoder layer (dX: 1x of the linears, 2x of attention).
        back_xa = 2 * 2 * xa_block
        back_dec = (2 if flags["decoder"] else 1) * dec + 2 * sa
        back_lm = (2 if flags["decoder"] else 1) * lm
        back_proj = (2 if flags["vision"] else 1) * proj  # dW, + dX if the encoder trains
    back_vis = (patch + 2 * vis_lin + 2 * vis_attn) if flags["vision"] else 0  # no dX for the pixels
    count = step_flops(ModelArgs(**tiny_params()), shape, {g for g, on in flags.items() if on})
    assert count.forward_total == forward
    assert count.forward["cross_attention"] == 2 * xa_block
    assert count.forward["vision"] == patch + vis_lin + vis_attn
    assert count.forward["self_attention"] == sa
    assert count.total == forward + back_xa + back_dec + back_lm + back_proj + back_vis


def test_text_only_step_is_6n_plus_attention():
    """No media: no adapters run, and a fully trained decoder costs 3x its forward."""
    shape = StepShape(text_lengths=(6, 2))
    fwd = LAYERS * 8 * decoder_token_flops() + 2 * 8 * D * VOCAB + LAYERS * 2 * (2 * HD * H * (21 + 3))
    count = step_flops(ModelArgs(**tiny_params()), shape, {"decoder"})
    assert count.forward_total == fwd and count.total == 3 * fwd
    # Adapters alone cannot train on text: nothing trainable is in the graph.
    assert step_flops(ModelArgs(**tiny_params()), shape, {"adapters"}).total == fwd
    assert step_flops(ModelArgs(**tiny_params()), StepShape((6, 2), backward=False), {"decoder"}).total == fwd


def test_video_hand_count():
    cfg = VideoConfig(num_frames=6, frames_per_group=4, tiles_per_frame=2, n_latents=3, depth=2, heads=4, every_k_image_layers=2)
    args = ModelArgs(**tiny_params(), video=cfg.__dict__)
    # One row of 4 tokens with one video: 5 valid frames of 2 tile slots, given 6 frame
    # slots -> 2 groups of 4 frames.
    shape = StepShape(text_lengths=(4,), videos=((VideoItem(frames=5, tiles=2, slots=6),),))
    count = step_flops(args, shape, {"video"})
    frames_enc = 5 * (2 * (2 * GRID2) * PATCH_IN * W + VLAYERS * 2 * (2 * TOK8) * (4 * W * W + 2 * W * MLP)
                      + VLAYERS * 2 * (2 * W * (2 * TOK8) ** 2) + 2 * (2 * TOK) * VOUT * D)
    assert count.forward["video_encoder"] == frames_enc
    assert "video_encoder" not in count.backward_activation  # frames run under no_grad
    kv = 4 * 2 * TOK + 3  # a group's keys: 4 frames x 2 tiles x 5 tokens + the 3 latents
    per_layer = 2 * (2 * 3) * D * D * 2 + 2 * (2 * kv) * D * D * 2 + 2 * 2 * (2 * D * 3 * kv) + 2 * (2 * 3) * 3 * D * FFN
    assert count.forward["video_aggregator"] == 2 * per_layer  # depth 2
    # one video block (before layer 3 = every 2nd image layer, counted from the top)
    block = 2 * 4 * (D * H * HD + H * HD * D + 3 * D * FFN) + 2 * 6 * 2 * D * KV * HD + 2 * (2 * HD * H * 4 * 6)
    assert count.forward["video_cross_attention"] == block
    assert count.backward_activation["video_cross_attention"] + count.backward_weight["video_cross_attention"] == 2 * block
    assert "cross_attention" not in count.forward  # no image in the batch: image blocks do not run


def test_shape_from_batch_and_dpo_passes():
    batch = ragged_batch()
    real, padded = step_shape_from_batch(batch)[0], step_shape_from_batch(batch, include_padding=True)[0]
    assert real.text_lengths == (7, 4, 5) and padded.text_lengths == (7, 7, 7)
    assert real.image_tiles == ((4,), (4, 4), ()) and padded.image_tiles == ((4, 4),) * 3
    assert real.backward and padded.backward
    # DPO: one pass over [chosen; rejected] whose rejected rows read the chosen rows'
    # encoded images, with backward (policy), and the same pass forward-only (reference).
    pref = PreferenceBatch(batch, batch)
    passes = step_shape_from_batch(pref)
    assert [p.backward for p in passes] == [True, False]
    assert passes[0].text_lengths == (7, 4, 5) * 2 and passes[0].media_source == (0, 1, 2) * 2
    args = ModelArgs(**tiny_params())
    two = StepShape(real.text_lengths * 2, real.image_tiles * 2)  # both halves encoding their own images
    shared = step_flops(args, passes[0], {"adapters"})
    encode_once = step_flops(args, StepShape(real.text_lengths, real.image_tiles), {"adapters"}).component("vision")
    assert shared.component("vision") == encode_once
    assert step_flops(args, two, {"adapters"}).total - shared.total == encode_once + (
        step_flops(args, two, {"adapters"}).component("vision_projection") - shared.component("vision_projection")
        + step_flops(args, two, {"adapters"}).component("cross_attention") - shared.component("cross_attention"))
    assert step_flops(args, step_shape_from_batch(pref, reference=False), {"adapters"}).total == shared.total


def test_dpo_step_matches_flop_counter():
    """The real DPO objective (policy pass with backward, reference pass without) counted
    by FlopCounterMode equals step_flops of its shapes (+ the math backend's surplus)."""
    from llama_vision.training.objectives import DPOObjective

    model = tiny_model().train()
    llama_vision.set_trainable(model, decoder=False, vision=True, adapters=True)
    objective = DPOObjective(model, beta=0.1, autocast=contextlib.nullcontext)
    chosen = ragged_batch(rows=(0, 1))
    # A pair shares its prompt (and images): the rejected rows differ in their labels.
    pref = PreferenceBatch(chosen, dataclasses.replace(chosen, labels=chosen.labels.roll(1, dims=1)))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        objective.loss_sum(pref).backward()
    count = step_flops(model.args, step_shape_from_batch(pref, include_padding=True), trainable_from_model(model))
    width = chosen.tokens.shape[1]
    assert counter.get_total_flops() == count.total + causal_surplus([width] * 4, LAYERS, 0) + causal_surplus([width] * 4, LAYERS, 4)


def test_rejects_bad_inputs():
    args = ModelArgs(**tiny_params())
    with pytest.raises(ValueError, match="unknown trainability"):
        step_flops(args, StepShape((3,)), {"adaptors"})
    with pytest.raises(ValueError, match="no video modality"):
        step_flops(args, StepShape((3,), videos=((VideoItem(1, 1, 1),),)), set())
    with pytest.raises(ValueError, match="vision_max_num_chunks"):
        step_flops(args, StepShape((3,), image_tiles=((5,),)), set())
    with pytest.raises(ValueError, match="rows"):
        StepShape((3, 4), image_tiles=((1,),))


# --- against an independent measurement ---------------------------------------------------
def ragged_batch(rows=(0, 1, 2)):
    """Row 0: 7 tokens, one 1x3 image; row 1: 4 tokens, two images (2x2, 1x1); row 2: 5
    tokens, no image. Collated with 4 tile slots per image (images [3, 2, 4, 3, 28, 28])."""
    g = torch.Generator().manual_seed(0)
    examples = [
        dict(key="a", tokens=[IMG, 5, 6, 7, 8, 9, 10], labels=[5, 6, 7, 8, 9, 10, -100],
             images=[torch.randn(3, 3, 28, 28, generator=g)], aspect_ratios=[(1, 3)]),
        dict(key="b", tokens=[IMG, IMG, 11, 12], labels=[-100, 11, 12, -100],
             images=[torch.randn(4, 3, 28, 28, generator=g), torch.randn(1, 3, 28, 28, generator=g)], aspect_ratios=[(2, 2), (1, 1)]),
        dict(key="c", tokens=[13, 14, 15, 16, 17], labels=[14, 15, 16, 17, -100], images=[], aspect_ratios=[]),
    ]
    return collate_examples([examples[i] for i in rows], pad_id=0, max_num_tiles=4, image_token_id=IMG)


def measure(model, batch, backward: bool = True) -> FlopCounterMode:
    """FlopCounterMode over the trainer's forward (+ backward) of `batch`. SDPA's math
    backend: FlopCounterMode has no formula for the fused CPU kernel, while the math
    path is plain bmm (and its backward, one bmm per input that needs a gradient)."""
    media = batch.media_inputs() if hasattr(batch, "media_inputs") else None
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            logits = model(batch.tokens, batch.images, batch.aspect_ratios if batch.images is not None else None, media_inputs=media)
            loss = lm_loss_sum(logits, batch.labels)
        if backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter


def causal_surplus(lengths, layers_forward: int, layers_backward: int) -> int:
    """What the math backend computes beyond the causal triangle: it multiplies the full
    L x L score matrix (masked afterwards), we count the L(L + 1)/2 attended pairs; its
    backward is 2x (dQ/dK, dP/dV) in every layer the gradient flows through."""
    per_layer = sum(2 * 2 * HD * H * (n * n - n * (n + 1) // 2) for n in lengths)
    return per_layer * (layers_forward + 2 * layers_backward)


# Layers the gradient flows back through: all of them when the learnable <|image|> row
# trains (adapters), layers 1..3 (after the first cross-attention block) otherwise.
BACKWARD_LAYERS = {"adapters": 4, "vision+adapters": 4, "all": 4, "vision": 3, "decoder": 4}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_flop_counter_on_padded_batch(setting):
    model = tiny_model().train()
    llama_vision.set_trainable(model, **SETTINGS[setting])
    batch = ragged_batch()
    measured = measure(model, batch).get_total_flops()
    shapes = step_shape_from_batch(batch, include_padding=True)  # what the hardware runs
    count = step_flops(model.args, shapes, trainable_from_model(model))
    assert measured == count.total + causal_surplus([7] * 3, LAYERS, BACKWARD_LAYERS[setting])
    # The default leaves the batch padding out: less work than the hardware's.
    assert step_flops(model.args, step_shape_from_batch(batch), trainable_from_model(model)).total < count.total


@pytest.mark.parametrize("setting", ["adapters", "all"])
def test_real_token_count_equals_rows_run_unpadded(setting):
    """include_padding=False is exactly the work of each row run alone, unpadded (every row
    holds an image, so each runs the adapters either way)."""
    model = tiny_model().train()
    llama_vision.set_trainable(model, **SETTINGS[setting])
    alone = 0
    for i, n in ((0, 7), (1, 4)):
        alone += measure(model, ragged_batch(rows=(i,))).get_total_flops() - causal_surplus([n], LAYERS, 4)
    count = step_flops(model.args, step_shape_from_batch(ragged_batch(rows=(0, 1))), trainable_from_model(model))
    assert count.total == alone


def test_forward_components_match_flop_counter_modules():
    """Per component, a no-grad forward (DPO's reference pass)."""
    model = tiny_model()
    batch = ragged_batch()
    counts = measure(model, batch, backward=False).get_flop_counts()
    flops = {k: sum(v.values()) for k, v in counts.items()}
    count = step_flops(model.args, StepShape((7,) * 3, ((4, 4),) * 3, backward=False), trainable_from_model(model))
    root = "VisionLanguageModel."
    assert flops[root + "vision_model.vision_encoder"] == count.forward["vision"]
    assert flops[root + "vision_model.vision_projection"] == count.forward["vision_projection"]
    assert flops[root + "text_model.output"] == count.forward["lm_head"]
    layers = sum(flops[f"{root}text_model.layers.{i}"] for i in range(LAYERS))
    assert layers == count.forward["decoder"] + count.forward["self_attention"] + causal_surplus([7] * 3, LAYERS, 0)
    # K/V are computed once per block outside the block's forward (prepare_media).
    xa = sum(flops[f"{root}text_model.cross_attention_layers.{j}"] + flops[f"{root}text_model.cross_attention_layers.{j}.attention.wk"]
             + flops[f"{root}text_model.cross_attention_layers.{j}.attention.wv"] for j in range(2))
    assert xa == count.forward["cross_attention"]
    assert flops["Global"] == count.total + causal_surplus([7] * 3, LAYERS, 0)


def video_batch(frames=(6, 3)):
    """Two rows (6 tokens) with one video each (6 frame slots of 2 tiles; `frames` valid)
    and one image (row 0) -- the image tokens after the video's."""
    g = torch.Generator().manual_seed(2)
    examples = [
        dict(key="a", tokens=[VID, 1, IMG, 2, 3, 4], labels=[1, -100, 2, 3, 4, -100],
             images=[torch.randn(3, 3, 28, 28, generator=g)], aspect_ratios=[(1, 3)]),
        dict(key="b", tokens=[VID, 5, 6, 7, 8, 9], labels=[5, 6, 7, 8, 9, -100], images=[], aspect_ratios=[]),
    ]
    base = collate_examples(examples, pad_id=0, max_num_tiles=4, image_token_id=IMG)
    videos = torch.randn(2, 1, 6, 2, 3, 28, 28, generator=g)
    return VideoBatch(**base.__dict__, videos=videos, video_aspect_ratios=torch.tensor([[[1, 2]], [[1, 1]]]),
                      video_frames=torch.tensor([[frames[0]], [frames[1]]]))


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen_frames", "trained_frames"])
def test_video_matches_flop_counter(freeze):
    cfg = VideoConfig(num_frames=6, frames_per_group=4, tiles_per_frame=2, n_latents=3, depth=2, heads=4,
                      every_k_image_layers=2, freeze_image_encoder=freeze)
    model = tiny_model()
    add_video_adapters(model, cfg)
    model.train()
    if freeze:  # the video stage: only the video group trains
        llama_vision.set_trainable(model, decoder=False, vision=False, adapters=False, video=True)
    else:
        llama_vision.set_trainable(model, decoder=False, vision=True, adapters=True, video=True)
    batch = video_batch()
    measured = measure(model, batch).get_total_flops()
    count = step_flops(model.args, step_shape_from_batch(batch, include_padding=True), trainable_from_model(model))
    assert measured == count.total + causal_surplus([6, 6], LAYERS, 4)
    assert (count.backward_activation.get("video_encoder", 0) > 0) == (not freeze)


# --- tensor parallelism and MFU -------------------------------------------------------------
def test_count_is_tp_invariant_and_splits_over_tp_ranks(tmp_path):
    """At TP=2 each rank does half the matmuls; both ranks together do exactly the work
    counted from the full shapes, and the count at TP=2 is the count at TP=1."""
    out = tmp_path / "flops"
    run_torchrun(Path(__file__).resolve().parent / "dist_flops_worker.py", str(out))
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    model = llama_vision.build_model(tiny_params(), seed=3)
    llama_vision.set_trainable(model, decoder=False, vision=True, adapters=True)
    want = step_flops(model.args, StepShape((7, 7), ((4,), (4,))), trainable_from_model(model)).total
    assert all(r["counted"] == want and r["trainable"] == ["adapters", "vision"] for r in ranks)
    assert ranks[0]["measured"] == ranks[1]["measured"]
    assert sum(r["measured"] for r in ranks) == want + causal_surplus([7, 7], LAYERS, 4)


def test_mfu_formula_is_tp_invariant():
    per_gpu, step, peak = 3e14, 2.0, 1e15  # each GPU does the same work in the same time
    for tp in (1, 2, 8):
        assert mfu(per_gpu * tp, step, tp=tp, peak_flops_per_gpu=peak) == pytest.approx(0.15)
    assert mfu(1e12, 0.0, tp=2, peak_flops_per_gpu=peak) is None
    with pytest.raises(ValueError):
        mfu(1e12, 1.0, tp=0, peak_flops_per_gpu=peak)
    if not torch.cuda.is_available():
        assert mfu(1e12, 1.0, tp=1) is None  # no peak on CPU
