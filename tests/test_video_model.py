"""The video modality (llama_vision.model.video): aggregator, masks, zero-gate identity,
trainability, incremental decoding, tensor parallelism, inputs from mp4 files."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import llama_vision
from _helpers import randomize, run_torchrun, tiny_model, tiny_params
from llama_vision.generation import Generator
from llama_vision.model import zero_gates
from llama_vision.model.video import TemporalAggregator, VideoConfig, add_video_adapters, video_inputs_from_paths

IMG, VID = 512, 513  # learnable rows 0 and 1 of the tiny vocabulary (512)
WORKER = Path(__file__).resolve().parent / "dist_video_worker.py"
# 6 frames in groups of 4: two effective frames, the second one half padding.
CFG = VideoConfig(num_frames=6, frames_per_group=4, tiles_per_frame=2, n_latents=3, depth=2, heads=4, every_k_image_layers=1)
VIDEO_PREFIXES = ("video_aggregator.", "text_model.video_cross_attention_layers.", "text_model.placeholder_embeddings.video.")


def randomize_video(model, seed: int = 0):
    """Non-trivial video weights (gates in [0.3, 0.9]) so every branch is exercised."""
    randomize(model.video_aggregator, seed)
    randomize(model.text_model.video_cross_attention_layers, seed + 1)
    return model


def video_model(seed: int = 0, cfg: VideoConfig = CFG):
    model = tiny_model(seed)
    add_video_adapters(model, cfg)
    return randomize_video(model, seed).eval()


def make_videos(rows: int, per_row: int = 1, frames: int = 6, num_frames=None, ratio=(1, 2), seed: int = 0):
    """(videos [B, V, F, 2, 3, 28, 28], aspect_ratios [B, V, 2], num_frames [B, V])."""
    g = torch.Generator().manual_seed(seed)
    videos = torch.randn(rows, per_row, frames, 2, 3, 28, 28, generator=g)
    ar = torch.tensor(ratio).expand(rows, per_row, 2).clone()
    videos[:, :, :, int(ar[0, 0].prod()):] = 0  # empty tile slots are zeros, as the processor makes them
    nf = torch.full((rows, per_row), frames) if num_frames is None else torch.as_tensor(num_frames)
    return videos, ar, nf


def make_images(rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 1, 4, 3, 28, 28, generator=g), torch.tensor([[[2, 2]]] * rows)


# --- the adapter is invisible until trained ---------------------------------------------
@torch.no_grad()
def test_zero_gate_video_layers_leave_logits_bitwise_unchanged():
    base = tiny_model(seed=3)
    tokens = torch.tensor([[IMG, 1, 2, VID, 3, 4], [VID, 5, IMG, 6, 7, 8]])
    imgs, ar = make_images(2)
    videos = make_videos(2)
    want_img = base(tokens, imgs, ar)
    want_text = base(tokens)

    model = llama_vision.build_model(tiny_params(), init=False)
    model.load_state_dict(base.state_dict())
    model.eval()
    add_video_adapters(model, CFG)
    randomize_video(model, seed=3)
    zero_gates(model.text_model.video_cross_attention_layers)
    media = {"image": (imgs, ar), "video": videos}
    assert torch.equal(model(tokens, media_inputs=media), want_img)
    assert torch.equal(model(tokens, media_inputs={"video": videos}), want_text)
    assert torch.equal(model(tokens), want_text)

    # Open the gates: the text after the video changes, the text before it does not.
    for name, p in model.text_model.video_cross_attention_layers.named_parameters():
        if "gate" in name:
            p.fill_(0.7)
    opened = model(tokens, media_inputs=media)
    assert torch.equal(opened[0, :3], want_img[0, :3])
    assert (opened[0, 3:] - want_img[0, 3:]).abs().max() > 1e-3
    assert (opened[1] - want_img[1]).abs().max() > 1e-3


def test_schedule_every_kth_image_layer_and_before_the_image_block():
    model = tiny_model(seed=0)
    image_layers = model.modalities["image"].layers
    assert image_layers == [1, 3]
    mod = add_video_adapters(model, VideoConfig(num_frames=4, frames_per_group=4, tiles_per_frame=1, n_latents=2, depth=1, heads=2))
    assert mod.layers == [3]  # every 4th image layer, counted so that the last one is kept
    assert mod.token_id == VID and len(model.text_model.video_cross_attention_layers) == 1
    # Where both run, the video block runs first (the paper's order).
    assert [m for m, _ in model.text_model._adapters_by_layer()[3]] == ["video", "image"]
    assert [m for m, _ in model.text_model._adapters_by_layer()[1]] == ["image"]
    with pytest.raises(ValueError, match="already registered"):
        add_video_adapters(model, CFG)


# --- the temporal aggregator --------------------------------------------------------------
def _aggregator(seed=0, frames_per_group=4, max_groups=2):
    agg = TemporalAggregator(16, frames_per_group=frames_per_group, max_groups=max_groups, n_latents=3, depth=2, heads=4, ffn_hidden_dim=32)
    return randomize(agg, seed).eval()


@torch.no_grad()
def test_aggregator_is_deterministic_and_frame_order_matters():
    agg = _aggregator()
    x = torch.randn(2, 1, 8, 5, 16, generator=torch.Generator().manual_seed(0))  # [B, V, F, L, D]
    out, valid = agg(x)
    assert out.shape == (2, 1, 2, 3, 16) and valid.all()
    assert torch.equal(agg(x)[0], out)
    swapped = x[:, :, [1, 0, 2, 3, 4, 5, 6, 7]]  # two frames of group 0 swapped
    out_swapped = agg(swapped)[0]
    assert (out_swapped[:, :, 0] - out[:, :, 0]).abs().max() > 1e-3
    assert torch.equal(out_swapped[:, :, 1], out[:, :, 1])  # groups are independent
    # Swapping whole groups does not just swap the outputs: each group has its own queries.
    groups_swapped = agg(x[:, :, [4, 5, 6, 7, 0, 1, 2, 3]])[0]
    assert (groups_swapped[:, :, 1] - out[:, :, 0]).abs().max() > 1e-3


@torch.no_grad()
def test_aggregator_masks_padding_frames_and_tokens():
    agg = _aggregator()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 6, 5, 16, generator=g)  # 6 frames -> groups of 4 + (2 real, 2 pad)
    valid = torch.ones(1, 2, 6, 5, dtype=torch.bool)
    valid[0, 1, 3:] = False  # video 1 has 3 real frames: group 1 is all padding
    valid[0, 0, :, 4] = False  # token 4 of every frame of video 0 is padding (an empty tile)
    out, group_valid = agg(x, valid)
    assert out.shape == (1, 2, 2, 3, 16)
    assert group_valid.tolist() == [[[True, True], [True, False]]]
    noisy = x.clone()
    noisy[~valid] = 1e3 * torch.randn(int((~valid).sum()), 16, generator=g)
    assert torch.equal(agg(noisy, valid)[0], out)  # masked keys contribute exactly nothing
    assert torch.isfinite(out).all()  # a fully padded group still attends to its latents
    with pytest.raises(ValueError, match="at most 8 frames"):
        agg(torch.randn(1, 1, 9, 5, 16))


# --- masks in the decoder -----------------------------------------------------------------
@torch.no_grad()
def test_text_attends_to_the_video_before_it():
    model = video_model(seed=4)
    tokens = torch.tensor([[1, 2, VID, 3, 4, VID, 5, 6]])
    videos, ar, nf = make_videos(1, per_row=2, seed=0)
    a = model(tokens, media_inputs={"video": (videos, ar, nf)})[0]
    text = model(tokens)[0]
    assert torch.equal(a[:2], text[:2])  # text before the first video: untouched
    assert (a[2:] - text[2:]).abs().max() > 1e-3
    second = videos.clone()
    second[0, 1] = torch.randn_like(second[0, 1]) * (second[0, 1] != 0)
    b = model(tokens, media_inputs={"video": (second, ar, nf)})[0]
    assert torch.equal(a[:5], b[:5])  # the span of video 0 never sees video 1
    assert (a[5:] - b[5:]).abs().max() > 1e-4
    first = videos.clone()
    first[0, 0] = torch.randn_like(first[0, 0]) * (first[0, 0] != 0)
    c = model(tokens, media_inputs={"video": (first, ar, nf)})[0]
    assert torch.equal(a[:2], c[:2]) and (a[2:5] - c[2:5]).abs().max() > 1e-4


@torch.no_grad()
def test_frames_past_the_valid_count_are_ignored():
    model = video_model(seed=5)
    tokens = torch.tensor([[VID, 1, 2, 3]])
    videos, ar, _ = make_videos(1)
    nf = torch.tensor([[3]])
    a = model(tokens, media_inputs={"video": (videos, ar, nf)})
    noisy = videos.clone()
    noisy[:, :, 3:] = torch.randn_like(noisy[:, :, 3:])
    assert torch.equal(model(tokens, media_inputs={"video": (noisy, ar, nf)}), a)
    full = model(tokens, media_inputs={"video": (videos, ar, torch.tensor([[6]]))})
    assert (full - a).abs().max() > 1e-4


@torch.no_grad()
def test_image_and_video_in_one_prompt():
    model = video_model(seed=6)
    tokens = torch.tensor([[1, 2, IMG, 3, VID, 4, 5], [VID, 6, IMG, 7, 8, 9, 10]])
    imgs, ar = make_images(2)
    videos = make_videos(2, seed=2)
    both = model(tokens, media_inputs={"image": (imgs, ar), "video": videos})
    image_only = model(tokens, imgs, ar)
    text_only = model(tokens)
    assert torch.equal(both[0, :2], text_only[0, :2])  # before either medium
    assert torch.equal(both[0, :4], image_only[0, :4])  # before the video
    assert (both[0, 4:] - image_only[0, 4:]).abs().max() > 1e-4
    assert (both[1] - image_only[1]).abs().max() > 1e-4
    # Both modalities' adapters take part after both placeholders.
    video_only = model(tokens, media_inputs={"video": videos})
    assert (both[0, 4:] - video_only[0, 4:]).abs().max() > 1e-4


# --- training -------------------------------------------------------------------------------
def test_only_video_parameters_train():
    model = video_model(seed=7).train()
    counts = llama_vision.set_trainable(model, decoder=False, vision=False, adapters=False, video=True)
    n_video = sum(p.numel() for n, p in model.named_parameters() if n.startswith(VIDEO_PREFIXES))
    assert counts["video"] == n_video > 0
    assert sum(v for k, v in counts.items() if k != "video") == 0
    tokens = torch.tensor([[IMG, 1, VID, 2, 3, 4]])
    imgs, ar = make_images(1)
    out = model(tokens, media_inputs={"image": (imgs, ar), "video": make_videos(1, num_frames=[[5]])})
    out.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.startswith(VIDEO_PREFIXES):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_unfrozen_image_encoder_gets_gradients_from_video():
    cfg = VideoConfig(**{**CFG.__dict__, "freeze_image_encoder": False})
    model = video_model(seed=8, cfg=cfg).train()
    llama_vision.set_trainable(model, decoder=False, vision=True, adapters=True, video=True)
    model(torch.tensor([[VID, 1, 2]]), media_inputs={"video": make_videos(1)}).logsumexp(-1).mean().backward()
    assert model.vision_model.vision_encoder.conv1._linear.weight.grad is not None
    assert model.vision_model.vision_projection.weight.grad is not None


# --- generation ---------------------------------------------------------------------------
@torch.no_grad()
def test_incremental_decoding_with_video_equals_full_forward_greedy():
    model = video_model(seed=9)
    rows = [[1, VID, 2, 3, 4], [VID, 5, 6]]
    videos, ar, nf = make_videos(2, num_frames=[[6], [4]], seed=3)
    want = []
    for i, row in enumerate(rows):
        seq = list(row)
        media = {"video": (videos[i : i + 1], ar[i : i + 1], nf[i : i + 1])}
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]), media_inputs=media)[0, -1].argmax()))
        want.append(seq[len(row) :])
    got = Generator(model).generate_from_tensors(rows, media_inputs={"video": (videos, ar, nf)}, max_new_tokens=8, stop_tokens=[])
    assert got == want


def test_deepcopy_rebinds_the_video_encoder():
    """The DPO reference is a deep copy: its video encode must use its own weights."""
    model = video_model(seed=10)
    ref = copy.deepcopy(model)
    assert ref.modalities["video"].encode.model is ref
    tokens = torch.tensor([[VID, 1, 2]])
    videos = make_videos(1)
    with torch.no_grad():
        before = ref(tokens, media_inputs={"video": videos})
        model.video_aggregator.latents.add_(1.0)
        assert torch.equal(ref(tokens, media_inputs={"video": videos}), before)


# --- inputs ---------------------------------------------------------------------------------
def test_bad_video_inputs_raise_clear_errors():
    model = video_model(seed=11)
    tokens = torch.tensor([[VID, 1, 2]])
    videos, ar, nf = make_videos(1)
    with pytest.raises(ValueError, match=r"videos must be \[B, V, F, T, 3, S, S\]"):
        model(tokens, media_inputs={"video": (videos[0], ar, nf)})
    with pytest.raises(ValueError, match=r"num_frames must be in \[0, 6\]"):
        model(tokens, media_inputs={"video": (videos, ar, torch.tensor([[7]]))})
    with pytest.raises(ValueError, match="at most 8 frames"):
        model(tokens, media_inputs={"video": (torch.zeros(1, 1, 9, 2, 3, 28, 28), ar)})
    with pytest.raises(ValueError, match="2 video placeholder tokens but only 1 video slots"):
        model(torch.tensor([[VID, VID, 1]]), media_inputs={"video": (videos, ar, nf)})
    with pytest.raises(ValueError, match="tiles_per_frame=5 exceeds"):
        add_video_adapters(tiny_model(0), VideoConfig(tiles_per_frame=5))


@torch.no_grad()
def test_video_inputs_from_mp4_files(tmp_path):
    import numpy as np

    from llama_vision.data.video import VideoProcessor
    from llama_vision.data.synthetic.shapes import draw_motion_video, write_mp4

    rng = np.random.default_rng(0)
    long = write_mp4(draw_motion_video(rng, "right", num_frames=12, size=(56, 28)), tmp_path / "long.mp4")
    short = write_mp4(draw_motion_video(rng, "up", num_frames=4, size=(28, 28)), tmp_path / "short.mp4")
    cfg = VideoConfig(**{**CFG.__dict__, "num_frames": 6})
    videos, ar, nf = video_inputs_from_paths([[long], [short, long]], cfg, image_tile_size=28, max_tiles=4)
    assert videos.shape == (2, 2, 6, 2, 3, 28, 28) and videos.dtype == torch.float32
    assert ar.tolist() == [[[1, 2], [1, 1]], [[1, 1], [1, 2]]]
    assert nf.tolist() == [[6, 0], [6, 6]]  # short clips repeat frames; the empty slot has none
    assert videos[0, 1].abs().sum() == 0
    pad = VideoProcessor(6, 28, 2, short="pad")
    _, _, nf_pad = video_inputs_from_paths([[short]], cfg, 28, processor=pad)
    assert nf_pad.tolist() == [[4]]

    model = video_model(seed=12)
    out = model(torch.tensor([[VID, 1, 2, 0], [VID, 3, VID, 4]]), media_inputs={"video": (videos, ar, nf)})
    assert out.shape == (2, 4, 512) and torch.isfinite(out).all()


# --- tensor parallelism -------------------------------------------------------------------
def test_tp2_with_video_equals_tp1(tmp_path):
    out = tmp_path / "result"
    run_torchrun(WORKER, str(out), timeout=120)
    for rank in (0, 1):
        r = json.loads(Path(f"{out}.{rank}").read_text())
        assert r["max_diff"] < 1e-5, r
        assert r["max_diff_video_tokens"] < 1e-5, r
        assert r["n_sharded_video"] >= 12, r
        assert r["fresh_init_matches"], r
