"""Throughput of llama_vision's ImageProcessor against transformers' Mllama processors.

Processes the same deterministic images with
  * ``ours``    llama_vision.data.image.ImageProcessor,
  * ``hf``      transformers.MllamaImageProcessor (torchvision backend, the default class),
  * ``hf_pil``  transformers.MllamaImageProcessorPil (PIL backend: the reference numerics),
in two modes:
  * ``single``: one image per call (``processor(image)`` / ``hf(images=image)``);
  * ``batch``:  chunks of ``--batch-size`` images, each chunk packed into the model's
    ``[B, 1, max_tiles, 3, S, S]`` tensor (ours: ``ImageProcessor.collate`` on
    ``--threads`` threads; HF: one call on the chunk).
Full passes over the image set are timed in alternation (ours, hf, hf_pil, ours, ...) so
that machine noise hits all three alike; the median images/s of each is reported.

    .venv/bin/python benchmarks/tiling.py --tile-size 560 --num-images 200 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from llama_vision.data.image import CLIP_MEAN, CLIP_STD, ImageProcessor  # noqa: E402

# Width:height ratios of common photos, screenshots, documents and panoramas.
_ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 3 / 2, 2 / 3, 2.0, 0.5, 3.0, 1 / 3)


def make_images(num_images: int, seed: int = 0) -> list[Image.Image]:
    """Deterministic RGB images from 100x100 up to 2000x1500 px with mixed aspect ratios.

    Content is a colour gradient plus noise: resize cost does not depend on content, but
    this keeps the images from being trivially compressible or constant.
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        aspect = _ASPECTS[rng.integers(len(_ASPECTS))]
        width = int(rng.integers(100, 2001))
        height = int(np.clip(round(width / aspect), 100, 1500))
        width = int(np.clip(round(height * aspect), 100, 2000))
        ramp_x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        ramp_y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
        tint = rng.uniform(0.2, 1.0, size=3).astype(np.float32)
        noise = rng.integers(0, 64, size=(height, width, 3), dtype=np.uint8)
        pixels = ((ramp_x * tint + ramp_y * (1 - tint)) * 0.75 + noise).clip(0, 255)
        images.append(Image.fromarray(pixels.astype(np.uint8), mode="RGB"))
    return images


def build_processors(tile_size: int, max_num_tiles: int, batch_size: int) -> dict:
    """``{"single": {name: f(image)}, "batch": {name: f(list of images) -> packed batch}}``."""
    from transformers import MllamaImageProcessor, MllamaImageProcessorPil

    hf_kwargs = dict(
        size={"height": tile_size, "width": tile_size},
        max_image_tiles=max_num_tiles,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    ours = ImageProcessor(tile_size=tile_size, max_num_tiles=max_num_tiles)
    hf = MllamaImageProcessor(**hf_kwargs)
    hf_pil = MllamaImageProcessorPil(**hf_kwargs)

    single = {
        "ours": ours,
        "hf": lambda image: hf(images=image, return_tensors="pt"),
        "hf_pil": lambda image: hf_pil(images=image, return_tensors="pt"),
    }

    packed = {
        "ours": lambda chunk: ours.collate([[im] for im in chunk]),
        "hf": lambda chunk: hf(images=[[im] for im in chunk], return_tensors="pt"),
        "hf_pil": lambda chunk: hf_pil(images=[[im] for im in chunk], return_tensors="pt"),
    }
    return {"single": single, "batch": packed}


def check_agreement(single: dict, images: list[Image.Image], count: int = 5) -> dict:
    """Largest |difference| between our tiles and each HF processor's on a few images."""
    worst = {}
    for image in images[:count]:
        tiles, _ = single["ours"](image)
        for name in ("hf", "hf_pil"):
            reference = single[name](image)["pixel_values"][0, 0, : tiles.shape[0]]
            diff = (reference.float() - tiles).abs().max().item()
            worst[name] = max(worst.get(name, 0.0), diff)
    return worst


def time_pass(process, images: list[Image.Image], batch_size: int | None) -> float:
    """Seconds to run ``process`` over all images, one at a time or in chunks; outputs are
    dropped at once (keeping 200 outputs of 4 x 3 x 560 x 560 floats would need 3 GB)."""
    step = batch_size or 1
    start = time.perf_counter()
    for i in range(0, len(images), step):
        process(images[i] if batch_size is None else images[i : i + step])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile-size", type=int, default=560)
    parser.add_argument("--max-num-tiles", type=int, default=4)
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per processor")
    parser.add_argument("--batch-size", type=int, default=8, help="images per call, batch mode")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    images = make_images(args.num_images, args.seed)
    processors = build_processors(args.tile_size, args.max_num_tiles, args.batch_size)

    import transformers

    megapixels = sum(im.width * im.height for im in images) / 1e6
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}, tile {args.tile_size}, max tiles "
        f"{args.max_num_tiles}, {len(images)} images ({megapixels:.1f} Mpx)"
    )
    worst = check_agreement(processors["single"], images)
    print("max |ours - hf| = {hf:.3g}, max |ours - hf_pil| = {hf_pil:.3g}".format(**worst))

    for mode in ("single", "batch"):
        runners = processors[mode]
        chunk = args.batch_size if mode == "batch" else None
        for process in runners.values():  # warm-up: imports, caches, allocator
            time_pass(process, images[: args.batch_size], chunk)
        seconds = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, process in runners.items():
                seconds[name].append(time_pass(process, images, chunk))
        rate = {name: len(images) / statistics.median(t) for name, t in seconds.items()}
        print(f"[{mode}]" + (f" chunks of {args.batch_size}" if mode == "batch" else ""))
        for name, times in seconds.items():
            runs = ", ".join(f"{t:.2f}" for t in times)
            print(f"  {name:7s} {rate[name]:8.1f} images/s   (passes: {runs} s)")
        print(f"  ours / hf     = {rate['ours'] / rate['hf']:.2f}x")
        print(f"  ours / hf_pil = {rate['ours'] / rate['hf_pil']:.2f}x")


if __name__ == "__main__":
    main()
