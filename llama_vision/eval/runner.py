"""Score a checkpoint on evaluation tasks: batched greedy generation through ``Generator``,
data-parallel over torchrun's processes (or tensor-parallel, ``tp``), resumable.

Outputs in ``output_dir``::

    <task>/predictions.jsonl   one line per sample, in the task's order: id, question,
                               references, (choices), prediction, raw_prediction, score;
                               or id + skipped (why the sample could not be evaluated)
    <task>/partial.rank<R>.jsonl   written while a task runs (one per data-parallel rank,
                               a line per sample as soon as its batch is done); merged
                               into predictions.jsonl at the end of the task, then removed
    results.json               per task: metric, score, n, n_skipped, skipped reasons,
                               wall_s, the task config; the model and run settings
    results.md                 the same as a markdown table

Resuming: a rerun reads predictions.jsonl and every partial file, and generates only the
samples not in them (a torn last line of a killed run is ignored), so a killed run loses
at most one batch per rank; the world size may change between runs.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

import model_parallel as mp
from llama_vision.config import config_to_dict
from llama_vision.data.image_io import ImageLoadError
from llama_vision.data.video import VideoLoadError
from llama_vision.inference import prompt_tokens
from llama_vision.inputs import prepare_images, prepare_video_clips, projector_clip

from .loglikelihood import continuation_logprobs
from .readers import EvalSample, load_images, read_samples
from .tasks import TaskConfig, extract_answer, option_label, reader_spec, render_prompt, score


@dataclass
class Shard:
    """This process's place in the evaluation: its data-parallel rank and size, and whether
    it writes (TP rank 0 of its group) and merges (global rank 0)."""

    rank: int = 0
    size: int = 1
    writer: bool = True
    merger: bool = True

    @classmethod
    def from_process_groups(cls) -> "Shard":
        if not mp.is_model_parallel():
            return cls()
        return cls(mp.dp_rank(), mp.dp_size(), mp.tp_rank() == 0, torch.distributed.get_rank() == 0)


def evaluate(
    gen,
    tasks: list[TaskConfig],
    data_root: str | Path,
    output_dir: str | Path,
    *,
    batch_size: int = 8,
    run_info: dict[str, Any] | None = None,
    shard: Shard | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every task; -> the results.json content (on every rank)."""
    shard = shard or Shard.from_process_groups()
    out = Path(output_dir)
    results_path = out / "results.json"
    results = _read_json(results_path) or {"tasks": {}}
    for task in tasks:
        summary = evaluate_task(gen, task, data_root, out / task.name, batch_size=batch_size, shard=shard)
        results["tasks"][task.name] = summary
        if shard.merger:
            log(f"[eval] {task.name}: {task.metric} = {100 * summary['score']:.2f} (n={summary['n']}, skipped={summary['n_skipped']})")
    results["run"] = dict(run_info or {}, data_parallel=shard.size, batch_size=batch_size)
    if shard.merger:
        _write_atomic(results_path, json.dumps(results, indent=2) + "\n")
        _write_atomic(out / "results.md", results_table(results))
    return results


def evaluate_task(gen, task: TaskConfig, data_root: str | Path, task_dir: Path, *, batch_size: int = 8, shard: Shard | None = None) -> dict[str, Any]:
    """One task: generate what is not done yet (this rank's share), merge, summarise."""
    shard = shard or Shard()
    start = time.time()
    samples = load_samples(task, data_root)
    done = _read_records(task_dir)
    _barrier()  # every rank has read the finished set before anyone appends to it
    pending = [s for s in samples if s.id not in done]
    mine = pending[shard.rank :: shard.size]
    if shard.writer:
        task_dir.mkdir(parents=True, exist_ok=True)
    partial = task_dir / f"partial.rank{shard.rank}.jsonl"
    scores = [r["score"] for r in done.values() if "score" in r]
    bar = tqdm(total=len(mine), desc=f"eval[{task.name}]", unit="sample", disable=not shard.merger, dynamic_ncols=True)
    with (_open_for_append(partial) if shard.writer else open(os.devnull, "w")) as sink:
        for i in range(0, len(mine), batch_size):
            records = evaluate_batch(gen, task, mine[i : i + batch_size])
            sink.write("".join(json.dumps(r) + "\n" for r in records))
            sink.flush()
            scores += [r["score"] for r in records if "score" in r]
            bar.update(len(records))
            bar.set_postfix(score=f"{100 * sum(scores) / max(len(scores), 1):.1f}")
    bar.close()
    _barrier()
    if shard.merger:
        summary = merge_task(task, samples, task_dir, wall_s=time.time() - start)
    else:
        summary = None
    return _broadcast(summary)


