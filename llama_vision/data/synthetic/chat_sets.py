"""Shapes-world conversation (SFT) and preference (DPO) sets, in the real JSONL formats:

    chat/sft.jsonl  {"images": ["images/00000.png"], "messages": [user: image + question,
                     assistant: caption]}
    chat/dpo.jsonl  {"images": [...], "prompt": [user message], "chosen": the true caption,
                     "rejected": a caption with one attribute changed}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .shapes import COLOURS, KINDS, Shape, canvas_sizes, describe_shapes, draw_shapes_image, random_shapes

QUESTION = "Describe the shapes in the image."


def _corrupt(rng: np.random.Generator, shapes: list[Shape]) -> list[Shape]:
    """The same scene with one shape's colour or kind changed (a near-miss answer)."""
    out = list(shapes)
    i = int(rng.integers(len(out)))
    s = out[i]
    if rng.random() < 0.5:
        out[i] = Shape(str(rng.choice([c for c in COLOURS if c != s.colour])), s.kind, s.position)
    else:
        out[i] = Shape(s.colour, str(rng.choice([k for k in KINDS if k != s.kind])), s.position)
    return out


def write_chat_sets(out_dir: str | os.PathLike, n: int, seed: int = 0, scale: float = 1.0) -> dict:
    """Draw `n` images and write sft.jsonl and dpo.jsonl over them (atomic, reused when
    the same arguments already produced them)."""
    out = Path(out_dir)
    stamp = {"n": n, "seed": seed, "scale": scale}
    done = out / "chat.json"
    paths = {"sft": str(out / "sft.jsonl"), "dpo": str(out / "dpo.jsonl"), "root": str(out)}
    if done.exists() and json.loads(done.read_text()) == stamp:
        return paths
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 7919)
    canvases = list(canvas_sizes(scale).values())
    sft, dpo = [], []
    for i in range(n):
        shapes = random_shapes(rng)
        image = draw_shapes_image(rng, canvases[i % len(canvases)], shapes)
        rel = f"images/{i:05d}.png"
        tmp = out / f"{rel}.tmp.png"
        image.save(tmp)
        os.replace(tmp, out / rel)
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
        caption = describe_shapes(shapes)
        sft.append({"images": [rel], "messages": [user, {"role": "assistant", "content": caption}]})
        dpo.append({"images": [rel], "prompt": [user], "chosen": caption, "rejected": describe_shapes(_corrupt(rng, shapes))})
    for name, rows in (("sft", sft), ("dpo", dpo)):
        tmp = out / f"{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, out / f"{name}.jsonl")
    done.write_text(json.dumps(stamp))
    return paths
