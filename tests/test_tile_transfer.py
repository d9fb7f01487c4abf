"""uint8 tiles (``ImageProcessor(output="uint8")``, ``data.tile_dtype: uint8``) normalised on
the device: bit-identical to the float32 path for images, packed rows, DPO pairs, videos and
inference inputs, the same training run, config validation and pinned memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers import ROOT, TINY_IMAGE_TOKEN, tiny_model, tiny_train_overrides
from llama_vision.config import ConfigError, load_config
from llama_vision.data.batch import Batch
from llama_vision.data.collate import collate_examples, collate_preferences
from llama_vision.data.image import ImageProcessor, normalization_table, normalize_tiles, stack_images
from llama_vision.data.packing import collate_packed
from llama_vision.training.train_config import TrainConfig

PRETRAIN = str(ROOT / "configs/train/tiny_image_pretrain.yaml")
IMAGE_TOKEN = 7  # any id: the collate functions only count it
# (width, height): square, wide, tall, tiny (upscaled), extreme, exact multiples of a tile.
SIZES = [(28, 28), (70, 30), (20, 100), (5, 9), (200, 5), (56, 56), (33, 61)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns: equality that tells -0.0 from 0.0 and compares NaNs too."""
    return t.float().contiguous().view(torch.int32)


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _processors(tile_size: int = 28, max_num_tiles: int = 4):
    return (ImageProcessor(tile_size, max_num_tiles),
            ImageProcessor(tile_size, max_num_tiles, output="uint8"))