def load_samples(task: TaskConfig, data_root: str | Path) -> list[EvalSample]:
    samples = read_samples(reader_spec(task), Path(data_root))
    if task.limit is not None:
        samples = samples[: task.limit]
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise ValueError(f"task {task.name}: sample id {s.id!r} appears twice (ids must be unique for resuming)")
        seen.add(s.id)
    return samples


def evaluate_batch(gen, task: TaskConfig, samples: list[EvalSample]) -> list[dict[str, Any]]:
    """Predictions and scores of one batch; samples whose media cannot be read are
    returned as skipped records (the rest of the batch goes on)."""
    loaded, records = [], {}
    for s in samples:
        try:
            loaded.append((s, _load_media(gen, task, s)))
        except (ImageLoadError, VideoLoadError, FileNotFoundError) as e:
            records[s.id] = {"id": s.id, "skipped": f"{type(e).__name__}: {e}"}
    if loaded:
        if task.mode == "loglikelihood":
            texts = [_choose_by_likelihood(gen, task, s, media) for s, media in loaded]
        else:
            texts = _generate(gen, task, loaded)
        for (s, _), text in zip(loaded, texts):
            prediction = extract_answer(task, text, s)
            record = {"id": s.id, "question": s.question, "references": s.answers}
            if s.choices:
                record["choices"] = s.choices
            records[s.id] = {**record, "prediction": prediction, "raw_prediction": text, "score": score(task, prediction, s)}
    return [records[s.id] for s in samples]


VIDEO_MEDIA = ("video", "projector_video")  # _load_media kinds: Meta's video adapters, a LLaVA model's projector path


def _load_media(gen, task: TaskConfig, sample: EvalSample):
    """-> ("image", [PIL images]), ("video", (videos, ratios, frames)) or, for a LLaVA
    model's projector video modality, ("projector_video", frames [f, 3, S, S]) for one sample."""
    if sample.video is not None:
        from llama_vision.model.video import VideoConfig, video_inputs_from_paths

        model = gen.model
        if "video" not in model.modalities:
            raise ValueError(f"task {task.name}: sample {sample.id} has a video but the checkpoint has no video adapters")
        if not Path(sample.video).exists():
            raise FileNotFoundError(f"sample {sample.id}: video not found: {sample.video}")
        if model.modalities["video"].fusion == "projector":
            return "projector_video", projector_clip(model, sample.video, task.num_frames)
        cfg = VideoConfig(**model.args.video)
        if task.num_frames is not None:
            cfg = VideoConfig(**{**model.args.video, "num_frames": task.num_frames})
        return "video", video_inputs_from_paths([[sample.video]], cfg, model.args.vision_chunk_size, model.args.vision_max_num_chunks)
    return "image", load_images(sample)


def _prompt_ids(gen, task: TaskConfig, sample: EvalSample, media) -> list[int]:
    kind, items = media
    if kind in VIDEO_MEDIA:
        return prompt_tokens(gen, render_prompt(task, sample), 1, raw=not task.chat, placeholder=gen.model.modalities["video"].token_id)
    return prompt_tokens(gen, render_prompt(task, sample), len(items), raw=not task.chat)


def _generate(gen, task: TaskConfig, loaded: list[tuple[EvalSample, Any]]) -> list[str]:
    rows = [_prompt_ids(gen, task, s, media) for s, media in loaded]
    kw = {"max_new_tokens": task.max_new_tokens, "temperature": 0.0}
    if any(media[0] == "projector_video" for _, media in loaded):
        rows, inputs = prepare_video_clips(gen.model, rows, _projector_clips(loaded), device=gen.device)
        new = gen.generate_from_tensors(rows, media_inputs={"video": inputs}, **kw)
    elif any(media[0] == "video" for _, media in loaded):
        new = gen.generate_from_tensors(rows, media_inputs=_video_inputs(gen, [media for _, media in loaded]), **kw)
    else:
        new = gen.generate(rows, [media[1] for _, media in loaded], **kw)
    return [gen.tokenizer.decode(ids) for ids in new]


def _projector_clips(loaded: list[tuple[EvalSample, Any]]) -> list[list[torch.Tensor]]:
    if any(kind != "projector_video" for _, (kind, _) in loaded):
        raise ValueError("a batch mixes video and image samples; give each modality its own task")
    return [[clip] for _, (_, clip) in loaded]


