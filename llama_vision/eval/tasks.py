"""Evaluation tasks as data: ``configs/eval/<task>.yaml`` -> :class:`TaskConfig`.

A task names where its samples come from (a reader spec, :mod:`.readers`), how a sample
becomes a prompt, how long the answer may be, how the answer is pulled out of the
generated text and which metric scores it (:data:`.metrics.METRICS`). Every key can be
overridden from the command line like a training config (``vqav2.max_new_tokens=10``).

Prompts follow the published Llama 3.2 Vision evaluation prompts where Meta published
them (llama-models ``models/llama3_2/eval_details.md``); their leading ``<|image|>`` is
where the chat format puts the sample's images anyway (before the text), so templates
here start with the text.
"""
from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from llama_vision.config import ConfigError, load_config

from .readers import EvalSample


@dataclass
class TaskConfig:
    """One evaluation task (a file in configs/eval/)."""

    name: str = ""
    """Task name (results.json key, output sub-folder); default: the YAML file's stem."""
    data: dict[str, Any] = field(default_factory=dict)
    """Reader spec: `format` (hf_parquet, vqav2_json, docvqa_json, chartqa_json, jsonl) and
    its paths, relative to --data-root (see llama_vision/eval/readers.py)."""
    split: str | None = None
    """Data split (e.g. validation, test); passed to the reader as data.split."""
    prompt: str = "{question}"
    """Prompt template: {question} is the sample's question, {options} its answer options
    (multiple-choice tasks), one per line as `options_format`."""
    options_format: str = "{label}. {option}"
    """How one option is written in {options}: {label} (A, B, ... or 1, 2, ...) and {option}."""
    option_labels: Literal["letters", "numbers"] = "letters"
    """Option labels in the prompt: letters (A, B, ...) or numbers (1, 2, ...); a numeric
    answer is mapped back to its letter before scoring."""
    max_new_tokens: int = 16
    """Generation budget per answer."""
    metric: str = "exact_match"
    """A name in llama_vision.eval.metrics.METRICS (vqa_accuracy, vqa_accuracy_lmms_eval,
    anls, relaxed_accuracy, multiple_choice, mmmu, exact_match; the demo's shapes_caption,
    shapes_direction)."""
    answer_extraction: Literal["none", "final_answer"] = "none"
    """none: the whole answer, stripped; final_answer: the text after the last "FINAL
    ANSWER:" (Meta's chain-of-thought prompts for ChartQA and AI2D), else the whole answer."""
    chat: bool = True
    """Prompt in Meta's chat format (instruct checkpoints); false: raw (media placeholders,
    <|begin_of_text|>, the prompt), for base checkpoints."""
    mode: Literal["generate", "loglikelihood"] = "generate"
    """generate: greedy decoding, then the metric; loglikelihood (multiple-choice tasks):
    the option whose text has the highest log-likelihood after the prompt."""
    num_frames: int | None = None
    """Video tasks: frames sampled per clip (default: the checkpoint's video config)."""
    limit: int | None = None
    """Evaluate only the first N samples (smoke tests)."""


def load_task(name_or_path: str, task_dir: str | Path | None = None, overrides: Sequence[str] = ()) -> TaskConfig:
    """A task by name (``task_dir/<name>.yaml``) or by YAML path, with ``key=value`` overrides."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        if task_dir is None:
            raise ConfigError(f"task {name_or_path!r}: give a YAML path or a task folder (--task-dir)")
        path = Path(task_dir) / f"{name_or_path}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in Path(task_dir).glob("*.yaml"))
            raise ConfigError(f"unknown task {name_or_path!r}: no {path}; tasks in {task_dir}: {', '.join(known)}")
    task = load_config(TaskConfig, path, overrides)
    if not task.name:
        task.name = path.stem
    from .metrics import METRICS

    if task.metric not in METRICS:
        raise ConfigError(f"task {task.name}: unknown metric {task.metric!r}; choose from {sorted(METRICS)}")
    if task.mode == "loglikelihood" and task.metric != "multiple_choice":
        raise ConfigError(f"task {task.name}: mode loglikelihood needs metric multiple_choice, got {task.metric!r}")
    return task


def reader_spec(task: TaskConfig) -> dict[str, Any]:
    """The task's `data` mapping with the task-level split filled in."""
    spec = dict(task.data)
    if task.split is not None:
        spec["split"] = task.split
    return spec


def option_label(task: TaskConfig, index: int) -> str:
    return str(index + 1) if task.option_labels == "numbers" else string.ascii_uppercase[index]


def render_prompt(task: TaskConfig, sample: EvalSample) -> str:
    """The prompt text of one sample (plain replacement, so braces in questions are safe)."""
    options = "\n".join(
        task.options_format.replace("{label}", option_label(task, i)).replace("{option}", str(o))
        for i, o in enumerate(sample.choices or [])
    )
    return task.prompt.replace("{question}", sample.question).replace("{options}", options)


_FINAL_ANSWER = re.compile(r"final\s*answer\s*[:：]?", re.IGNORECASE)


def extract_answer(task: TaskConfig, text: str, sample: EvalSample) -> str:
    """Generated text -> the answer the metric scores."""
    answer = text.strip()
    if task.answer_extraction == "final_answer":
        found = list(_FINAL_ANSWER.finditer(answer))
        if found:
            answer = answer[found[-1].end():].strip()
    if sample.choices and task.option_labels == "numbers":
        # "2", "2.", "(2) dog" -> "(B)", "(B) dog": the metrics extract letters.
        m = re.match(r"^\(?\s*(\d+)\s*[).:]?(\s|$)", answer)
        if m and 1 <= int(m.group(1)) <= len(sample.choices):
            rest = answer[m.end():].strip()
            answer = f"({string.ascii_uppercase[int(m.group(1)) - 1]}) {rest}".strip()
    return answer


def score(task: TaskConfig, prediction: str, sample: EvalSample) -> float:
    """The task's metric on one extracted prediction."""
    from .metrics import METRICS

    return float(METRICS[task.metric](prediction, sample.answers, sample.choices, sample.meta))


def load_tasks(specs: Sequence[str], task_dir: str | Path | None, overrides: Sequence[str] = (), limit: int | None = None) -> list[TaskConfig]:
    """Several tasks (names or YAML paths). Overrides are ``key=value`` (every task) or
    ``TASK.key=value`` (only task TASK: a first component that is no TaskConfig key names a
    task, and overrides of tasks not loaded are ignored); ``limit`` caps every task's samples."""
    fields = {f.name for f in dataclasses.fields(TaskConfig)}
    tasks = []
    for spec in specs:
        name, own = Path(spec).stem, []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            head, _, rest = item.partition(".")
            if head in fields or not rest or "=" in head:
                own.append(item)
            elif head == name:
                own.append(rest)
        task = load_task(spec, task_dir, own)
        if limit is not None:
            task.limit = limit if task.limit is None else min(task.limit, limit)
        tasks.append(task)
    return tasks
