"""Test helpers (imported as `from _helpers import ...`): the tiny model with random weights,
its inputs, a CPU torchrun launcher, the shapes-world corpus and stage overrides (nothing
is downloaded). Fixtures live in conftest.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# The one tiny config (configs/model/tiny.yaml) with a 512-token vocabulary: tests build
# random-weight models from it (its `vocab_size: auto` is resolved from a tokenizer by the
# trainer; tests that need no tokenizer pin it here).
TINY_PARAMS = {**yaml.safe_load((ROOT / "configs" / "model" / "tiny.yaml").read_text()), "vocab_size": 512}


def tiny_params(**overrides) -> dict:
    return {**TINY_PARAMS, **overrides}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.08) -> torch.nn.Module:
    """Give every parameter (gates included) non-trivial random values, so equivalence
    tests exercise every branch. Norm weights stay near 1, gates in [0.3, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "gate" in leaf:
            p.copy_(0.3 + 0.6 * torch.rand(p.shape, generator=g))
        elif "norm" in name or "ln_" in name:
            p.copy_((1.0 if leaf == "weight" else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny_model(seed: int = 0, **overrides):
    import llama_vision

    torch.manual_seed(seed)
    model = llama_vision.build_model(tiny_params(**overrides))
    return randomize(model, seed).eval()


TINY_IMAGE_TOKEN = 512  # the <|image|> id of tiny_params' vocabulary


def tiny_inputs(seed: int = 0):
    """(tokens [1, 6] with one image placeholder, images [1, 1, 4, 3, 28, 28], aspect
    ratios [1, 1, 2] = a 1x3 grid): a forward pass's inputs for `tiny_model`."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(1, 1, 4, 3, 28, 28, generator=g)
    return torch.tensor([[TINY_IMAGE_TOKEN, 1, 5, 9, 33, 17]]), imgs, torch.tensor([[[1, 3]]])


def run_torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 240) -> None:
    """Run `script` under torchrun on CPU (gloo, loopback); fail with its output."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script.name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def make_shapes_corpus(root: Path, n_train: int = 64, n_test: int = 8, n_videos: int = 0) -> dict:
    """A small shapes-world dataset + a word-level SentencePiece tokenizer trained on its
    captions (what the tiny_* training configs expect)."""
    import tarfile

    from llama_vision.data.synthetic.shapes import generate_shapes_world
    from llama_vision.tokenizer import train_sentencepiece

    info = generate_shapes_world(root / "data", n_train_images=n_train, n_test_images=n_test,
                                 n_train_videos=n_videos, n_test_videos=min(n_videos, 4), seed=0, progress=False)
    caps = []
    for tar in sorted((root / "data" / "images").glob("train-*.tar")):
        with tarfile.open(tar) as t:
            caps += [t.extractfile(m).read().decode() for m in t.getmembers() if m.name.endswith(".txt")]
    tok = train_sentencepiece(caps + ["the red circle moves left. up down right green blue yellow square triangle"], root / "tokenizer.model", vocab_size=320, model_type="word")
    return {"root": root, "tokenizer": str(tok), "shards": str(root / "data" / "images" / "train-*.tar"), **info}


def tiny_train_overrides(corpus: dict, out: Path, **extra) -> list[str]:
    base = {
        "model": str(ROOT / "configs/model/tiny.yaml"),
        "tokenizer": corpus["tokenizer"],
        "output_dir": str(out),
        "data.paths": f'["{corpus["shards"]}"]',
        "tensorboard": "false",
        # Multi-process CPU tests stay on the CPU (gloo) on a machine with a GPU, too.
        "device": "cpu",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def randomize_hf_llava(hf, seed: int) -> None:
    """Non-trivial weights everywhere in a transformers LLaVA-family model (HF's init leaves
    biases at 0): norms ~1 + 0.1 N(0, 1), everything else 0.08 N(0, 1), seeded."""
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in hf.named_parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) if "norm" in name or "layrnorm" in name
                    else 0.08 * torch.randn(p.shape, generator=g))
