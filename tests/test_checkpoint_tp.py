"""Checkpoints at any tensor-parallel degree, for real: 2 CPU processes (gloo, loopback)
load 1-, 2- and 4-file Meta checkpoints, an HF dir and a text-only trunk at TP=2 and must
reproduce the TP=1 logits; each rank must open only the files holding its rows."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from _helpers import run_torchrun, tiny_model, tiny_params

import model_parallel as mp
from dist_checkpoint_worker import CASES, inputs
from llama_vision.checkpoint import init_from_text_checkpoint, load_model, save_hf_checkpoint, save_meta_checkpoint

WORKER = Path(__file__).resolve().parent / "dist_checkpoint_worker.py"
VISION_KEYS = {k: v for k, v in tiny_params().items() if k.startswith("vision_")}
TRUNK = ("tok_embeddings.", "layers.", "norm.", "output.")


def _write_text_only_dir(model, out: Path, num_shards: int) -> None:
    """The model's trunk as a Meta text-only dir (no vision keys, un-prefixed names)."""
    trunk = {k[len("text_model."):]: v for k, v in model.state_dict().items() if k[len("text_model."):].startswith(TRUNK)}
    plan = mp.shard_plan(model.text_model, "checkpoint")
    out.mkdir()
    for i, shard in enumerate(mp.split_state_dict(trunk, plan, num_shards)):
        torch.save({k: v.clone() for k, v in shard.items()}, out / f"consolidated.{i:02d}.pth")
    params = {k: v for k, v in tiny_params().items() if not k.startswith("vision_")}
    (out / "params.json").write_text(json.dumps(params))


@torch.no_grad()
def test_any_number_of_files_loads_at_tp1_and_tp2(tmp_path):
    model = tiny_model(seed=21)
    kv1 = tiny_model(seed=22, n_kv_heads=1)  # TP=2 > n_kv_heads: K/V held whole, stored split
    for n in (1, 2, 4):
        save_meta_checkpoint(model, model.args, tmp_path / f"ckpt{n}", num_shards=n)
    save_meta_checkpoint(kv1, kv1.args, tmp_path / "kv1_ckpt2", num_shards=2)
    save_hf_checkpoint(model, tmp_path / "hf", max_shard_bytes=250_000)
    _write_text_only_dir(model, tmp_path / "text2", num_shards=2)
    (tmp_path / "vision_keys.json").write_text(json.dumps(VISION_KEYS))

    want = model(*inputs())
    reference = {}
    for case, sub in CASES.items():
        if case.startswith("text"):
            reference[case] = init_from_text_checkpoint(tmp_path / sub, VISION_KEYS)(inputs()[0][:, 1:4])
        else:
            reference[case] = load_model(tmp_path / sub, tp=1)(*inputs())  # 2- and 4-file dirs at TP=1
    want_kv1 = kv1(*inputs())
    for case, got in reference.items():
        if case.startswith("text"):
            continue
        torch.testing.assert_close(got, want_kv1 if "kv_replicated" in case else want, atol=1e-5, rtol=0)
    # A text trunk with fresh (gate 0) adapters computes the donor's text logits.
    torch.testing.assert_close(reference["text_trunk_2_shards"], model(inputs()[0][:, 1:4]), atol=1e-5, rtol=0)
    torch.save(reference, tmp_path / "reference.pt")

    run_torchrun(WORKER, str(tmp_path), timeout=180)
    results = [json.loads((tmp_path / f"result.{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        rank = r["rank"]
        for case, diff in r["diff"].items():
            assert diff < 1e-5, (rank, case, diff)
        opened = r["opened"]
        assert opened["meta_1_shard"] == ["consolidated.00.pth"]
        assert opened["meta_2_shards"] == [f"consolidated.{rank:02d}.pth"]  # N == M: its own file only
        assert opened["meta_4_shards"] == [f"consolidated.{2 * rank + i:02d}.pth" for i in (0, 1)]
        assert opened["meta_2_shards_kv_replicated"] == ["consolidated.00.pth", "consolidated.01.pth"]
        assert opened["text_trunk_2_shards"] == [f"consolidated.{rank:02d}.pth"]
        assert r["saved_equal"] == {"meta_2_shards": True, "meta_2_shards_kv_replicated": True}, r
