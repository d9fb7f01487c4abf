"""Training at the shape of a cluster, on CPU (gloo, loopback): DP=2 and TP=2 resumes are
bitwise equal to uninterrupted runs (image and DPO stages), ranks that see different kinds
of micro-batches (text-only vs images, text-only vs a LLaVA model's clips) neither hang nor
diverge from one process on the union batch (parameters AND AdamW state), rank 0 alone picks the checkpoint to resume,
and tensor-parallel peers that read different data stop with a clear error. A LLaVA model
(CLIP tower + projector, llama_vision/model/llava.py) trains under FSDP (its tower's
blocks, tower and projector as units), ZeRO-1 and TP=2 (the tower replicated) as one
process does, and its FSDP checkpoint resumes at DP=2 and on one process.

One torchrun launch per family (DP=2, TP=2) runs every scenario of that family in order.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import ROOT, run_torchrun, tiny_train_overrides
from llama_vision.config import load_config
from llama_vision.data.synthetic.chat_sets import write_chat_sets
from llama_vision.training.metrics import read_metrics
from llama_vision.training.train_config import TrainConfig
from llama_vision.training.trainer import Trainer

CFG = ROOT / "configs" / "train"
PRETRAIN, DPO, SFT = (str(CFG / f"tiny_image_{s}.yaml") for s in ("pretrain", "dpo", "sft"))
LLAVA_PRETRAIN, LLAVA_SFT = (str(CFG / f"tiny_llava_{s}.yaml") for s in ("pretrain", "sft"))
# LLaVA-1.5's stage 2 trains the LLM too; the tiny SFT config's tower as well (all of it trains)
LLAVA_ALL = {"trainable": "{decoder: true, vision: true, adapters: true}"}
WORKER = Path(__file__).resolve().parent / "dist_train_scenarios.py"
STEPS = 6
COMMON = {"max_steps": STEPS, "checkpoint_every": 3, "keep_last": 5, "save_final": "false", "data.shuffle": "false",
          "optim.warmup_steps": 2, "init_from": "null"}


def _overrides(corpus, out, **extra):
    return tiny_train_overrides(corpus, out, **{**COMMON, **extra})


def _resume_runs(config: str, corpus, root: Path, name: str, **extra) -> list[dict]:
    """An uninterrupted run, and the same run stopped after step 3's checkpoint and resumed
    (rank 1 listing no checkpoint at all: rank 0's choice must be the one used)."""
    full, cut = root / f"{name}_full", root / f"{name}_resumed"
    return [
        {"config": config, "overrides": _overrides(corpus, full, **extra), "dump": str(full / "dump")},
        {"config": config, "overrides": _overrides(corpus, cut, **extra), "stop_after": 3},
        {"config": config, "overrides": _overrides(corpus, cut, **extra), "resume": True, "hide_checkpoints_on_rank": 1,
         "dump": str(cut / "dump")},
    ]


def _llava(chat, **extra) -> dict:
    """Overrides of a tiny LLaVA run on the shapes world's chat set (an image per row)."""
    return {"model": str(ROOT / "configs/model/tiny_llava.yaml"), "data.paths": f'["{chat["sft"]}"]', **extra}


def _fit(config: str, overrides: list[str]) -> Trainer:
    trainer = Trainer(load_config(TrainConfig, config, overrides))
    trainer.fit()
    return trainer


def _trained(trainer: Trainer) -> tuple[dict, dict]:
    """(trainable params, AdamW state) by name of a one-process trainer."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return ({n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad},
            {names[id(p)]: s for p, s in trainer.optimizer.state.items()})


def _assert_same_state(dump: dict, want: tuple[dict, dict], atol: float, skip: tuple[str, ...] = ()) -> None:
    params, state = want
    assert dump["params"].keys() == params.keys()
    for n, t in params.items():
        if not n.endswith(skip):
            torch.testing.assert_close(dump["params"][n], t, atol=atol, rtol=0, msg=n)
    assert dump["optim"].keys() == state.keys()
    for n, s in state.items():
        assert int(dump["optim"][n]["step"]) == int(s["step"]), n
        if not n.endswith(skip):
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(dump["optim"][n][k], s[k], atol=atol, rtol=0, msg=f"{n}.{k}")


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def _load_dump(path: Path, ranks: int = 2) -> list[dict]:
    return [torch.load(f"{path}.rank{r}.pt", weights_only=True) for r in range(ranks)]


def _assert_resume_bitwise(root: Path, name: str, ranks: int = 2) -> None:
    full, cut = root / f"{name}_full", root / f"{name}_resumed"
    rows_full, rows_cut = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in rows_cut] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows_cut] == [r["loss"] for r in rows_full]  # bitwise
    assert [r["lr"] for r in rows_cut] == [r["lr"] for r in rows_full]
    for a, b in zip(_load_dump(full / "dump", ranks), _load_dump(cut / "dump", ranks)):
        assert a["step"] == b["step"] == STEPS
        assert a["params"].keys() == b["params"].keys()
        for n in a["params"]:
            assert torch.equal(a["params"][n], b["params"][n]), n
        assert a["optim"].keys() == b["optim"].keys()
        for n in a["optim"]:
            for k in a["optim"][n]:
                assert torch.equal(a["optim"][n][k], b["optim"][n][k]), (n, k)


@pytest.fixture(scope="module")
def chat(shapes_corpus, tmp_path_factory):
    """Shapes-world SFT/DPO sets, plus an SFT manifest whose rows go to the two DP ranks as
    (step 1) image | text, (step 2) text | image, (step 3) text | text, (step 4) image | image."""
    root = tmp_path_factory.mktemp("cluster_chat")
    sets = write_chat_sets(root, n=16)
    rows = [json.loads(line) for line in Path(sets["sft"]).read_text().splitlines()]
    text_only = {"messages": [{"role": "user", "content": "Describe the shapes."},
                              {"role": "assistant", "content": "a red circle at the top left."}]}
    kinds = ["image", "text", "text", "image", "text", "text", "image", "image"]
    mixed = [rows[i] if k == "image" else text_only for i, k in enumerate(kinds)]
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return {**sets, "mixed": str(root / "mixed.jsonl")}


def _mixed_overrides(corpus, chat, out, micro_batch_size, **extra):
    return tiny_train_overrides(corpus, out, **{
        "max_steps": 4, "checkpoint_every": 100, "save_final": "false", "data.shuffle": "false", "init_from": "null",
        "optim.warmup_steps": 1, "micro_batch_size": micro_batch_size, "data.paths": f'["{chat["mixed"]}"]',
        "data.image_root": str(Path(chat["mixed"]).parent), **extra})


# The mixed set on a tiny LLaVA model, everything training (its dummy image under FSDP goes
# through the tower and projector into the decoder's input with weight 0: media_sync).
LLAVA_MIXED = {"model": str(ROOT / "configs/model/tiny_llava.yaml"), **LLAVA_ALL}


@pytest.fixture(scope="module")
def video_mixed(tmp_path_factory):
    """A tiny LLaVA model with the projector video modality (model.yaml) and a clip manifest
    whose rows go to the two DP ranks as video | text, text | video, text | text, video |
    video (a text row: no clip), like `chat`'s mixed set."""
    import yaml

    from llama_vision.data.synthetic.shapes import draw_motion_video, write_mp4

    root = tmp_path_factory.mktemp("cluster_video")
    params = yaml.safe_load((ROOT / "configs/model/tiny_llava.yaml").read_text())
    params["llava"]["video"] = {"pool": "bilinear2x", "num_frames": 2}
    (root / "model.yaml").write_text(yaml.safe_dump(params))
    rows = []
    for i, kind in enumerate(["video", "text", "text", "video", "text", "text", "video", "video"]):
        direction = ("left", "up", "right", "down")[i % 4]
        if kind == "video":
            write_mp4(draw_motion_video(np.random.default_rng(i), direction, num_frames=4, size=(32, 32)), root / f"c{i}.mp4")
            rows.append({"video": f"c{i}.mp4", "caption": f"the red circle moves {direction}."})
        else:
            rows.append({"caption": "a red circle at the top left."})
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(root / "model.yaml"), "data": str(root / "mixed.jsonl")}