def _rows():
    """Several images per row, an image-less row and grids of every kind: B = 4 rows."""
    images = [_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    return [images[:3], [], images[3:4], images[4:]]


def _example(key: str, images: list, processor: ImageProcessor) -> dict:
    """An LM example holding `images` (their placeholders first), tiled by `processor`."""
    tiled = [processor(image) for image in images]
    tokens = [IMAGE_TOKEN] * len(images) + [1, 2, 3]
    return {"key": key, "tokens": tokens, "labels": tokens[1:] + [-100],
            "images": [t for t, _ in tiled], "aspect_ratios": [g for _, g in tiled]}


# ------------------------------------------------------------------------- bit identity


def test_uint8_tiles_are_the_pixels_and_normalise_to_the_float_tiles():
    ref, raw = _processors()
    for seed, (w, h) in enumerate(SIZES):
        image = _image(w, h, seed)
        (want, grid), (got, grid_u8) = ref(image), raw(image)
        assert got.dtype == torch.uint8 and grid_u8 == grid and got.shape == want.shape
        # Black padding is 0 in uint8 and the normalised black where the float path pads.
        pad = torch.from_numpy(normalization_table(ref._mean, ref._std)[:, 0]).view(3, 1, 1)
        assert torch.equal(want[got == 0], pad.expand_as(want)[got == 0])
        out = normalize_tiles(got[None], torch.tensor([len(got)]))[0]
        assert torch.equal(_bits(out), _bits(want)), (w, h)


def test_collate_and_stack_images_normalise_bit_identically():
    """[B, N, T, 3, S, S] with absent tiles and images (exact zeros), several images per row."""
    ref, raw = _processors()
    rows = _rows()
    want, got = ref.collate(rows), raw.collate(rows)
    assert got.images.dtype == torch.uint8 and got.images.shape == want.images.shape == (4, 3, 4, 3, 28, 28)
    assert torch.equal(got.num_tiles, want.num_tiles) and torch.equal(got.aspect_ratios, want.aspect_ratios)
    assert (want.num_tiles < 4).any() and (want.num_tiles == 0).any()  # absent tiles and images are exercised
    out = normalize_tiles(got.images, got.num_tiles)
    assert out.dtype == torch.float32 and torch.equal(_bits(out), _bits(want.images))
    # The per-image path (the DataLoader's: stack_images) gives the same uint8 batch.
    stacked, num_tiles = stack_images([[raw(image)[0] for image in row] for row in rows], 4)
    assert stacked.dtype == torch.uint8 and torch.equal(stacked, got.images) and torch.equal(num_tiles, got.num_tiles)
    # Another dtype: the float32 values rounded once, as casting the float32 tiles would.
    assert torch.equal(normalize_tiles(got.images, got.num_tiles, dtype=torch.bfloat16), want.images.to(torch.bfloat16))
    # The processor's own mean/std, through its method.
    other = dict(mean=(0.5, 0.25, 0.125), std=(0.2, 0.3, 0.7))
    odd_ref, odd_raw = ImageProcessor(28, 4, **other), ImageProcessor(28, 4, output="uint8", **other)
    assert torch.equal(_bits(odd_raw.normalize(got.images, got.num_tiles)), _bits(odd_ref.collate(rows).images))


def test_packed_rows_and_preference_pairs_carry_uint8():
    ref, raw = _processors()
    rows = _rows()

    def packed(processor):
        examples = [_example(f"s{i}", images, processor) for i, images in enumerate(rows)]
        return collate_packed([examples[:2], examples[2:]], pad_id=0, max_num_tiles=4, image_token_id=IMAGE_TOKEN)

    want, got = packed(ref), packed(raw)
    assert got.images.dtype == torch.uint8 and got.packed
    norm = got.normalized()
    assert torch.equal(_bits(norm.images), _bits(want.images)) and torch.equal(norm.tokens, want.tokens)

    def pairs(processor):
        examples = []
        for i, images in enumerate(rows):
            ex = _example(f"p{i}", images, processor)
            examples.append({**ex, "chosen_tokens": ex["tokens"], "chosen_labels": ex["labels"],
                             "rejected_tokens": ex["tokens"][:-1], "rejected_labels": ex["labels"][:-1]})
        return collate_preferences(examples, pad_id=0, max_num_tiles=4, image_token_id=IMAGE_TOKEN)

    want, got = pairs(ref), pairs(raw)
    norm = got.to("cpu").normalized()
    assert norm.rejected.images is norm.chosen.images  # still shared: encoded once per pair
    assert torch.equal(_bits(norm.images), _bits(want.images))
    assert want.normalized() is want  # float tiles: nothing to do


def test_video_frames_uint8_match_float(tmp_path):
    """Short clip padded with black frames (video_frames < F), 1x2 grids with a padded tile,
    and an absent video in the second row."""
    pytest.importorskip("decord")
    from llama_vision.data.synthetic.shapes import write_mp4
    from llama_vision.data.video import VideoProcessor
    from llama_vision.data.video_dataset import VideoBatch, collate_video_examples

    frames = np.random.default_rng(0).integers(0, 256, (3, 56, 84, 3), dtype=np.uint8)
    path = write_mp4(frames, tmp_path / "clip.mp4")

    def batch(processor) -> VideoBatch:
        video = VideoProcessor(5, 28, max_num_tiles=2, image_processor=processor, short="pad")
        clip, grid, info = video(path)
        rows = [{**_example("v", [], processor), "videos": [clip], "video_ratios": [grid], "video_frames": [info.valid]},
                {**_example("w", [], processor), "videos": [], "video_ratios": [], "video_frames": []}]
        return collate_video_examples(rows, pad_id=0, max_num_tiles=2, image_token_id=IMAGE_TOKEN)

    want, got = batch(ImageProcessor(28, 2)), batch(ImageProcessor(28, 2, output="uint8"))
    assert got.videos.dtype == torch.uint8 and got.videos.shape == want.videos.shape == (2, 1, 5, 2, 3, 28, 28)
    assert got.video_frames.tolist() == [[3], [0]] and got.video_aspect_ratios[0, 0].tolist() == [1, 2]
    moved = got.to("cpu")
    assert isinstance(moved, VideoBatch) and moved.videos is not None  # _map carries the videos
    norm = moved.normalized()
    assert isinstance(norm, VideoBatch) and torch.equal(_bits(norm.videos), _bits(want.videos))


def test_inference_inputs_from_uint8_processor():
    from llama_vision.inputs import prepare_image_batch

    model = tiny_model()
    rows = [[TINY_IMAGE_TOKEN, 1, 2], [3, TINY_IMAGE_TOKEN, TINY_IMAGE_TOKEN]]
    images = [[_image(70, 30, 0)], [_image(20, 100, 1), _image(28, 28, 2)]]
    want, ars = prepare_image_batch(model, rows, images)
    got, ars_u8 = prepare_image_batch(model, rows, images, processor=ImageProcessor(28, 4, output="uint8"))
    assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)) and torch.equal(ars, ars_u8)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="output must be one of"):
        ImageProcessor(28, 4, output="float16")
    ref, raw = _processors()
    image = _image(30, 30, 0)
    with pytest.raises(ValueError, match="uint8 and float tiles"):
        stack_images([[ref(image)[0], raw(image)[0]]], 4)
    with pytest.raises(TypeError, match="uint8"):
        normalize_tiles(ref(image)[0][None], torch.tensor([1]))
    with pytest.raises(ValueError, match="num_tiles"):
        normalize_tiles(raw(image)[0][None], torch.tensor([1, 1]))


