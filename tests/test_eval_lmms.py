"""lmms-eval integration (llama_vision/eval/lmms_eval_model.py) through lmms-eval's own
entry points, with the trained colour checkpoint (tests/_eval_fixture.py) on fixture tasks
in lmms-eval's task-YAML format (written here: datasets saved with save_to_disk, read with
``dataset_kwargs: {load_from_disk: true}``): a generate_until VQA task, a multiple_choice
task (loglikelihood requests), a 2-round generate_until_multi_round task and a video task.

* ``python -m lmms_eval --model llama_vision ...``, the user's command: one process with
  tp=1, and under torchrun with tp=2, each one launch over the three image tasks.
  ``--model llama_vision`` must resolve to our class (setup.py's entry point), score far
  above chance, and every logged per-document answer must be what Generator answers for
  that prompt alone;
* ``lmms_eval.evaluator.simple_evaluate`` in this process: the image tasks again with a
  model object, and the video task by model name (raw prompts: the fixture's video
  adapters were trained on raw captions);
* the rest of the class directly: VLMEvalKit's generate_inner, stop strings, generation
  kwargs, bad model_args, the loglikelihood convention.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _eval_fixture import QUESTION, train_colour_checkpoint
from _helpers import ROOT

if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed (pip install --no-deps lmms-eval==0.7.3)", allow_module_level=True)

COLOURS = ["red", "green", "blue", "yellow"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}

UTILS = '''
COLOURS = ["red", "green", "blue", "yellow"]


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(results[0].strip() == doc["answer"])}


def two_rounds_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    """Round 0: the request's context (round_idx None); round 1: the second image; then stop."""
    if round_idx is None:
        return doc["question"]
    assert len(previous_output) == round_idx, (round_idx, previous_output)
    if round_idx == 1:
        assert previous_round_info is None
        return [doc["image2"].convert("RGB")], doc["question"], False, previous_output, {"asked": 2}
    assert previous_round_info == {"asked": 2}, previous_round_info
    return None, None, True, previous_output, previous_round_info


def two_rounds_process_results(doc, results):
    rounds = [r.strip() for r in results[0]]
    return {"round1_accuracy": float(rounds[0] == doc["answer"]), "round2_accuracy": float(rounds[1] == doc["answer2"]),
            "n_rounds": float(len(rounds))}


def video_doc_to_visual(doc):
    return [doc["video"]]