def _video_mixed_overrides(corpus, video_mixed, out, micro_batch_size):
    return tiny_train_overrides(corpus, out, **{
        "max_steps": 4, "checkpoint_every": 100, "save_final": "false", "data.shuffle": "false", "init_from": "null",
        "optim.warmup_steps": 1, "micro_batch_size": micro_batch_size, "model": video_mixed["model"],
        "data.kind": "video_jsonl", "data.paths": f'["{video_mixed["data"]}"]', "data.max_seq_len": 48,
        "video.num_frames": 2, **LLAVA_ALL})


def test_data_parallel_family(shapes_corpus, chat, video_mixed, tmp_path):
    """DP=2 (FSDP, the default, and ZeRO-1): image-stage and DPO resumes bitwise; mixed
    text-only / image micro-batches equal one process on the union batch, parameters and
    optimizer state; a LLaVA model likewise (`_assert_llava_data_parallel`)."""
    dpo = {"data.paths": f'["{chat["dpo"]}"]', "micro_batch_size": 2}
    runs = _resume_runs(PRETRAIN, shapes_corpus, tmp_path, "image", micro_batch_size=4)
    runs += _resume_runs(PRETRAIN, shapes_corpus, tmp_path, "image_zero1", micro_batch_size=4, data_parallel="zero1")
    runs += _resume_runs(DPO, shapes_corpus, tmp_path, "dpo", **dpo)
    for mode in ("fsdp", "zero1"):
        runs.append({"config": SFT, "overrides": _mixed_overrides(shapes_corpus, chat, tmp_path / f"mixed_{mode}", 1) + [f"data_parallel={mode}"],
                     "dump": str(tmp_path / f"mixed_{mode}" / "dump")})
    runs.append({"config": LLAVA_SFT, "overrides": _mixed_overrides(shapes_corpus, chat, tmp_path / "llava_mixed", 1, **LLAVA_MIXED),
                 "dump": str(tmp_path / "llava_mixed" / "dump")})
    runs.append({"config": LLAVA_PRETRAIN, "overrides": _video_mixed_overrides(shapes_corpus, video_mixed, tmp_path / "llava_video_mixed", 1),
                 "dump": str(tmp_path / "llava_video_mixed" / "dump")})
    validation = {"max_steps": 2, "eval_every": 2, "data.eval_paths": f'["{shapes_corpus["shards"]}"]'}
    runs.append({"config": PRETRAIN, "overrides": _overrides(shapes_corpus, tmp_path / "val_dp2", micro_batch_size=4, **validation)})
    # LLaVA (FSDP): stage 1 (only the projector trains, decoder and tower frozen) resumed at
    # DP=2, and under ZeRO-1; everything training (decoder, tower, projector) with every
    # activation-checkpointing switch on. (Text-only rows beside image rows: llava_mixed.)
    runs += _resume_runs(LLAVA_PRETRAIN, shapes_corpus, tmp_path, "llava", **_llava(chat, micro_batch_size=2))
    runs.append({"config": LLAVA_PRETRAIN, "overrides": _overrides(shapes_corpus, tmp_path / "llava_zero1", **_llava(
        chat, micro_batch_size=2, data_parallel="zero1")), "dump": str(tmp_path / "llava_zero1" / "dump")})
    runs.append({"config": LLAVA_SFT, "overrides": _overrides(shapes_corpus, tmp_path / "llava_sft", **_llava(
        chat, micro_batch_size=2, activation_checkpointing="true", **LLAVA_ALL)), "dump": str(tmp_path / "llava_sft" / "dump")})
    run_torchrun(WORKER, json.dumps(runs), timeout=400)

    # Validation covers every held-out token of both ranks: DP=2 == one process.
    Trainer(load_config(TrainConfig, PRETRAIN, _overrides(shapes_corpus, tmp_path / "val_dp1", micro_batch_size=8, **validation))).fit()
    v1, v2 = (read_metrics(tmp_path / d / "metrics.jsonl")[-1] for d in ("val_dp1", "val_dp2"))
    assert v2["val_targets"] == v1["val_targets"] > 0
    assert v2["val_loss"] == pytest.approx(v1["val_loss"], abs=1e-5)
    assert v2["val_token_accuracy"] == pytest.approx(v1["val_token_accuracy"], abs=1.5 / v1["val_targets"])

    _assert_resume_bitwise(tmp_path, "image")
    _assert_resume_bitwise(tmp_path, "image_zero1")
    _assert_resume_bitwise(tmp_path, "dpo")
    # reward_margin is the mean over ALL ranks' pairs: one process on the union batch
    # (micro-batch 4 = both ranks' 2) logs the same values.
    dpo_one = tmp_path / "dpo_dp1"
    Trainer(load_config(TrainConfig, DPO, _overrides(shapes_corpus, dpo_one, **{**dpo, "micro_batch_size": 4}))).fit()
    rows_dp1, rows_dp2 = read_metrics(dpo_one / "metrics.jsonl"), read_metrics(tmp_path / "dpo_full" / "metrics.jsonl")
    assert any(abs(r["reward_margin"]) > 1e-4 for r in rows_dp1)
    for r1, r2 in zip(rows_dp1, rows_dp2):
        assert r2["reward_margin"] == pytest.approx(r1["reward_margin"], abs=1e-5, rel=1e-4)
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-5)

    # One process, micro-batch 2 = both ranks' rows: the union batch.
    one = Trainer(load_config(TrainConfig, SFT, _mixed_overrides(shapes_corpus, chat, tmp_path / "mixed_dp1", 2)))
    one.fit()
    names = {id(p): n for n, p in one.model.named_parameters()}
    want_state = {names[id(p)]: s for p, s in one.optimizer.state.items()}
    want_params = {n: p.detach() for n, p in one.model.named_parameters() if p.requires_grad}
    # Step 3 is text-only everywhere: the vision encoder has no gradient then, so its AdamW
    # step count is 3 after 4 steps, not 4 (it must not have been moved or decayed at step 3).
    steps = {int(s["step"]) for n, s in want_state.items() if n.startswith("vision_model.vision_encoder.")}
    assert steps == {3}, steps
    for mode in ("fsdp", "zero1"):
        ranks = _load_dump(tmp_path / f"mixed_{mode}" / "dump")
        for r in ranks:
            for n, t in want_params.items():
                torch.testing.assert_close(r["params"][n], t, atol=1e-6, rtol=0, msg=f"{mode}: {n}")
        got_state = {**ranks[0]["optim"], **ranks[1]["optim"]}  # ZeRO-1: each rank owns a shard
        assert got_state.keys() == want_state.keys()
        for n, s in want_state.items():
            assert int(got_state[n]["step"]) == int(s["step"]), n
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(got_state[n][k], s[k], atol=1e-6, rtol=0, msg=f"{mode}: {n}.{k}")
        # FSDP: each rank holds half of every tensor, the frozen trunk included, and half
        # of AdamW's moments (ZeRO-1: each rank the moments of the parameters it owns).
        for r in ranks:
            held, whole = r["optim_numel"]
            assert 0 < held <= (0.55 if mode == "fsdp" else 0.75) * sum(2 * t.numel() for t in want_params.values())
            if mode == "fsdp":
                assert held <= 0.55 * whole
                frozen = [(local, whole) for local, whole, trains in r["numel"].values() if not trains]
                assert sum(local for local, _ in frozen) <= 0.51 * sum(whole for _, whole in frozen)

    # LLaVA under FSDP, ranks with text-only and image micro-batches: == one process.
    one = _fit(LLAVA_SFT, _mixed_overrides(shapes_corpus, chat, tmp_path / "llava_mixed_dp1", 2, **LLAVA_MIXED))
    want_params, want_state = _trained(one)
    assert {int(s["step"]) for n, s in want_state.items() if n.startswith("vision_model.vision_encoder.")} == {3}
    assert _losses(tmp_path / "llava_mixed") == pytest.approx(_losses(tmp_path / "llava_mixed_dp1"), rel=1e-5, abs=0)
    _assert_same_state(_load_dump(tmp_path / "llava_mixed" / "dump")[0], (want_params, want_state), atol=2e-5,
                       skip=("k_proj.bias",))
    # ... and with clips (the projector video path): the text rank's blank frame (media_sync).
    one = _fit(LLAVA_PRETRAIN, _video_mixed_overrides(shapes_corpus, video_mixed, tmp_path / "llava_video_mixed_dp1", 2))
    want_params, want_state = _trained(one)
    assert {int(s["step"]) for n, s in want_state.items() if n.startswith("vision_model.vision_encoder.")} == {3}
    assert _losses(tmp_path / "llava_video_mixed") == pytest.approx(_losses(tmp_path / "llava_video_mixed_dp1"), rel=1e-5,
                                                                    abs=0)
    _assert_same_state(_load_dump(tmp_path / "llava_video_mixed" / "dump")[0], (want_params, want_state), atol=2e-5,
                       skip=("k_proj.bias",))

    _assert_llava_data_parallel(shapes_corpus, chat, tmp_path)