# ------------------------------------------------------------------------------ training


def _cfg(corpus, out, **extra):
    common = {"max_steps": 3, "checkpoint_every": 100, "save_final": "false", "micro_batch_size": 4,
              "data.shuffle": "false", "optim.warmup_steps": 1}
    return load_config(TrainConfig, PRETRAIN, tiny_train_overrides(corpus, out, **{**common, **extra}))


def test_uint8_training_equals_float32(shapes_corpus, tmp_path):
    from llama_vision.training.metrics import read_metrics
    from llama_vision.training.trainer import Trainer

    runs = {}
    for tile_dtype in ("float32", "uint8"):
        trainer = Trainer(_cfg(shapes_corpus, tmp_path / tile_dtype, **{"data.tile_dtype": tile_dtype}))
        first = next(iter(trainer.loader))
        assert first.images.dtype == getattr(torch, tile_dtype)
        assert not trainer.loader.pin_memory  # device: cpu
        trainer.fit()
        losses = [m["loss"] for m in read_metrics(tmp_path / tile_dtype / "metrics.jsonl")]
        runs[tile_dtype] = losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    (want_losses, want), (got_losses, got) = runs["float32"], runs["uint8"]
    assert len(got_losses) == 3 and got_losses == want_losses  # bitwise: the same images reach the model
    for name, p in want.items():
        assert torch.equal(got[name], p), name


def test_tile_dtype_config_is_validated():
    with pytest.raises(ConfigError, match=r"data\.tile_dtype.*'float32', 'uint8'.*'fp16'"):
        load_config(TrainConfig, PRETRAIN, ["data.tile_dtype=fp16"])
    assert load_config(TrainConfig, PRETRAIN).data.tile_dtype == "float32"


def test_loader_pins_memory_for_a_cuda_device(shapes_corpus, tmp_path):
    """Only the flag is checked (no batch is drawn), so this runs without a GPU too."""
    from types import SimpleNamespace

    from llama_vision.tokenizer import load_tokenizer
    from llama_vision.training.data import build_loader

    args = SimpleNamespace(max_seq_len=256, vision_chunk_size=28, vision_max_num_chunks=4)  # the tiny model's
    for device, pinned in (("cpu", False), ("cuda", True)):
        cfg = _cfg(shapes_corpus, tmp_path / device, device=device)
        assert build_loader(cfg, load_tokenizer(cfg.tokenizer), args, 0, 1).pin_memory is pinned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_uint8_batch_pins_and_normalises_on_the_gpu():
    ref, raw = _processors()
    examples = [_example(f"s{i}", images, raw) for i, images in enumerate(_rows())]
    batch = collate_examples(examples, pad_id=0, max_num_tiles=4, image_token_id=IMAGE_TOKEN).pin_memory()
    assert isinstance(batch, Batch) and batch.images.dtype == torch.uint8 and batch.images.is_pinned()
    on_gpu = batch.to("cuda", non_blocking=True).normalized()
    want = ref.collate(_rows()).images
    assert torch.equal(_bits(on_gpu.images.cpu()), _bits(want))
