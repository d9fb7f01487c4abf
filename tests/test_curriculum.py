"""Training curricula (llama_vision/training/curriculum.py, tools/train.py on a file with
`stages:`): configs/train/tiny_onevision_curriculum.yaml's three stages on the tiny LLaVA
model, with data written here (shapes-world captions, single-image chats and multi-image
rows made from them). Each stage starts from the previous stage's final/ and trains only its
trainable set; a rerun skips finished stages and a changed stage retrains it and the stages
after it; a stage SIGKILLed midway continues from its checkpoint with --resume to the same
weights bitwise; bad curricula fail before anything trains, naming the stage; two gloo
processes (DP=2) run two stages and agree on what to skip.

Run as a script, this file is the torchrun worker of the DP=2 test."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import ROOT, run_torchrun

TINY = ROOT / "configs/train/tiny_onevision_curriculum.yaml"
STAGES = ("caption", "single_image", "onevision")


def _write_data(root: Path, corpus: dict) -> dict:
    """Single-image chats (sft.jsonl) and multi-image rows in LLaVA's JSON layout (two images
    each, one <image> tag per image) beside them."""
    from llama_vision.data.synthetic.chat_sets import write_chat_sets

    chat = write_chat_sets(root / "chat", n=16)
    rows = [json.loads(line) for line in Path(chat["sft"]).read_text().splitlines()]
    multi = [{"id": f"pair{i}", "image": [a["images"][0], b["images"][0]],
              "conversations": [{"from": "human", "value": "<image>\n<image>\nDescribe the shapes in the image."},
                                {"from": "gpt", "value": f'{a["messages"][1]["content"]} {b["messages"][1]["content"]}'}]}
             for i, (a, b) in enumerate(zip(rows, rows[1:] + rows[:1]))]
    (root / "chat" / "multi_image.json").write_text(json.dumps(multi))
    return {"tokenizer": corpus["tokenizer"], "shards": corpus["shards"], "sft": chat["sft"],
            "multi": str(root / "chat" / "multi_image.json")}


def _overrides(data: dict, out: Path, **extra) -> list[str]:
    """The tiny curriculum on this test's data, a few steps per stage."""
    sources = (f'[{{kind: conversations, paths: ["{data["sft"]}"]}}, '
               f'{{kind: llava_json, paths: ["{data["multi"]}"], weight: 1.0}}]')
    items = {
        "output_dir": str(out),
        "overrides.tokenizer": data["tokenizer"],
        "overrides.device": "cpu",
        "overrides.tensorboard": "false",
        "overrides.micro_batch_size": "2",
        "overrides.checkpoint_every": "2",
        "caption.max_steps": "3",
        "caption.data.paths": f'["{data["shards"]}"]',
        "single_image.max_steps": "4",
        "single_image.data.paths": f'["{data["sft"]}"]',
        "onevision.max_steps": "3",
        "onevision.data.sources": sources,
    }
    items.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in items.items()]


def _finals(out: Path, stages=STAGES) -> dict[str, dict[str, torch.Tensor]]:
    from llama_vision.checkpoint import load_meta_state_dict

    return {s: load_meta_state_dict(out / s / "final") for s in stages}


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "curriculum.json"}


def _statuses(out: Path) -> dict[str, str]:
    return {s["name"]: s["status"] for s in json.loads((out / "curriculum.json").read_text())["stages"]}


def _train_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli_curriculum", ROOT / "tools/train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.fixture(scope="module")
def data(shapes_corpus, tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("curriculum_data"), shapes_corpus)


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """The uninterrupted 3-stage run (through the CLI), each stage's starting weights and
    trainable names recorded as its Trainer starts fitting."""
    from llama_vision.training.trainer import Trainer

    out = tmp_path_factory.mktemp("curriculum") / "run"
    starts, trainable = {}, {}
    fit = Trainer.fit

    def recording_fit(self, resume=False):
        name = Path(self.cfg.output_dir).name
        starts[name] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        trainable[name] = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return fit(self, resume=resume)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "fit", recording_fit)
        _train_cli().main(["--config", str(TINY), *_overrides(data, out)])
    return {"out": out, "starts": starts, "trainable": trainable, "finals": _finals(out)}