def video_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return ""
'''


def _yaml(name: str, dataset: Path, body: str) -> str:
    return f"task: {name}\ndataset_path: {dataset}\ndataset_kwargs:\n  load_from_disk: true\ntest_split: test\n" + textwrap.dedent(body)


@pytest.fixture(scope="session")
def colour_model(request, tmp_path_factory):
    """(checkpoint, data) of the trained colour model: conftest's session fixture when it has
    one (trained once for all the evaluation tests), else trained here."""
    try:
        return request.getfixturevalue("colour_model")
    except pytest.FixtureLookupError:
        return train_colour_checkpoint(tmp_path_factory.mktemp("lmms_colour_model"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(colour_model):
    """After training: the tiny model's inference ops are too small to split, and on a busy
    2-core machine a second thread mostly waits for the first (10x slower answers)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def lmms_tasks(colour_model, tmp_path_factory) -> dict:
    """A folder of lmms-eval task YAMLs + utils.py (for --include_path) over local datasets."""
    import datasets
    from PIL import Image

    ckpt, world = colour_model
    src = Path(world["root"])
    root = tmp_path_factory.mktemp("lmms_tasks")
    rows = world["test"]
    images = [Image.open(src / r["image"]).convert("RGB") for r in rows]
    answers = [r["answers"][0] for r in rows]
    image_features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
                                        "answer": datasets.Value("string"), "label": datasets.Value("int64")})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"id": [r["id"] for r in rows], "image": images, "question": [QUESTION] * len(rows), "answer": answers,
         "label": [COLOURS.index(a) for a in answers]}, features=image_features)}).save_to_disk(str(root / "data/images"))
    half = len(rows) // 2
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"image": images[:half], "image2": images[half : 2 * half], "question": [QUESTION] * half,
         "answer": answers[:half], "answer2": answers[half : 2 * half]},
        features=datasets.Features({"image": datasets.Image(), "image2": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string"), "answer2": datasets.Value("string")}))}).save_to_disk(str(root / "data/two_rounds"))
    videos = world["test_videos"]
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"video": [str(src / v["video"]) for v in videos], "answer": [v["caption"] for v in videos]})}).save_to_disk(str(root / "data/videos"))

    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "colour_vqa.yaml").write_text(_yaml("colour_vqa", root / "data/images", """\
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          temperature: 0
          do_sample: false
          until: ["\\n"]
        process_results: !function utils.process_results
        metric_list:
          - metric: accuracy
            aggregation: mean
            higher_is_better: true
        """))
    (tasks / "colour_mc.yaml").write_text(_yaml("colour_mc", root / "data/images", f"""\
        output_type: multiple_choice
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_choice: {json.dumps(COLOURS)}
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    (tasks / "colour_two_rounds.yaml").write_text(_yaml("colour_two_rounds", root / "data/two_rounds", """\
        output_type: generate_until_multi_round
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.two_rounds_doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          do_sample: false
        process_results: !function utils.two_rounds_process_results
        metric_list:
          - metric: round1_accuracy
            aggregation: mean
            higher_is_better: true
          - metric: round2_accuracy
            aggregation: mean
            higher_is_better: true
          - metric: n_rounds
            aggregation: mean
            higher_is_better: true
        """))
    (tasks / "colour_video.yaml").write_text(_yaml("colour_video", root / "data/videos", """\
        output_type: generate_until
        doc_to_visual: !function utils.video_doc_to_visual
        doc_to_text: !function utils.video_doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: accuracy
            aggregation: mean
            higher_is_better: true
        """))
    return {"dir": tasks, "ckpt": ckpt, "world": world, "images": images, "answers": answers, "half": half}


@pytest.fixture(scope="session")
def generator(colour_model):
    from llama_vision import inference

    return inference.setup(str(colour_model[0]), dtype="fp32", device="cpu")


def _greedy(gen, image, text: str = QUESTION) -> str:
    from llama_vision import inference

    ids = inference.prompt_tokens(gen, text, 1, raw=False)
    return gen.tokenizer.decode(gen.generate([ids], [[image]], max_new_tokens=4)[0])


IMAGE_TASKS = ("colour_vqa", "colour_mc", "colour_two_rounds")


@pytest.fixture(scope="session", params=[1, 2], ids=["1proc_tp1", "torchrun_tp2"])
def cli_run(request, lmms_tasks, tmp_path_factory) -> dict:
    """The user's command, one launch over the three image tasks: `python -m lmms_eval`
    with tp=1, or under torchrun with tp=2 (one model sharded over both processes, which
    lmms-eval hands different documents) -> results + per-task samples (as lmms-eval's
    --log_samples files hold them)."""
    tp = request.param
    out = tmp_path_factory.mktemp(f"lmms_out_tp{tp}")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}"] if tp > 1 else []
    cmd = [sys.executable, *launcher, "-m", "lmms_eval", "--model", "llama_vision",
           "--model_args", f"pretrained={lmms_tasks['ckpt']},tp={tp},dtype=fp32,device=cpu,max_new_tokens=8",
           "--tasks", ",".join(IMAGE_TASKS), "--include_path", str(lmms_tasks["dir"]),
           "--batch_size", "4", "--output_path", str(out), "--log_samples", "--verbosity", "WARNING",
           "--process_docs_parallel", "1", "--seed", "0"]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(out / "hf_home"), "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # lmms-eval's CLI logs an exception in the evaluation and exits 0.
    assert res.returncode == 0 and "Error during evaluation" not in res.stdout + res.stderr, res.stdout[-4000:] + res.stderr[-4000:]
    [results_file] = out.glob("*/*_results.json")
    samples = {}
    for task in IMAGE_TASKS:
        [f] = results_file.parent.glob(f"*_samples_{task}.jsonl")
        samples[task] = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return {"results": json.loads(results_file.read_text()), "samples": samples, "tp": tp}


@pytest.fixture(scope="module")
def lmms_env():
    """lmms-eval imported in this process, offline (its dataset code reads the env at import)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def lmm(lmms_env, colour_model):
    from llama_vision.eval.lmms_eval_model import LlamaVisionLMM

    return LlamaVisionLMM(pretrained=str(colour_model[0]), dtype="fp32", device="cpu", max_new_tokens=4, batch_size=3)


def _simple_evaluate(model, model_args, tasks, lmms_tasks):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks),
        task_manager=TaskManager("WARNING", include_path=str(lmms_tasks["dir"]), include_defaults=False),
        batch_size=3, log_samples=True, bootstrap_iters=0, verbosity="WARNING", process_docs_parallel=1,
        distributed_executor_backend="torchrun",  # one process: no process group, no Accelerator state left here
    )


@pytest.fixture(scope="module")
def in_process_run(lmm, lmms_tasks) -> dict:
    """simple_evaluate in this process, one process: the image tasks with a model object,
    the video task by name (raw prompts: the fixture's video adapters were trained so)."""
    images = _simple_evaluate(lmm, None, IMAGE_TASKS, lmms_tasks)
    video = _simple_evaluate("llama_vision", f"pretrained={lmms_tasks['ckpt']},dtype=fp32,device=cpu,raw=true,max_new_tokens=4",
                             ["colour_video"], lmms_tasks)
    return {"images": images, "video": video}


def _answers(sample: dict):
    """A logged sample's model output, the same from memory or from a --log_samples file
    (which drops one level of single-item lists and writes loglikelihood pairs as strings)."""
    out = sample["filtered_resps"]
    if isinstance(out, list) and len(out) == 1:
        out = out[0]
    if isinstance(out, list) and out and isinstance(out[0], (list, tuple)):  # multiple choice: (nll, is_greedy) per choice
        return [(float(nll), str(greedy) == "True") for nll, greedy in out]
    return out


def _check_scores_and_answers(results: dict, samples: dict, lmms_tasks, generator) -> None:
    """Far above the 4-colour chance, and per document what Generator answers alone."""
    import math

    images, answers, half = lmms_tasks["images"], lmms_tasks["answers"], lmms_tasks["half"]
    r = results["results"]
    assert r["colour_vqa"]["accuracy,none"] >= 0.9, r["colour_vqa"]
    assert r["colour_mc"]["acc,none"] >= 0.9, r["colour_mc"]
    assert r["colour_two_rounds"]["round1_accuracy,none"] >= 0.9 and r["colour_two_rounds"]["round2_accuracy,none"] >= 0.9, r["colour_two_rounds"]
    assert r["colour_two_rounds"]["n_rounds,none"] == 2.0
    assert sorted(s["doc_id"] for s in samples["colour_vqa"]) == list(range(len(images)))
    assert sorted(s["doc_id"] for s in samples["colour_mc"]) == list(range(len(images)))
    assert sorted(s["doc_id"] for s in samples["colour_two_rounds"]) == list(range(half))
    greedy = {i: _greedy(generator, im) for i, im in enumerate(images)}
    for s in samples["colour_vqa"]:
        assert str(s["target"]) == answers[s["doc_id"]]  # the logged document is the one answered
        assert _answers(s) == greedy[s["doc_id"]], s["doc_id"]
    # Multi-round: each round is its own single-turn prompt (round 2 sees the second image only).
    for s in samples["colour_two_rounds"]:
        assert _answers(s) == [greedy[s["doc_id"]], greedy[half + s["doc_id"]]], s["doc_id"]
    # loglikelihood returns lmms-eval's (negative log-likelihood, is_greedy): its
    # multiple_choice takes the argmin, which must be the colour Generator answers, whose
    # single token is the greedy continuation.
    for s in samples["colour_mc"]:
        pairs = _answers(s)
        nll = [x for x, _ in pairs]
        assert int(s["target"]) == COLOURS.index(answers[s["doc_id"]])
        assert all(x > 0 and math.isfinite(x) for x in nll), nll
        assert COLOURS[nll.index(min(nll))] == greedy[s["doc_id"]], (s["doc_id"], pairs)
        assert [g for _, g in pairs] == [c == greedy[s["doc_id"]] for c in COLOURS], (s["doc_id"], pairs)


def test_cli_resolves_our_class_and_matches_generator(cli_run, lmms_tasks, generator):
    results = cli_run["results"]
    assert f"tp={cli_run['tp']}," in results["config"]["model_args"]
    assert results["config"]["model"] == "llama_vision"  # --model llama_vision is ours, not lmms-eval's Mllama one
    assert results["config"]["model_backend"] == "llama_vision.eval.lmms_eval_model.LlamaVisionLMM (simple)"
    assert {k: v["effective"] for k, v in results["n-samples"].items()} == {"colour_vqa": 24, "colour_mc": 24, "colour_two_rounds": 12}
    _check_scores_and_answers(results, cli_run["samples"], lmms_tasks, generator)


def test_simple_evaluate_in_process_matches_generator(in_process_run, lmms_tasks, generator):
    results = in_process_run["images"]
    _check_scores_and_answers(results, results["samples"], lmms_tasks, generator)


def test_simple_evaluate_video_task(in_process_run, lmms_tasks, generator):
    from llama_vision.eval.lmms_eval_model import LlamaVisionLMM
    from llama_vision.model.video import VideoConfig, video_inputs_from_paths

    results = in_process_run["video"]
    assert results["config"]["model_backend"] == f"{LlamaVisionLMM.__module__}.LlamaVisionLMM (simple)"
    assert results["results"]["colour_video"]["accuracy,none"] >= 0.5  # chance 0.25
    model = generator.model
    ids = [model.modalities["video"].token_id] + generator.tokenizer.encode("", bos=True, eos=False)  # raw: <|video|><|begin_of_text|>
    samples = results["samples"]["colour_video"]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(lmms_tasks["world"]["test_videos"])))
    for s in samples:
        media = {"video": video_inputs_from_paths([[s["doc"]["video"]]], VideoConfig(**model.args.video), model.args.vision_chunk_size)}
        want = generator.tokenizer.decode(generator.generate_from_tensors([ids], media_inputs=media, max_new_tokens=4)[0])
        assert _answers(s) == want, s["doc_id"]


# -- the class directly ---------------------------------------------------------------------------


def test_vlmevalkit_generate_inner_is_generators_answer(lmm, lmms_tasks, generator):
    from PIL import Image

    src = Path(lmms_tasks["world"]["root"])
    for row in lmms_tasks["world"]["test"][:4]:
        path = str(src / row["image"])
        got = lmm.generate_inner([{"type": "image", "value": path}, {"type": "text", "value": QUESTION}], dataset="colour")
        assert got == _greedy(generator, Image.open(path).convert("RGB"))
    with pytest.raises(ValueError, match="type must be image, video or text"):
        lmm.generate_inner([{"type": "audio", "value": "x.wav"}])


def test_until_cuts_the_answer(lmm, lmms_tasks, generator):
    image = lmms_tasks["images"][0]
    dialog = lmm._dialog(QUESTION, [image])
    full = lmm.answer_batch([dialog], {"max_new_tokens": 4})[0]
    assert len(full) >= 3 and full == _greedy(generator, image)
    assert lmm.answer_batch([dialog], {"max_new_tokens": 4, "until": [full[1:3]]})[0] == full[:1]
    assert lmm.answer_batch([dialog], {"max_new_tokens": 4, "until": full[2:]})[0] == full[:2]  # a str works too


def test_a_task_budget_is_cut_to_the_context_window(lmm, lmms_tasks, generator):
    image = lmms_tasks["images"][0]
    # The model ends its answer (one colour word) long before 4 tokens.
    assert lmm.answer_batch([lmm._dialog(QUESTION, [image])], {"max_new_tokens": 10**6})[0] == _greedy(generator, image)


def test_bad_model_args_say_what_is_wrong(lmms_env, colour_model, tmp_path):
    from llama_vision.eval.lmms_eval_model import LlamaVisionLMM

    ckpt = str(colour_model[0])
    with pytest.raises(ValueError, match=r"unknown model_args \['temprature'\]; known: pretrained, tp"):
        LlamaVisionLMM.create_from_arg_string(f"pretrained={ckpt},temprature=0", {"batch_size": 1})
    with pytest.raises(ValueError, match="needs pretrained="):
        LlamaVisionLMM()
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        LlamaVisionLMM(pretrained=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        LlamaVisionLMM(pretrained=ckpt, dtype="float32")
    with pytest.raises(ValueError, match="batch_size=auto is not supported"):
        LlamaVisionLMM.create_from_arg_string(f"pretrained={ckpt}", {"batch_size": "auto"})
    with pytest.raises(ValueError, match="tp=2 must divide the number of processes"):
        LlamaVisionLMM(pretrained=ckpt, tp=2)
    with pytest.raises(ValueError, match="raw must be true or false"):
        LlamaVisionLMM(pretrained=ckpt, raw="maybe")
    # lmms-eval passes --max_batch_size along with batch_size: accepted (unused).
    lm = LlamaVisionLMM.create_from_arg_string(f"pretrained={ckpt},dtype=fp32,device=cpu", {"batch_size": "2", "max_batch_size": 8})
    assert lm.batch_size == 2 and str(lm.device) == "cpu"


def test_unsupported_visuals_and_videos_without_adapters_are_clear_errors(lmm, lmms_tasks):
    with pytest.raises(ValueError, match="unsupported visual dict"):
        lmm._contents("q", [{"array": [0.0], "sampling_rate": 16000}])
    video = str(Path(lmms_tasks["world"]["root"]) / lmms_tasks["world"]["test_videos"][0]["video"])
    modalities = lmm.gen.model.modalities
    saved = modalities.pop("video")  # as a checkpoint without video adapters
    try:
        with pytest.raises(ValueError, match="has no video adapters"):
            lmm.answer_batch([lmm._dialog("", [video])], {})
    finally:
        modalities["video"] = saved


def test_generation_kwargs_follow_transformers(lmm):
    s = lmm._sampling
    assert s({"do_sample": False, "temperature": 0.7}, 10)["temperature"] == 0.0
    assert s({"do_sample": True}, 10)["temperature"] == 1.0 and s({"do_sample": True, "temperature": 0.5}, 10)["temperature"] == 0.5
    assert s({"temperature": 0, "top_p": 0}, 10) == {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": None}
    assert s({"max_new_tokens": 10**6}, 10)["max_new_tokens"] == lmm.gen.model.args.max_seq_len - 10
    with pytest.raises(ValueError, match="leaves no room"):
        s({}, lmm.gen.model.args.max_seq_len)


def test_loglikelihood_is_the_negative_log_likelihood(lmm, lmms_tasks):
    """What lmms-eval's models return (a loss: its multiple_choice takes the argmin), wrapped
    so that lmms-eval 0.7's output unwrapping hands the pair on untouched; requests without
    visuals (acc_mutual_info's unconditional ones have 2 arguments) work too."""
    from lmms_eval.api.instance import Instance, unwrap_generation_output

    from llama_vision.eval.loglikelihood import continuation_logprobs

    image, answer = lmms_tasks["images"][0], lmms_tasks["answers"][0]
    lmm.task_dict["t"] = {"test": [{"image": image}]}
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    reqs = [Instance("loglikelihood", (QUESTION, f" {c}", lambda d: [d["image"]], 0, "t", "test"), i, meta) for i, c in enumerate(COLOURS)]
    reqs.append(Instance("loglikelihood", ("", answer), 4, meta))
    pairs = [unwrap_generation_output(x)[0] for x in lmm.loglikelihood(reqs)]
    ids, media = lmm.encode([lmm._dialog(QUESTION, [image])])
    tok = lmm.tokenizer
    for (nll, greedy), c in zip(pairs, COLOURS):
        [(logp, want_greedy)] = continuation_logprobs(lmm.gen.model, ids, [tok.encode(c, bos=False, eos=False)], media)
        assert nll == pytest.approx(-logp, rel=1e-5) and greedy == want_greedy
    assert COLOURS[min(range(4), key=lambda i: pairs[i][0])] == answer
    text_only, _ = lmm.encode([lmm._dialog("", [])])
    [(logp, _)] = continuation_logprobs(lmm.gen.model, text_only, [tok.encode(answer, bos=False, eos=False)])
    assert pairs[4][0] == pytest.approx(-logp, rel=1e-5)
