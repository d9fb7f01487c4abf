"""A tiny checkpoint that really answers, for the evaluation-harness tests.

A random checkpoint scores ~0 on every task, so a runner that paired predictions with the
wrong references would still "match" it; this one is trained (about a minute on 2 cores) to
name the colour of the single shape in a shapes-world image, in SFT format ("What colour is
the shape?" -> "red"), and then its video adapters on clips of one moving shape captioned
with its colour. Held-out accuracy is far above chance (asserted by the tests that use it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from _helpers import ROOT

QUESTION = "What colour is the shape?"
# Canvas sizes of a 1x1 and a 1x2 tile grid at 28 px tiles (1 and 2 tiles).
CANVASES = ((28, 28), (56, 28))


def draw_single_shape(rng: np.random.Generator, canvas: tuple[int, int]):
    """-> (PIL image with one shape in a random cell, its colour name)."""
    from llama_vision.data.synthetic.shapes import COLOURS, KINDS, POSITIONS, Shape, draw_shapes_image

    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = Shape(colour, KINDS[int(rng.integers(len(KINDS)))], POSITIONS[int(rng.integers(len(POSITIONS)))])
    return draw_shapes_image(rng, canvas, [shape]), colour


def write_colour_world(root: Path, n_train: int, n_test: int, n_videos: int = 0, n_test_videos: int = 0, seed: int = 0) -> dict:
    """Train/test images + SFT dialogs, colour-captioned clips of one moving shape, and a word-level tokenizer that
    knows every word of the prompts and answers."""
    from llama_vision.data.synthetic.shapes import COLOURS, DIRECTIONS, draw_motion_video, write_mp4
    from llama_vision.tokenizer import train_sentencepiece

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    sft, test = [], []
    for i in range(n_train + n_test):
        image, colour = draw_single_shape(rng, CANVASES[i % len(CANVASES)])
        rel = f"images/{i:05d}.png"
        image.save(root / rel)
        if i < n_train:
            user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
            sft.append({"images": [rel], "messages": [user, {"role": "assistant", "content": colour}]})
        else:
            test.append({"id": f"t{i}", "image": rel, "question": QUESTION, "answers": [colour]})
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (root / "videos").mkdir(exist_ok=True)
    clips, test_clips = [], []
    for i in range(n_videos + n_test_videos):
        colour = list(COLOURS)[i % len(COLOURS)]
        frames = draw_motion_video(rng, DIRECTIONS[int(rng.integers(len(DIRECTIONS)))], num_frames=8, size=(28, 28), colour=colour)
        rel = f"videos/{i:05d}.mp4"
        write_mp4(frames, root / rel)
        (clips if i < n_videos else test_clips).append({"video": rel, "caption": colour})
    (root / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clips))
    # Each answer also on a line of its own: with no dummy prefix a word at the start of a
    # text is its own piece ("red", not "▁red"); and room for every word (256 byte pieces +
    # the characters + the words), else answers would be spelt letter by letter.
    words = list(COLOURS) + [QUESTION, " ".join(COLOURS), "A B C D E"]
    tok = train_sentencepiece(words * 8, root / "tokenizer.model", vocab_size=400, model_type="word")
    return {"root": root, "tokenizer": str(tok), "sft": str(root / "sft.jsonl"), "test": test,
            "videos": str(root / "videos.jsonl"), "test_videos": test_clips}


def sft_overrides(world: dict, out: Path, steps: int, init_from: str | None = None) -> list[str]:
    """Training-config overrides of the colour SFT run (from scratch, or from `init_from`)."""
    keys = {
        "model": str(ROOT / "configs/model/tiny.yaml"),
        "tokenizer": world["tokenizer"],
        "output_dir": str(out),
        "stage": "sft",
        "max_steps": steps,
        "checkpoint_every": 100000,
        "micro_batch_size": 16,
        "tensorboard": "false",
        "device": "cpu",
        "trainable": "{decoder: true, vision: true, adapters: true}",
        "init": "{gates: 1.0}",
        "data.kind": "conversations",
        "data.paths": f'["{world["sft"]}"]',
        "data.max_seq_len": 48,
        "data.tile_size": 28,
        "data.max_num_tiles": 4,
        "optim.lr": 3.0e-3,
        "optim.warmup_steps": 10,
    }
    if init_from is not None:
        keys["init_from"] = init_from
    return [f"{k}={v}" for k, v in keys.items()]


def train_colour_checkpoint(root: Path, image_steps: int = 200, video_steps: int = 40) -> tuple[Path, dict]:
    """-> (the final checkpoint folder of the colour model, its data); reused when present."""
    from llama_vision.config import load_config
    from llama_vision.training.train_config import TrainConfig
    from llama_vision.training.trainer import train

    world_file = root / "world.json"
    if (root / "video" / "final" / "params.json").exists() and world_file.exists():
        return root / "video" / "final", json.loads(world_file.read_text())
    world = write_colour_world(root / "data", n_train=512, n_test=24, n_videos=48, n_test_videos=10)
    image = sft_overrides(world, root / "image", image_steps)
    train(load_config(TrainConfig, None, image))
    video = image + [
        "stage=video_pretrain",
        f"init_from={root / 'image' / 'final'}",
        f"output_dir={root / 'video'}",
        f"max_steps={video_steps}",
        "micro_batch_size=8",
        "trainable={decoder: false, vision: false, adapters: false, video: true}",
        "data.kind=video_jsonl",
        f'data.paths=["{world["videos"]}"]',
        "data.max_seq_len=16",
        "video={num_frames: 8, frames_per_group: 4, tiles_per_frame: 1, n_latents: 4, depth: 1, heads: 4, every_k_image_layers: 1}",
        "optim.gate_lr_multiplier=20",
    ]
    train(load_config(TrainConfig, None, video))
    world = {k: (str(v) if isinstance(v, Path) else v) for k, v in world.items()}
    world_file.write_text(json.dumps(world))
    return root / "video" / "final", world