def test_stages_chain_and_train_only_their_trainable_sets(base):
    out, starts, trainable, finals = base["out"], base["starts"], base["trainable"], base["finals"]
    assert _statuses(out) == {s: "trained" for s in STAGES}
    report = json.loads((out / "curriculum.json").read_text())["stages"]
    assert [(r["name"], r["output_dir"], r["steps"]) for r in report] == [
        ("caption", str(out / "caption"), 3), ("single_image", str(out / "single_image"), 4), ("onevision", str(out / "onevision"), 3)]
    assert all(r["wall_s"] > 0 for r in report)
    groups = {  # the trainable set of each stage, by parameter name
        "caption": ("vision_model.projector.", "text_model.learnable_embedding"),
        "single_image": ("vision_model.projector.", "vision_model.vision_encoder.", "text_model.learnable_embedding"),
        "onevision": ("vision_model.projector.", "text_model.", ),
    }
    for k, stage in enumerate(STAGES):
        start, final = starts[stage], finals[stage]
        assert trainable[stage] and all(n.startswith(groups[stage]) for n in trainable[stage]), stage
        if k:  # every weight, trained or frozen, starts as the previous stage's final/
            prev = finals[STAGES[k - 1]]
            assert start.keys() == prev.keys()
            assert all(torch.equal(start[n], prev[n]) for n in start), stage
        frozen = [n for n in final if n not in trainable[stage]]
        assert frozen and all(torch.equal(final[n], start[n]) for n in frozen), stage
        changed = {n for n in trainable[stage] if not torch.equal(final[n], start[n])}
        # everything that trains changed (the image placeholder's row is replaced by the image features)
        assert changed == trainable[stage] - {"text_model.learnable_embedding.weight"}, sorted(trainable[stage] - changed)
    # onevision freezes the tower single_image trained: it is single_image's, not the caption stage's
    tower = [n for n in finals["onevision"] if n.startswith("vision_model.vision_encoder.") and n in trainable["single_image"]]
    assert tower and "vision_model.vision_encoder.patch_embed.weight" in tower
    for n in tower:
        assert torch.equal(finals["onevision"][n], finals["single_image"][n])
        assert not torch.equal(finals["single_image"][n], finals["caption"][n]), n
    assert any(not torch.equal(finals["onevision"][n], finals["single_image"][n]) for n in finals["onevision"] if n.startswith("text_model.layers."))
    for stage in STAGES:
        stamp = json.loads((out / stage / "curriculum_done.json").read_text())
        assert stamp["stage"] == stage and stamp["config"]["output_dir"] == str(out / stage)
    assert json.loads((out / "single_image" / "curriculum_done.json").read_text())["config"]["init_from"] == str(out / "caption" / "final")


def test_rerun_skips_done_stages_and_a_changed_stage_retrains_it_and_the_next(base, data, tmp_path, monkeypatch):
    from llama_vision.training import curriculum

    out = tmp_path / "copy"  # a copied curriculum directory is still done
    shutil.copytree(base["out"], out)
    before = _file_hashes(out)
    ran = []
    real_train = curriculum.train
    monkeypatch.setattr(curriculum, "train", lambda cfg, resume=False: ran.append(Path(cfg.output_dir).name) or real_train(cfg, resume))
    curriculum.run_curriculum(curriculum.load_curriculum(TINY, _overrides(data, out)))
    assert ran == [] and _file_hashes(out) == before
    assert _statuses(out) == {s: "skipped (done)" for s in STAGES}

    curriculum.run_curriculum(curriculum.load_curriculum(TINY, _overrides(data, out, **{"single_image.optim.lr": 1e-3})))
    assert ran == ["single_image", "onevision"]
    assert _statuses(out) == {"caption": "skipped (done)", "single_image": "trained", "onevision": "trained"}
    after = _file_hashes(out)
    assert all(after[k] == v for k, v in before.items() if k.startswith("caption/"))
    finals = _finals(out)
    assert all(torch.equal(finals["caption"][n], t) for n, t in base["finals"]["caption"].items())
    w = "vision_model.projector.linear_1.weight"
    assert not torch.equal(finals["single_image"][w], base["finals"]["single_image"][w])
    assert not torch.equal(finals["onevision"][w], base["finals"]["onevision"][w])
    # the same command again: nothing to do
    ran.clear()
    curriculum.run_curriculum(curriculum.load_curriculum(TINY, _overrides(data, out, **{"single_image.optim.lr": 1e-3})))
    assert ran == []