def _assert_llava_data_parallel(corpus, chat, root: Path) -> None:
    """The LLaVA scenarios of the DP family: DP=2 (FSDP, ZeRO-1) equals one process on the
    same global batch, losses (1e-5 relative), parameters and AdamW state; the FSDP run
    stopped at step 3 resumes bitwise at DP=2 and, on one process, equals the
    uninterrupted one-process run; rank 0's FSDP shards are the planner's bytes."""
    from llama_vision.training.memory_plan import plan_memory

    _assert_resume_bitwise(root, "llava")
    one = _fit(LLAVA_PRETRAIN, _overrides(corpus, root / "llava_dp1", **_llava(chat, micro_batch_size=4)))
    want = _trained(one)
    assert want[0] and all(n.startswith(("vision_model.projector.", "text_model.learnable_embedding.")) for n in want[0])
    for name in ("llava_full", "llava_zero1"):
        assert _losses(root / name) == pytest.approx(_losses(root / "llava_dp1"), rel=1e-5, abs=0), name
        ranks = _load_dump(root / name / "dump")
        for r in ranks:
            assert r["params"].keys() == want[0].keys()
        state = {**ranks[0]["optim"], **ranks[1]["optim"]}  # ZeRO-1: each rank owns a part
        _assert_same_state({"params": ranks[0]["params"], "optim": state}, want, atol=1e-6)

    # The FSDP DP=2 checkpoint of step 3 on one process: DCP re-cuts the shards.
    resumed = _fit(LLAVA_PRETRAIN, _overrides(corpus, root / "llava_dp1_resumed", **_llava(
        chat, micro_batch_size=4, resume_from=str(root / "llava_full" / "checkpoints" / "step_3"))))
    assert [r["step"] for r in read_metrics(root / "llava_dp1_resumed" / "metrics.jsonl")] == [4, 5, 6]
    assert _losses(root / "llava_dp1_resumed") == pytest.approx(_losses(root / "llava_dp1")[3:], rel=1e-5, abs=0)
    params, state = _trained(resumed)
    _assert_same_state({"params": params, "optim": state}, want, atol=1e-6)

    # rank 0's FSDP shards (float32 on the CPU) are what the planner gives at DP=2.
    cfg = load_config(TrainConfig, LLAVA_PRETRAIN, _overrides(corpus, root / "llava_full", **_llava(chat, micro_batch_size=2)))
    plan = plan_memory(cfg, gpus=2, device="cpu")
    rank0 = _load_dump(root / "llava_full" / "dump")[0]
    assert plan.trainable_weights == 4 * sum(local for local, _, trains in rank0["numel"].values() if trains)
    assert plan.frozen_weights == 4 * sum(local for local, _, trains in rank0["numel"].values() if not trains)
    assert plan.grads == plan.trainable_weights
    assert plan.optimizer == 4 * rank0["optim_numel"][0] + 4 * len(rank0["optim"])  # moments + a step counter each

    # Everything trains: DP=2 FSDP with activation checkpointing (decoder layers and tower
    # blocks recomputed) equals one process without it.
    sft = _fit(LLAVA_SFT, _overrides(corpus, root / "llava_sft_dp1", **_llava(chat, micro_batch_size=4, **LLAVA_ALL)))
    want = _trained(sft)
    assert any(n.startswith("text_model.layers.") for n in want[0]) and any(".vision_encoder.blocks." in n for n in want[0])
    assert _losses(root / "llava_sft") == pytest.approx(_losses(root / "llava_sft_dp1"), rel=1e-5, abs=0)
    # (a key bias gets no gradient -- softmax ignores a constant per query --, only float
    # noise, which AdamW scales up to lr-sized steps: not comparable)
    _assert_same_state(_load_dump(root / "llava_sft" / "dump")[0], want, atol=2e-5, skip=("k_proj.bias",))