def _video_inputs(gen, media: list) -> dict[str, Any]:
    """Per-sample (videos, ratios, frames) [1, ...] -> the batch's video inputs on the device
    (rows without a video get empty slots: num_frames 0)."""
    if any(kind != "video" for kind, _ in media):
        raise ValueError("a batch mixes video and image samples; give each modality its own task")
    videos, ratios, frames = (torch.cat(parts) for parts in zip(*(m for _, m in media)))
    dtype = gen.model.vision_model.vision_projection.weight.dtype
    return {"video": (videos.to(gen.device, dtype), ratios.to(gen.device), frames.to(gen.device))}


def _choose_by_likelihood(gen, task: TaskConfig, sample: EvalSample, media) -> str:
    """The label of the option whose text is most likely after the prompt."""
    if not sample.choices:
        raise ValueError(f"task {task.name}: sample {sample.id} has no choices (mode loglikelihood)")
    tok, n = gen.tokenizer, len(sample.choices)
    context = _prompt_ids(gen, task, sample, media)
    continuations = [tok.encode(str(c), bos=False, eos=False) for c in sample.choices]
    kind, items = media
    contexts = [context] * n
    if kind == "projector_video":
        contexts, video_inputs = prepare_video_clips(gen.model, contexts, [[items]] * n, device=gen.device)
        inputs = {"video": video_inputs}
    elif kind == "video":
        videos, ratios, frames = _video_inputs(gen, [media])["video"]
        inputs = {"video": (videos.expand(n, *videos.shape[1:]), ratios.expand(n, -1, -1), frames.expand(n, -1))}
    else:
        # (a projector image modality expands each placeholder to the image's tokens)
        contexts, image_inputs = prepare_images(gen.model, contexts, [items] * n, device=gen.device)
        inputs = {"image": image_inputs} if image_inputs is not None else None
    scores = continuation_logprobs(gen.model, contexts, continuations, inputs)
    best = max(range(n), key=lambda i: scores[i][0])
    return option_label(task, best)


def merge_task(task: TaskConfig, samples: list[EvalSample], task_dir: Path, wall_s: float) -> dict[str, Any]:
    """predictions.jsonl in the task's order from everything written so far; -> summary."""
    records = _read_records(task_dir)
    missing = [s.id for s in samples if s.id not in records]
    if missing:
        raise RuntimeError(f"task {task.name}: {len(missing)} sample(s) have no prediction after the run, e.g. {missing[:3]}")
    ordered = [records[s.id] for s in samples]
    task_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(task_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in ordered))
    for p in task_dir.glob("partial.rank*.jsonl"):
        p.unlink()
    scored = [r["score"] for r in ordered if "score" in r]
    skipped = Counter(r["skipped"].split(":", 1)[0] for r in ordered if "skipped" in r)
    return {
        "metric": task.metric,
        "score": sum(scored) / len(scored) if scored else 0.0,
        "n": len(scored),
        "n_skipped": sum(skipped.values()),
        "skipped": dict(skipped),
        "wall_s": round(wall_s, 3),
        "config": config_to_dict(task),
    }


def results_table(results: dict[str, Any]) -> str:
    """results.json -> a markdown table (scores in percent)."""
    lines = ["| task | metric | score | n | skipped |", "|---|---|---:|---:|---:|"]
    for name, r in results["tasks"].items():
        lines.append(f"| {name} | {r['metric']} | {100 * r['score']:.2f} | {r['n']} | {r['n_skipped']} |")
    return "\n".join(lines) + "\n"


def _read_records(task_dir: Path) -> dict[str, dict[str, Any]]:
    """Every finished sample of a task: predictions.jsonl, then the partial files."""
    records: dict[str, dict[str, Any]] = {}
    files = [task_dir / "predictions.jsonl", *sorted(task_dir.glob("partial.rank*.jsonl"))]
    for path in files:
        if path.exists():
            records.update((r["id"], r) for r in _jsonl_lines(path))
    return records


def _jsonl_lines(path: Path) -> Iterable[dict[str, Any]]:
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed run: that sample runs again


def _open_for_append(path: Path):
    """Append mode, after ending a torn last line (a killed run's) with a newline, so the
    next record starts a line of its own."""
    f = open(path, "a+b")
    if f.tell() > 0:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
    f.close()
    return open(path, "a")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _barrier() -> None:
    if mp.is_model_parallel():
        mp.barrier()


def _broadcast(obj):
    return mp.broadcast_object(obj) if mp.is_model_parallel() else obj