KILL_AT = """
import os, runpy, signal, sys
import torch
torch.set_num_threads(int(os.environ["CURRICULUM_TEST_THREADS"]))  # the test process's: the same float sums
from llama_vision.training.trainer import Trainer
step = Trainer.train_step
def train_step(self, it):  # SIGKILL (no clean-up at all) in single_image, after its step-2 checkpoint
    if self.cfg.output_dir.endswith("single_image") and self.step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, it)
Trainer.train_step = train_step
sys.argv = ["tools/train.py", *sys.argv[1:]]
runpy.run_path("tools/train.py", run_name="__main__")
"""


def test_killed_stage_resumes_to_the_uninterrupted_weights(base, data, tmp_path):
    """Bitwise: CPU training is deterministic and a checkpoint holds everything the rest of
    the stage depends on (weights, AdamW state, schedule, data position, RNG); the stages
    after it start from their seed as in one uninterrupted process."""
    from llama_vision.training.metrics import read_metrics

    out = tmp_path / "killed"
    args = ["--config", str(TINY), *_overrides(data, out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CURRICULUM_TEST_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", KILL_AT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (out / "single_image" / "checkpoints" / "step_2").is_dir() and not (out / "single_image" / "final").exists()
    assert _statuses(out) == {"caption": "trained", "single_image": "running", "onevision": "pending"}

    _train_cli().main([*args, "--resume"])
    assert _statuses(out) == {"caption": "skipped (done)", "single_image": "resumed", "onevision": "trained"}
    assert [m["step"] for m in read_metrics(out / "single_image" / "metrics.jsonl")] == [1, 2, 3, 4]
    finals = _finals(out)
    for stage in STAGES:
        want = base["finals"][stage]
        assert finals[stage].keys() == want.keys()
        for n, t in want.items():
            assert torch.equal(finals[stage][n], t), (stage, n)


def test_bad_curricula_fail_before_training_and_name_the_stage(data, tmp_path, monkeypatch):
    from llama_vision.config import ConfigError
    from llama_vision.training import curriculum

    ran = []
    monkeypatch.setattr(curriculum, "train", lambda cfg, resume=False: ran.append(cfg))
    out = tmp_path / "bad"
    good = _overrides(data, out)
    cli = _train_cli()
    with pytest.raises(ConfigError, match=r"--stages: unknown stage\(s\) \['captoin'\]"):
        cli.main(["--config", str(TINY), *good, "--stages", "caption,captoin"])
    with pytest.raises(ConfigError, match=r"curriculum stage 'single_image' .*unknown config key 'optim.lrr'; did you mean 'optim.lr'"):
        curriculum.run_curriculum(curriculum.load_curriculum(TINY, [*good, "single_image.optim.lrr=1e-3"]))
    with pytest.raises(ConfigError, match=r"'singel_image' is neither a stage .*did you mean 'single_image'"):
        curriculum.load_curriculum(TINY, [*good, "singel_image.max_steps=2"])
    with pytest.raises(ConfigError, match=r"curriculum stage 'onevision' .*data.sources\[1\].paths: no file matches"):
        curriculum.run_curriculum(curriculum.load_curriculum(TINY, [*good, f'onevision.data.sources=[{{kind: llava_json, paths: ["{data["sft"]}"]}}, {{kind: llava_json, paths: ["{tmp_path}/nope.json"]}}]']))
    with pytest.raises(ConfigError, match=r"curriculum stage 'onevision' .*data.sources and data.paths are both set"):
        curriculum.run_curriculum(curriculum.load_curriculum(TINY, [*good, f'onevision.data.paths=["{data["sft"]}"]']))
    with pytest.raises(ConfigError, match=r"curriculum stage 'caption' .*`output_dir` is set by the curriculum"):
        curriculum.run_curriculum(curriculum.load_curriculum(TINY, [*good, "caption.output_dir=elsewhere"]))
    with pytest.raises(ConfigError, match=r"every stage must use the same `tp`"):
        curriculum.run_curriculum(curriculum.load_curriculum(TINY, [*good, "onevision.tp=2"]))
    with pytest.raises(ConfigError, match=r"stage 'onevision' starts from stage 'single_image''s final/ .*--stages single_image,onevision"):
        cli.main(["--config", str(TINY), *good, "--stages", "onevision"])
    with pytest.raises(ConfigError, match=r"--stages is for a curriculum config"):
        cli.main(["--config", str(ROOT / "configs/train/tiny_llava_sft.yaml"), "--stages", "a"])
    (out / "caption").mkdir(parents=True)  # someone else's directory is not emptied
    (out / "caption" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"curriculum stage 'caption' .*exists and was not written by a curriculum"):
        cli.main(["--config", str(TINY), *good])
    assert (out / "caption" / "notes.txt").read_text() == "mine"
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"output_dir: {out}\nstages:\n  - {{name: caption, config: {TINY.parent}/tiny_llava_pretrain.yaml}}\n"
                       "  - {name: sft, config: no_such_stage.yaml, overrides: {max_steps: 2}}\n")
    with pytest.raises(ConfigError, match=r"curriculum stage 'sft' \(.*no_such_stage.yaml\): config file not found"):
        curriculum.run_curriculum(curriculum.load_curriculum(missing))
    assert ran == [] and not (out / "curriculum.json").exists()


def test_two_processes_run_a_two_stage_curriculum_and_agree_to_skip_it(base, data, tmp_path):
    """DP=2 (gloo, ZeRO-1): both ranks run caption then single_image in one process (train()
    twice), then the same curriculum again, which every rank skips (rank 0's plan). With one
    sample per rank the global batch is the single-process run's: the same losses and weights
    (up to the order of float sums)."""
    from llama_vision.training.metrics import read_metrics

    out = tmp_path / "dp2"
    # zero1 here (FSDP on LLaVA models: tests/test_training_cluster.py)
    overrides = _overrides(data, out, **{"overrides.micro_batch_size": 1, "overrides.data_parallel": "zero1"})
    run_torchrun(Path(__file__), json.dumps(overrides), nproc=2, timeout=300)
    assert _statuses(out) == {"caption": "skipped (done)", "single_image": "skipped (done)", "onevision": "not selected"}
    assert json.loads((out / "dp2_worker.json").read_text()) == {"0": ["trained", "trained", "skipped (done)", "skipped (done)"],
                                                                "1": ["trained", "trained", "skipped (done)", "skipped (done)"]}
    finals = _finals(out, STAGES[:2])
    for stage in STAGES[:2]:
        want = [m["loss"] for m in read_metrics(base["out"] / stage / "metrics.jsonl")]
        got = [m["loss"] for m in read_metrics(out / stage / "metrics.jsonl")]
        assert got == pytest.approx(want, rel=1e-5, abs=0), stage
        for n, t in base["finals"][stage].items():
            # (a key bias gets no gradient -- softmax ignores a constant per query --, only
            # float noise, which AdamW scales up to lr-sized steps: not comparable)
            if not n.endswith("k_proj.bias"):
                _assert_close_up_to_adamw_noise(finals[stage][n], t, base["starts"][stage][n], f"{stage} {n}")


def _assert_close_up_to_adamw_noise(got: torch.Tensor, want: torch.Tensor, start: torch.Tensor, name: str) -> None:
    """Every element within 5e-5 of the single-process run, except a rare one whose gradient
    was near zero at some step: AdamW divides by sqrt(v), so a sum taken in another order
    (two ranks' halves all-reduced) moves it by a different lr-sized step. Those may be at
    most 0.5% of the tensor (one element at least) and stay within the run's largest
    update; a different data order or a wrong reduction moves most elements."""
    far = (got - want).abs() > 5e-5
    allowed = max(1, int(0.005 * want.numel()))
    assert int(far.sum()) <= allowed, f"{name}: {int(far.sum())} of {want.numel()} elements differ by > 5e-5"
    if far.any():
        largest_step = (want - start).abs().max()
        assert ((got - want).abs()[far] <= largest_step).all(), f"{name}: an element moved beyond the run's largest update"


def _dp_worker(overrides: list[str]) -> None:
    from llama_vision.training.curriculum import load_curriculum, run_curriculum

    cur = load_curriculum(TINY, overrides)
    seen = []
    for _ in range(2):
        seen += [s["status"] for s in run_curriculum(cur, only=["caption", "single_image"])[:2]]
    path = Path(cur.output_dir) / f"dp2_worker.{os.environ['RANK']}.json"
    path.write_text(json.dumps(seen))
    import model_parallel

    model_parallel.barrier()
    if os.environ["RANK"] == "0":
        merged = {r: json.loads((Path(cur.output_dir) / f"dp2_worker.{r}.json").read_text()) for r in ("0", "1")}
        (Path(cur.output_dir) / "dp2_worker.json").write_text(json.dumps(merged))


if __name__ == "__main__":
    _dp_worker(json.loads(sys.argv[1]))