def test_tensor_parallel_family(shapes_corpus, chat, tmp_path, shared_dir):
    """TP=2 (real Llama 3 vocabulary: it splits evenly): image-stage and DPO resumes
    bitwise; a TP peer that lost a batch stops the run with an error naming it; a LLaVA
    model (tower and projector replicated) equals TP=1."""
    llama = {"tokenizer": str(shared_dir / "reference" / "tokenizer.model"), "tp": 2}
    runs = _resume_runs(PRETRAIN, shapes_corpus, tmp_path, "image", micro_batch_size=2, peak_flops_per_device=1e12, **llama)
    runs += _resume_runs(DPO, shapes_corpus, tmp_path, "dpo", micro_batch_size=1, **{"data.paths": f'["{chat["dpo"]}"]'}, **llama)
    desync = tmp_path / "desync"
    runs.append({"config": PRETRAIN, "overrides": _overrides(shapes_corpus, desync, micro_batch_size=2, **llama),
                 "drop_first_batch_on_rank": 1, "expect_error": "tensor-parallel ranks [1]", "dump": str(desync / "err")})
    # A LLaVA model, everything training: the decoder TP-split, the tower and projector replicated.
    llava_tp2 = tmp_path / "llava_tp2"
    runs.append({"config": LLAVA_SFT, "overrides": _overrides(shapes_corpus, llava_tp2, **_llava(
        chat, micro_batch_size=2, max_steps=3, **LLAVA_ALL, **llama)), "dump": str(llava_tp2 / "dump")})
    run_torchrun(WORKER, json.dumps(runs), timeout=400)

    _assert_resume_bitwise(tmp_path, "image")
    _assert_resume_bitwise(tmp_path, "dpo")
    # MFU is one GPU's share of the replica's FLOPs over its peak: at TP=2 a GPU does half
    # of what the single TP=1 GPU does on the same batches, and MFU follows from it.
    one = tmp_path / "image_tp1"
    Trainer(load_config(TrainConfig, PRETRAIN, _overrides(shapes_corpus, one, micro_batch_size=2, peak_flops_per_device=1e12,
                                                          tokenizer=llama["tokenizer"]))).fit()
    rows_tp1, rows_tp2 = read_metrics(one / "metrics.jsonl"), read_metrics(tmp_path / "image_full" / "metrics.jsonl")
    assert [r["loss"] for r in rows_tp2] == pytest.approx([r["loss"] for r in rows_tp1], abs=1e-4)  # same batches
    for r1, r2 in zip(rows_tp1, rows_tp2):
        assert r2["flops_per_gpu"] == r1["flops_per_gpu"] / 2 > 0
        for r in (r1, r2):
            assert r["mfu"] == pytest.approx(r["flops_per_s"] / 1e12, rel=1e-12)
    for rows in (rows_tp1, rows_tp2):  # the first window is one step: its FLOPs over its time
        assert rows[0]["flops_per_s"] == pytest.approx(rows[0]["flops_per_gpu"] / rows[0]["step_time_s"], rel=1e-9)

    for r in range(2):
        message = Path(f"{desync / 'err'}.rank{r}.error").read_text()
        assert "step 1" in message and "hold different data than TP rank 0" in message
    assert not (desync / "checkpoints").exists() or not any((desync / "checkpoints").glob("step_*"))

    # LLaVA at TP=2 = TP=1 on the same batches; the replicated tower and projector stay
    # bitwise equal on both TP ranks.
    tp1 = {k: v for k, v in llama.items() if k != "tp"}
    llava_one = _fit(LLAVA_SFT, _overrides(shapes_corpus, tmp_path / "llava_tp1", **_llava(chat, micro_batch_size=2, max_steps=3,
                                                                                      **LLAVA_ALL, **tp1)))
    assert _losses(llava_tp2) == pytest.approx(_losses(tmp_path / "llava_tp1"), rel=1e-5, abs=0)
    ranks = _load_dump(llava_tp2 / "dump")
    replicated = [n for n in ranks[0]["params"] if n.startswith("vision_model.")]
    assert any(".vision_encoder.blocks." in n for n in replicated) and any(".projector." in n for n in replicated)
    for n in replicated:
        assert torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]), n
        if not n.endswith("k_proj.bias"):  # (no gradient, only float noise: see the DP family)
            torch.testing.assert_close(ranks[0]["params"][n], llava_one.model.get_parameter(n).detach(), atol=2e-5, rtol=0, msg=n)
