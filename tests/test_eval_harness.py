"""The evaluation harness end to end (tools/eval.py, llama_vision/eval/runner.py) with a
checkpoint that really answers (tests/_eval_fixture.py: trained here to name a shape's
colour in images and in videos), on fixtures in the benchmarks' real layouts: VQAv2's and
DocVQA's official JSON, ChartQA's JSON, AI2D as lmms-lab's parquet, and the generic video
multiple-choice JSONL. Predictions are compared per id with Generator's own answers (a
runner that paired predictions with the wrong references would score ~chance and differ),
1 process vs torchrun x 2 (same results), and a killed run resumes without redoing work.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from _eval_fixture import QUESTION
from _helpers import ROOT

TASKS = "vqav2,docvqa,chartqa,ai2d,video_mc"
# The fixture model was trained on QUESTION in the chat format, answers one word, and its
# video adapters on raw <|video|><|begin_of_text|> captions.
OVERRIDES = ["prompt={question}", "max_new_tokens=4", "video_mc.chat=false", "video_mc.prompt=",
             "ai2d.answer_extraction=none"]


@pytest.fixture(scope="session")
def task_data(colour_model, tmp_path_factory) -> dict:
    """DATA_ROOT with one fixture per task, each holding one unreadable image (or video)."""
    ckpt, world = colour_model
    src = Path(world["root"])
    root = tmp_path_factory.mktemp("eval_data")
    rows = world["test"]
    image = lambda r: Image.open(src / r["image"]).convert("RGB")  # noqa: E731

    # VQAv2, official files: questions + annotations (10 answers each) + COCO-named images.
    (root / "vqa/val2014").mkdir(parents=True)
    questions, annotations = [], []
    for i, r in enumerate(rows):
        if i != 3:  # image 3 is missing on disk
            image(r).save(root / f"vqa/val2014/COCO_val2014_{i:012d}.jpg", quality=95)
        questions.append({"image_id": i, "question": QUESTION, "question_id": 1000 + i})
        annotations.append({"question_id": 1000 + i, "image_id": i, "question_type": "what color", "answer_type": "other",
                            "multiple_choice_answer": r["answers"][0],
                            "answers": [{"answer": r["answers"][0], "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]})
    (root / "vqa/questions.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (root / "vqa/annotations.json").write_text(json.dumps({"annotations": annotations}))

    # DocVQA, official JSON; one corrupt image file.
    (root / "docvqa/documents").mkdir(parents=True)
    data = []
    for i, r in enumerate(rows[:12]):
        path = root / f"docvqa/documents/d{i}.png"
        if i == 5:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        else:
            image(r).save(path)
        data.append({"questionId": 50 + i, "question": QUESTION, "image": f"documents/d{i}.png", "docId": i, "answers": r["answers"]})
    (root / "docvqa/val.json").write_text(json.dumps({"dataset_name": "docvqa", "dataset_split": "val", "data": data}))

    # ChartQA, official JSON (test_human.json) + png/.
    (root / "chartqa/test/png").mkdir(parents=True)
    for i, r in enumerate(rows[:10]):
        image(r).save(root / f"chartqa/test/png/c{i}.png")
    (root / "chartqa/test/test_human.json").write_text(json.dumps([{"imgname": f"c{i}.png", "query": QUESTION, "label": r["answers"][0]} for i, r in enumerate(rows[:10])]))

    # AI2D as lmms-lab/ai2d's parquet: question, options, answer (an index string), image struct.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llama_vision.data.synthetic.shapes import COLOURS

    colours = list(COLOURS)
    images = []
    for r in rows[:12]:
        buf = io.BytesIO()
        image(r).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    table = pa.table({"question": [QUESTION] * 12, "options": [colours] * 12,
                      "answer": [str(colours.index(r["answers"][0])) for r in rows[:12]], "image": images})
    (root / "ai2d/data").mkdir(parents=True)
    pq.write_table(table, root / "ai2d/data/test-00000-of-00001.parquet")

    # Generic video multiple choice; one clip missing.
    lines = [{"id": f"v{i}", "video": str(src / c["video"]) if i != 2 else str(src / "videos/absent.mp4"), "question": "",
              "choices": colours, "answer": colours.index(c["caption"])} for i, c in enumerate(world["test_videos"])]
    (root / "video_mc").mkdir()
    (root / "video_mc/test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    data_overrides = [
        "vqav2.data={format: vqav2_json, questions: vqa/questions.json, annotations: vqa/annotations.json, images: vqa/val2014}",
        "docvqa.data={format: docvqa_json, path: docvqa/val.json}",
        "chartqa.data={format: chartqa_json, files: [chartqa/test/test_human.json]}",
    ]
    return {"root": root, "ckpt": ckpt, "overrides": data_overrides + OVERRIDES, "n": {"vqav2": 24, "docvqa": 12, "chartqa": 10, "ai2d": 12, "video_mc": 10}}


def _eval_cmd(task_data, out: Path, *extra: str) -> list[str]:
    return ["tools/eval.py", "--ckpt", str(task_data["ckpt"]), "--tasks", TASKS, "--data-root", str(task_data["root"]),
            "--output-dir", str(out), "--dtype", "fp32", "--device", "cpu", "--batch-size", "4", *extra, *task_data["overrides"]]


def _run(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _predictions(out: Path, task: str) -> list[dict]:
    return [json.loads(x) for x in (out / task / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def one_process_run(task_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    _run(_eval_cmd(task_data, out))
    return out


def test_cli_scores_every_task_and_matches_generator_per_id(task_data, one_process_run):
    from llama_vision import inference
    from llama_vision.eval.readers import load_images, read_samples
    from llama_vision.eval.tasks import load_tasks, reader_spec, render_prompt
    from llama_vision.model.video import VideoConfig, video_inputs_from_paths

    out = one_process_run
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == set(TASKS.split(","))
    for name, n in task_data["n"].items():
        r = results["tasks"][name]
        assert r["n"] + r["n_skipped"] == n, (name, r)
        assert len(_predictions(out, name)) == n
    # The unreadable media are counted per task, with their reason, not a crash.
    assert results["tasks"]["vqav2"]["n_skipped"] == 1 and results["tasks"]["docvqa"]["n_skipped"] == 1
    assert results["tasks"]["video_mc"]["n_skipped"] == 1 and results["tasks"]["chartqa"]["n_skipped"] == 0
    assert "ImageLoadError" in results["tasks"]["docvqa"]["skipped"]
    # A model that answers: far above the 4-colour chance (0.25); its video adapters less so.
    for name in ("vqav2", "docvqa", "chartqa", "ai2d"):
        assert results["tasks"][name]["score"] >= 0.9, (name, results["tasks"][name]["score"])
    assert results["tasks"]["video_mc"]["score"] >= 0.5
    assert results["run"]["dtype"] == "fp32" and results["tasks"]["vqav2"]["config"]["metric"] == "vqa_accuracy_lmms_eval"
    table = (out / "results.md").read_text()
    assert "| vqav2 | vqa_accuracy_lmms_eval |" in table

    # Per id, the harness's prediction is what Generator answers for that sample alone.
    gen = inference.setup(str(task_data["ckpt"]), dtype="fp32", device="cpu")
    tasks = load_tasks(TASKS.split(","), ROOT / "configs/eval", task_data["overrides"])
    model = gen.model
    for task in tasks:
        samples = {s.id: s for s in read_samples(reader_spec(task), task_data["root"])}
        for rec in _predictions(out, task.name):
            if "skipped" in rec:
                continue
            s = samples[rec["id"]]
            assert rec["references"] == s.answers
            if s.video:
                ids = inference.prompt_tokens(gen, "", 1, raw=True, placeholder=model.modalities["video"].token_id)
                media = {"video": video_inputs_from_paths([[s.video]], VideoConfig(**model.args.video), model.args.vision_chunk_size)}
                new = gen.generate_from_tensors([ids], media_inputs=media, max_new_tokens=4)[0]
            else:
                ids = inference.prompt_tokens(gen, render_prompt(task, s), 1, raw=False)
                new = gen.generate([ids], [load_images(s)], max_new_tokens=4)[0]
            assert rec["raw_prediction"] == gen.tokenizer.decode(new), (task.name, rec["id"])


def test_torchrun_two_processes_gives_the_same_results(task_data, one_process_run, tmp_path):
    out = tmp_path / "dp2"
    _run(_eval_cmd(task_data, out), nproc=2)
    one = json.loads((one_process_run / "results.json").read_text())
    two = json.loads((out / "results.json").read_text())
    assert two["run"]["data_parallel"] == 2
    for name in TASKS.split(","):
        for key in ("score", "n", "n_skipped", "skipped"):
            assert two["tasks"][name][key] == one["tasks"][name][key], (name, key)
        assert _predictions(out, name) == _predictions(one_process_run, name)
    assert not list(out.glob("*/partial.rank*.jsonl"))  # merged and removed


class _KilledAfter:
    """A Generator stand-in that dies (like a killed process) after `n` generate calls."""

    def __init__(self, gen, n: int | None):
        self.gen, self.n, self.calls = gen, n, 0
        self.model, self.tokenizer, self.device = gen.model, gen.tokenizer, gen.device

    def generate(self, *a, **kw):
        if self.n is not None and self.calls >= self.n:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.gen.generate(*a, **kw)


def test_a_killed_run_resumes_where_it_stopped(task_data, one_process_run, tmp_path):
    from llama_vision import inference
    from llama_vision.eval.runner import evaluate
    from llama_vision.eval.tasks import load_tasks

    gen = inference.setup(str(task_data["ckpt"]), dtype="fp32", device="cpu")
    [task] = load_tasks(["vqav2"], ROOT / "configs/eval", task_data["overrides"])
    out = tmp_path / "resume"
    killed = _KilledAfter(gen, 3)
    with pytest.raises(KeyboardInterrupt):
        evaluate(killed, [task], task_data["root"], out, batch_size=4, log=lambda *_: None)
    partial = out / "vqav2/partial.rank0.jsonl"
    done = partial.read_text().splitlines()
    assert len(done) == 12 and not (out / "vqav2/predictions.jsonl").exists()
    with open(partial, "a") as f:  # the torn last line of a process killed mid-write
        f.write('{"id": "10')
    rerun = _KilledAfter(gen, None)
    results = evaluate(rerun, [task], task_data["root"], out, batch_size=4, log=lambda *_: None)
    assert rerun.calls == 3  # 24 samples, 12 done: 12 left in batches of 4
    assert _predictions(out, "vqav2") == _predictions(one_process_run, "vqav2")
    one = json.loads((one_process_run / "results.json").read_text())
    assert results["tasks"]["vqav2"]["score"] == one["tasks"]["vqav2"]["score"]


def test_cli_errors_name_the_problem(task_data, tmp_path):
    res = subprocess.run([sys.executable, "tools/eval.py", "--ckpt", str(task_data["ckpt"]), "--tasks", "vqa2",
                          "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown task 'vqa2'" in res.stderr and "vqav2" in res.stderr
    res = subprocess.run([sys.executable, "tools/eval.py", "--ckpt", str(task_data["ckpt"]), "--tasks", "vqav2",
                          "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o"), "vqav2.metric=bleu"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown metric 'bleu'" in res.stderr


def test_task_prompts_and_answer_extraction():
    from llama_vision.eval.readers import EvalSample
    from llama_vision.eval.tasks import extract_answer, load_task, render_prompt

    ai2d = load_task("ai2d", ROOT / "configs/eval")
    s = EvalSample(id="1", question="Which {part}?", answers=["B"], choices=["leaf", "root", "stem"])
    prompt = render_prompt(ai2d, s)
    assert "Which {part}?\n1. leaf\n2. root\n3. stem\n" in prompt  # braces in a question are kept
    assert extract_answer(ai2d, "The root absorbs water.\nFINAL ANSWER: 2", s) == "(B)"
    assert extract_answer(ai2d, "final answer: (3) stem", s) == "(C) stem"
    from llama_vision.eval.metrics import multiple_choice_accuracy

    assert multiple_choice_accuracy(extract_answer(ai2d, "FINAL ANSWER: 2.", s), "B", s.choices) == 1.0
    chartqa = load_task("chartqa", ROOT / "configs/eval")
    plain = EvalSample(id="2", question="q", answers=["12"])
    assert extract_answer(chartqa, "Step 1 ... so 10+2.\nFINAL ANSWER: 12", plain) == "12"
    assert extract_answer(chartqa, "12", plain) == "12"
    vqav2 = load_task("vqav2", ROOT / "configs/eval", ["max_new_tokens=3"])
    assert vqav2.max_new_tokens == 3 and vqav2.prompt.endswith("Question: {question}")
    for name in ("vqav2", "textvqa", "docvqa", "chartqa", "ai2d", "mmmu", "video_mc", "perceptiontest", "nextqa", "tvqa"):
        load_task(name, ROOT / "configs/eval")  # every shipped task config is valid


def test_training_scores_harness_tasks_without_changing_the_run(colour_model, tmp_path):
    """eval_harness.every: each task's score is in that step's metrics row, predictions in
    output_dir/eval/step_N/, and the run trains exactly as without it (same losses, same
    weights: the hook only reads the model)."""
    import torch

    from _eval_fixture import sft_overrides
    from llama_vision.config import load_config
    from llama_vision.training.train_config import TrainConfig
    from llama_vision.training.trainer import train

    ckpt, world = colour_model
    rows = [{"id": r["id"], "image": str(Path(world["root"]) / r["image"]), "question": r["question"], "answers": r["answers"]}
            for r in world["test"][:8]]
    (tmp_path / "colour.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "colour.yaml").write_text("data: {format: jsonl, path: colour.jsonl}\nprompt: '{question}'\nmax_new_tokens: 4\nmetric: exact_match\n")

    def run(out: Path, *harness: str) -> list[dict]:
        keys = sft_overrides(world, out, steps=4, init_from=str(Path(ckpt).parent.parent / "image" / "final"))
        train(load_config(TrainConfig, None, [*keys, "optim.lr=1e-4", *harness]))
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    plain = run(tmp_path / "plain")
    scored = run(tmp_path / "scored", f"eval_harness.tasks=[{tmp_path / 'colour.yaml'}]", "eval_harness.every=2",
                 f"eval_harness.data_root={tmp_path}", "eval_harness.limit=6")
    assert [r["loss"] for r in scored] == [r["loss"] for r in plain]
    by_step = {r["step"]: r for r in scored}
    assert {s for s, r in by_step.items() if "eval/colour" in r} == {2, 4}
    assert by_step[4]["eval/colour"] >= 0.8  # the trained model still answers
    results = json.loads((tmp_path / "scored/eval/step_4/results.json").read_text())
    assert results["tasks"]["colour"]["n"] == 6 and results["run"]["step"] == 4
    from llama_vision.checkpoint import load_model

    final = [load_model(str(out / "final"), device="cpu").state_dict() for out in (tmp_path / "plain", tmp_path / "scored")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_training_hook_under_fsdp_two_processes(colour_model, tmp_path):
    """FSDP (DP=2): every forward is a collective, so both ranks run every sample in the same
    batches; the hook must neither hang nor disturb the sharded training that follows it."""
    from _eval_fixture import sft_overrides

    ckpt, world = colour_model
    rows = [{"id": r["id"], "image": str(Path(world["root"]) / r["image"]), "question": r["question"], "answers": r["answers"]}
            for r in world["test"][:6]]
    (tmp_path / "colour.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "colour.yaml").write_text("data: {format: jsonl, path: colour.jsonl}\nprompt: '{question}'\nmax_new_tokens: 4\nmetric: exact_match\n")
    keys = sft_overrides(world, tmp_path / "out", steps=2, init_from=str(Path(ckpt).parent.parent / "image" / "final"))
    _run(["tools/train.py", *keys, "micro_batch_size=4", "optim.lr=1e-4", "save_final=false", f"eval_harness.tasks=[{tmp_path / 'colour.yaml'}]",
          "eval_harness.every=1", f"eval_harness.data_root={tmp_path}"], nproc=2)
    rows = [json.loads(x) for x in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/colour" in r] == [1, 2]
    assert all(r["eval/colour"] >= 0.8 and r["loss"] < 0.5 for r in rows)
    assert json.loads((tmp_path / "out/eval/step_2/results.json").read_text())["tasks"]["colour"]["n"] == 6


def test_tensor_parallel_eval_gives_the_same_predictions(task_data, one_process_run, tmp_path):
    """--tp 2 under torchrun: one model sharded over both processes (no data sharding)."""
    out = tmp_path / "tp2"
    args = _eval_cmd(task_data, out, "--tp", "2")
    args[args.index("--tasks") + 1] = "vqav2,video_mc"
    _run(args, nproc=2)
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["tp"] == 2 and results["run"]["data_parallel"] == 1
    for name in ("vqav2", "video_mc"):
        got = [(r["id"], r.get("prediction")) for r in _predictions(out, name)]
        assert got == [(r["id"], r.get("prediction")) for r in _predictions(one_process_run, name)], name
