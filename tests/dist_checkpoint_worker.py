"""Run under torchrun (2 processes, gloo): checkpoints saved with 1, 2 or 4 files (and in
HF format) load at TP=2 to the TP=1 logits; each rank opens only the files it needs; a
TP=2 model saves the same files as a single-process 2-shard save.

argv: WORK_DIR (prepared by test_checkpoint_tp.py: one dir per case + reference.pt).
Writes WORK_DIR/result.RANK.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_parallel as mp  # noqa: E402
from llama_vision.checkpoint import init_from_text_checkpoint, load_model, save_meta_checkpoint  # noqa: E402
from llama_vision.checkpoint import meta as meta_mod  # noqa: E402

IMG = 512
# case -> (checkpoint dir, how it is loaded)
CASES = {
    "meta_1_shard": "ckpt1",
    "meta_2_shards": "ckpt2",
    "meta_4_shards": "ckpt4",
    "meta_2_shards_kv_replicated": "kv1_ckpt2",
    "hf": "hf",
    "text_trunk_2_shards": "text2",
}


def inputs():
    """The same prompt (two images, multi-tile) in the test process and in every rank."""
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(1, 2, 4, 3, 28, 28, generator=g)
    return torch.tensor([[IMG, 1, 2, 3, IMG, 4, 5, 6]]), imgs, torch.tensor([[[1, 3], [2, 2]]])


@torch.no_grad()
def logits(case: str, path: Path, vision_keys: dict) -> torch.Tensor:
    if case.startswith("text"):
        return init_from_text_checkpoint(path, vision_keys)(inputs()[0][:, 1:4])
    return load_model(path, tp=2)(*inputs())


def main(work: Path) -> None:
    mp.init_model_parallel(2, backend="gloo")
    rank = mp.tp_rank()
    reference = torch.load(work / "reference.pt", weights_only=True)
    vision_keys = json.loads((work / "vision_keys.json").read_text())
    opened: list[str] = []
    real = meta_mod.load_tensor_file
    meta_mod.load_tensor_file = lambda p, **kw: opened.append(Path(p).name) or real(p, **kw)
    result = {"rank": rank, "diff": {}, "opened": {}, "saved_equal": {}}
    for case, sub in CASES.items():
        opened.clear()
        got = logits(case, work / sub, vision_keys)
        result["diff"][case] = float((got - reference[case]).abs().max())
        result["opened"][case] = sorted(set(opened))
    for case, sub in (("meta_2_shards", "ckpt2"), ("meta_2_shards_kv_replicated", "kv1_ckpt2")):
        model = load_model(work / sub, tp=2)
        out = work / f"saved_tp2_{sub}"
        save_meta_checkpoint(model, out, tp_rank=rank, tp_world=2)
        mp.barrier()
        ok = (out / "params.json").is_file()
        for i in range(2):
            a = torch.load(out / f"consolidated.{i:02d}.pth", weights_only=True)
            b = torch.load(work / sub / f"consolidated.{i:02d}.pth", weights_only=True)
            ok = ok and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        result["saved_equal"][case] = ok
        mp.barrier()
    (work / f"result.{rank}.json").write_text(json.dumps(result))
    mp.destroy_model_parallel()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
