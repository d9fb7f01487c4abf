"""A training curriculum: an ordered list of stages, each an ordinary train config (its own
data mixture, trainable set, lr, steps), run one after another in one launch, each stage
initialised from the previous one's final/ (LLaVA-OneVision: projector alignment ->
high-quality knowledge -> single-image SFT -> the OneVision mixture)::

    # configs/train/onevision_curriculum.yaml
    output_dir: runs/onevision
    overrides: {tokenizer: ...}            # applied to every stage (optional)
    stages:
      - name: stage1
        config: llava_pretrain.yaml        # relative to this file, like `base:`
        overrides: {max_steps: 2180}       # nested mappings or dotted keys
      - name: stage1_5
        config: llava_sft.yaml
        overrides: {data: {paths: [], sources: [...]}, optim.lr: 1.0e-5}

    tools/train.py --config configs/train/onevision_curriculum.yaml \\
        [STAGE.key=value ...] [overrides.key=value ...] [output_dir=DIR] [--resume] [--stages a,b]

Rules (run_curriculum):

* Stage ``name`` trains into ``{output_dir}/{name}`` (the curriculum sets it: a stage may not).
  Its ``init_from`` is the previous stage's ``final/`` unless its overrides set ``init_from``
  (the first stage keeps its config's). A chained stage also gets ``init_text_from`` and
  ``init_vision_from`` cleared (unless its overrides set them): final/ holds the whole model,
  and re-loading the text trunk or the tower from their original files would throw away what
  the earlier stages trained. Key order: the stage's config file, the curriculum's
  ``overrides``, the stage's ``overrides``, then from the command line ``overrides.key=value``
  (every stage) and ``STAGE.key=value``.
* Everything is checked before anything trains: every stage config loads (ConfigError naming
  the stage and the key otherwise), names a model, a tokenizer and its data, the files of the
  stages that will train exist, all stages share ``tp`` and ``device`` (one launch, one
  layout), and a stage another one starts from saves its final/.
* A stage is done when its ``final/`` is complete and ``{output_dir}/{name}/curriculum_done.json``
  matches: the stage's fully resolved train config (less ``output_dir``, a chained
  ``init_from`` and the keys that cannot change the weights: ``log_every``, ``tensorboard``,
  ``profile_steps``, ``keep_last``, ``checkpoint_async``) and a digest of the done-stamp of the
  stage it starts from. A done stage is skipped on a rerun; when a stage trains again, every
  stage after it does too (its upstream digest changed). A copied or moved curriculum
  directory stays done.
* A stage that trains from scratch starts from an EMPTY stage directory (stale checkpoints of
  another config must not be resumed), and writes ``curriculum_started.json`` first; a
  non-empty stage directory without that file (not the curriculum's) is an error instead. With
  ``resume=True`` a stage whose started-stamp matches (it was stopped midway) continues from
  its latest checkpoint (``train(cfg, resume=True)``); without it, it starts over.
* ``only``: run just these stages (in curriculum order); the stage a selected one starts from
  must be done already (or selected too).
* ``{output_dir}/curriculum.json`` (rank 0, written atomically after every change): per stage
  its name, output dir, config, max_steps, steps, wall seconds, status.
* Distributed (torchrun): every rank runs the same stages in order; rank 0 makes the plan
  (what is done, what resumes) and broadcasts it, writes the stamps, and barriers keep the
  ranks together. The process group is initialised once and kept for all stages.
"""
from __future__ import annotations

import dataclasses
import difflib
import gc
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import model_parallel as mp
from llama_vision.config import ConfigError, config_to_dict, format_value, load_config, load_yaml
from llama_vision.data.sources import expand_urls
from llama_vision.utils.io import atomic_write_text

from .build import load_model_params
from .train_config import TrainConfig
from .trainer import train

__all__ = [
    "CURRICULUM_FILE",
    "CurriculumConfig",
    "DONE_FILE",
    "STARTED_FILE",
    "StageSpec",
    "is_curriculum_file",
    "load_curriculum",
    "resolve_stages",
    "run_curriculum",
]

CURRICULUM_FILE = "curriculum.json"
DONE_FILE = "curriculum_done.json"
STARTED_FILE = "curriculum_started.json"

#: Train-config keys a done-stamp does not compare: they cannot change the trained weights.
BOOKKEEPING_KEYS = ("log_every", "tensorboard", "profile_steps", "keep_last", "checkpoint_async")
#: Cleared for a stage started from the previous stage's final/ (unless its overrides set them).
_CHAIN_CLEARED = ("init_text_from", "init_vision_from")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


@dataclass
class StageSpec:
    """One stage of the curriculum: a train config and its overrides."""

    name: str = ""
    """The stage's name: its directory under output_dir and the prefix of its command-line
    overrides (STAGE.key=value). Letters, digits, _ and -."""
    config: str = ""
    """The stage's train config (configs/train/*.yaml), relative to the curriculum file."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Train-config keys set for this stage, as a nested mapping ({optim: {lr: 1e-5}}) or
    dotted keys ({optim.lr: 1e-5}); mappings merge key by key, lists are replaced."""
    cli: list[str] = field(default_factory=list, init=False)
    """key=value overrides of this stage from the command line (STAGE.key=value, prefix
    removed), applied last."""


@dataclass
class CurriculumConfig:
    """An ordered list of training stages, each started from the previous stage's final/."""

    output_dir: str = "runs/curriculum"
    """The curriculum's directory: stage NAME trains into output_dir/NAME; curriculum.json."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Train-config keys set for every stage (before each stage's own overrides), e.g.
    {tokenizer: ..., data: {num_workers: 8}}; on the command line overrides.key=value."""
    stages: list[StageSpec] = field(default_factory=list)
    """The stages, in training order: [{name, config, overrides}, ...]."""
    source: Optional[str] = field(default=None, init=False)
    """The file the curriculum was read from (stage configs are relative to it)."""
    cli: list[str] = field(default_factory=list, init=False)
    """key=value overrides of every stage from the command line (overrides.key=value,
    prefix removed), applied after the files' overrides, before the stage's own."""


# --------------------------------------------------------------------------- loading


def is_curriculum_file(path: str | os.PathLike) -> bool:
    """A config file with a top-level `stages:` key is a curriculum."""
    return "stages" in load_yaml(path)


def load_curriculum(path: str | os.PathLike, overrides: Sequence[str] = ()) -> CurriculumConfig:
    """Read a curriculum file. `overrides`: `STAGE.key=value` (a train-config key of that
    stage) or a curriculum key (`output_dir=...`, `overrides.key=value`)."""
    raw = load_yaml(path)
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"curriculum {path}: `stages` must be a non-empty list of {{name, config, overrides}}")
    names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    top, per_stage = [], {}
    curriculum_keys = [f.name for f in dataclasses.fields(CurriculumConfig) if f.init]
    every = []
    for item in overrides:
        key = item.partition("=")[0]
        head = key.split(".", 1)[0].strip()
        if head in names and "." in key:
            per_stage.setdefault(head, []).append(item.split(".", 1)[1])
        elif head == "overrides" and "." in key:
            every.append(item.split(".", 1)[1])
        elif head in curriculum_keys:
            top.append(item)
        elif head in names:
            raise ConfigError(f"override {item!r}: a key of stage '{head}' is set as {head}.KEY=VALUE")
        else:
            valid = [n for n in names if isinstance(n, str)] + curriculum_keys
            close = difflib.get_close_matches(head, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            raise ConfigError(
                f"override {item!r}: '{head}' is neither a stage ({', '.join(map(str, names))}) nor a curriculum key "
                f"({', '.join(curriculum_keys)}){hint} A train-config key of one stage is STAGE.key=value, of every "
                "stage overrides.key=value (--profile N: STAGE.profile_steps=N)")
    cfg = load_config(CurriculumConfig, path, top)
    cfg.source = str(path)
    cfg.cli = every
    base = Path(path).parent
    seen = set()
    for i, stage in enumerate(cfg.stages):
        where = f"curriculum {path}: stages[{i}]"
        if not stage.name:
            raise ConfigError(f"{where}: `name` is not set")
        if not _NAME.match(stage.name) or stage.name in curriculum_keys:
            raise ConfigError(f"{where}: bad stage name {stage.name!r} (letters, digits, _ and -; not one of "
                              f"{', '.join(curriculum_keys)})")
        if stage.name in seen:
            raise ConfigError(f"{where}: stage name {stage.name!r} is used twice")
        seen.add(stage.name)
        if not stage.config:
            raise ConfigError(f"{where} ('{stage.name}'): `config` (the stage's train config file) is not set")
        stage.config = str(base / stage.config)  # absolute paths stay as they are
        stage.cli = per_stage.pop(stage.name, [])
    if per_stage:  # a top-level override replaced `stages`
        raise ConfigError(f"overrides for unknown stage(s) {sorted(per_stage)}: stages are {[s.name for s in cfg.stages]}")
    return cfg


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """{a: {b: 1}, "c.d": 2} -> [("a.b", 1), ("c.d", 2)] (non-empty mappings are walked into,
    as a YAML include merges them)."""
    out = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, dotted + "."))
        else:
            out.append((dotted, value))
    return out


def _override_items(mapping: dict) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in _flatten(mapping)]


def _final_dir(cur: CurriculumConfig, stage: StageSpec) -> Path:
    return Path(cur.output_dir) / stage.name / "final"


def resolve_stages(cur: CurriculumConfig) -> tuple[list[TrainConfig], list[Optional[int]]]:
    """Every stage's resolved TrainConfig, and the index of the stage each one starts from
    (None: it starts from its own init). Structural checks of the module docstring; raises
    ConfigError naming the stage and key."""
    cfgs: list[TrainConfig] = []
    chain: list[Optional[int]] = []
    finals = {_final_dir(cur, s).resolve(): i for i, s in enumerate(cur.stages)}
    for i, stage in enumerate(cur.stages):
        where = f"curriculum stage '{stage.name}' ({stage.config})"
        items = _override_items(cur.overrides) + _override_items(stage.overrides) + list(cur.cli) + list(stage.cli)
        keys = {item.partition("=")[0].strip() for item in items}
        heads = {k.split(".", 1)[0] for k in keys}
        if "output_dir" in heads:
            raise ConfigError(f"{where}: `output_dir` is set by the curriculum ({Path(cur.output_dir) / stage.name}); "
                              "set the curriculum's output_dir instead")
        chained = i > 0 and "init_from" not in heads
        forced = [f"output_dir={Path(cur.output_dir) / stage.name}"]
        if chained:
            forced.append(f"init_from={_final_dir(cur, cur.stages[i - 1])}")
            forced += [f"{k}=null" for k in _CHAIN_CLEARED if k not in heads]
        try:
            cfg = load_config(TrainConfig, stage.config, items + forced)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        source = i - 1 if chained else None
        if not chained and cfg.init_from:
            source = finals.get(Path(cfg.init_from).resolve())
            if source is not None and source >= i:
                raise ConfigError(f"{where}: init_from is the final/ of stage '{cur.stages[source].name}', which "
                                  "does not run before it")
        _check_stage(cfg, where)
        cfgs.append(cfg)
        chain.append(source)
    for i, source in enumerate(chain):
        if source is not None and not cfgs[source].save_final:
            raise ConfigError(f"curriculum stage '{cur.stages[source].name}': save_final is false, but stage "
                              f"'{cur.stages[i].name}' starts from its final/")
    for key in ("tp", "device"):
        values = {getattr(c, key) for c in cfgs}
        if len(values) > 1:
            per = ", ".join(f"{s.name}: {getattr(c, key)}" for s, c in zip(cur.stages, cfgs))
            raise ConfigError(f"curriculum: every stage must use the same `{key}` (one launch, one process layout); "
                              f"got {per}")
    return cfgs, chain


def _check_stage(cfg: TrainConfig, where: str) -> None:
    """What every stage must name (files are checked later, for the stages that train)."""
    try:
        load_model_params(cfg.model)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"{where}: model: {e}") from None
    if not cfg.tokenizer:
        raise ConfigError(f"{where}: tokenizer is not set")
    data = cfg.data
    if data.sources and data.paths:
        raise ConfigError(f"{where}: data.sources and data.paths are both set (a mixture lists its paths per "
                          "source: set data.paths: [] next to data.sources)")
    if not data.sources and not data.paths:
        raise ConfigError(f"{where}: data.paths is empty (and no data.sources)")
    for j, src in enumerate(data.sources):
        if not src.paths:
            raise ConfigError(f"{where}: data.sources[{j}].paths is empty")


def _check_files(cfg: TrainConfig, where: str, produced: set[Path]) -> None:
    """The files a stage reads exist (`produced`: final/ dirs earlier stages will write)."""
    if not Path(cfg.tokenizer).exists():
        raise ConfigError(f"{where}: tokenizer: {cfg.tokenizer} not found")
    for key in ("init_from", "init_text_from", "init_vision_from", "resume_from"):
        path = getattr(cfg, key)
        if path and Path(path).resolve() not in produced and not Path(path).exists():
            raise ConfigError(f"{where}: {key}: {path} not found")
    groups = [("data.paths", cfg.data.paths), ("data.eval_paths", cfg.data.eval_paths)]
    groups += [(f"data.sources[{j}].paths", s.paths) for j, s in enumerate(cfg.data.sources)]
    for key, patterns in groups:
        if patterns:
            try:
                expand_urls(patterns)
            except FileNotFoundError:
                raise ConfigError(f"{where}: {key}: no file matches {patterns}") from None


# --------------------------------------------------------------------------- stamps


def _comparable(config: dict, chained: bool) -> dict:
    drop = {"output_dir", *BOOKKEEPING_KEYS, *(("init_from",) if chained else ())}
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in drop}))


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _matches(stamp: Optional[dict], expected: dict, chained: bool) -> bool:
    return (stamp is not None and stamp.get("stage") == expected["stage"] and stamp.get("upstream") == expected["upstream"]
            and isinstance(stamp.get("config"), dict) and _comparable(stamp["config"], chained) == _comparable(expected["config"], chained))


def _final_complete(stage_dir: Path) -> bool:
    return (stage_dir / "final" / "params.json").is_file()


# --------------------------------------------------------------------------- running


@dataclass
class _Step:
    action: str  # "skip" (done), "resume", "train" (from scratch), "unselected"
    valid: bool  # its final/ is up to date once this run reaches the next stage


def _plan(cur: CurriculumConfig, cfgs: list[TrainConfig], chain: list[Optional[int]], selected: set[str],
          resume: bool) -> list[_Step]:
    """What each stage will do (rank 0; reads the stamps). ConfigError when a selected stage
    starts from a stage that is neither done nor selected, or a file is missing."""
    plan: list[_Step] = []
    for i, (stage, cfg) in enumerate(zip(cur.stages, cfgs)):
        source = chain[i]
        stage_dir = Path(cfg.output_dir)
        if source is not None and not plan[source].valid:
            up = cur.stages[source]
            if stage.name in selected:
                raise ConfigError(f"curriculum stage '{stage.name}' starts from stage '{up.name}''s final/ "
                                  f"({_final_dir(cur, up)}), which is missing or out of date (not trained, or its "
                                  f"config changed since): run '{up.name}' too (--stages {up.name},{stage.name})")
            plan.append(_Step("unselected", False))
            continue
        upstream_trains = source is not None and plan[source].action in ("train", "resume")
        expected = None if upstream_trains else _expected(cur, cfgs, chain, i)
        chained = source is not None
        if expected is not None and _final_complete(stage_dir) and _matches(_read_json(stage_dir / DONE_FILE), expected, chained):
            plan.append(_Step("skip", True))
        elif stage.name not in selected:
            plan.append(_Step("unselected", False))
        elif resume and expected is not None and _matches(_read_json(stage_dir / STARTED_FILE), expected, chained):
            plan.append(_Step("resume", True))
        else:
            plan.append(_Step("train", True))
    produced = {_final_dir(cur, s).resolve() for s, p in zip(cur.stages, plan) if p.action in ("train", "resume")}
    for stage, cfg, p in zip(cur.stages, cfgs, plan):
        where = f"curriculum stage '{stage.name}' ({stage.config})"
        if p.action in ("train", "resume"):
            _check_files(cfg, where, produced)
        stage_dir = Path(cfg.output_dir)
        if p.action == "train" and stage_dir.is_dir() and any(stage_dir.iterdir()) and not (stage_dir / STARTED_FILE).is_file():
            # A stage trained from scratch empties its directory: only one the curriculum made.
            raise ConfigError(f"{where}: {stage_dir} exists and was not written by a curriculum (no {STARTED_FILE}); "
                              "move it away or choose another output_dir")
    return plan


def _expected(cur: CurriculumConfig, cfgs: list[TrainConfig], chain: list[Optional[int]], i: int) -> dict:
    """The stamp stage i must carry to count as done now (its upstream's done-stamp read)."""
    source = chain[i]
    upstream = None
    if source is not None:
        path = Path(cfgs[source].output_dir) / DONE_FILE
        upstream = _digest(path) if path.is_file() else "missing"
    return {"stage": cur.stages[i].name, "upstream": upstream, "config": config_to_dict(cfgs[i])}


class _Report:
    """curriculum.json (rank 0 writes it)."""

    def __init__(self, cur: CurriculumConfig, cfgs: list[TrainConfig], write: bool):
        self.path = Path(cur.output_dir) / CURRICULUM_FILE
        self.write_enabled = write
        self.head = {"curriculum": cur.source, "output_dir": cur.output_dir}
        self.stages = [{"name": s.name, "output_dir": c.output_dir, "config": s.config, "init_from": c.init_from,
                        "max_steps": c.max_steps, "steps": None, "wall_s": None, "status": "pending"}
                       for s, c in zip(cur.stages, cfgs)]

    def update(self, i: int, **values) -> None:
        self.stages[i].update(values)
        if self.write_enabled:
            text = json.dumps({**self.head, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": self.stages}, indent=1)
            atomic_write_text(self.path, text + "\n")


def run_curriculum(cur: CurriculumConfig, resume: bool = False, only: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the curriculum's stages in order (see the module docstring); returns
    curriculum.json's per-stage entries. `only`: names of the stages to run."""
    names = [s.name for s in cur.stages]
    if only is not None:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(f"--stages: unknown stage(s) {unknown}; the curriculum's stages are {names}")
    selected = set(names if only is None else only)
    cfgs, chain = resolve_stages(cur)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or cfgs[0].tp > 1:  # what Trainer does; once for every stage (it is idempotent)
        mp.init_model_parallel(cfgs[0].tp, device=mp.process_device(cfgs[0].device))
    rank = int(os.environ.get("RANK", "0"))
    found = None
    if rank == 0:
        try:
            found = ("ok", _plan(cur, cfgs, chain, selected, resume))
        except ConfigError as e:  # every rank must stop, not wait
            found = ("error", str(e))
    status, plan = mp.broadcast_object(found)
    if status == "error":
        raise ConfigError(plan)
    report = _Report(cur, cfgs, write=rank == 0)
    for i, (stage, cfg, step) in enumerate(zip(cur.stages, cfgs, plan)):
        stage_dir = Path(cfg.output_dir)
        if step.action == "skip":
            done = _read_json(stage_dir / DONE_FILE) or {}
            report.update(i, status="skipped (done)", steps=done.get("steps"), wall_s=done.get("wall_s"))
            continue
        if step.action == "unselected":
            report.update(i, status="not selected")
            continue
        expected = None
        if rank == 0:
            expected = _expected(cur, cfgs, chain, i)
            if step.action == "train":  # no stale checkpoints of another config to resume from
                shutil.rmtree(stage_dir, ignore_errors=True)
                stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stage_dir / STARTED_FILE, json.dumps(expected, indent=1) + "\n")
        report.update(i, status="resuming" if step.action == "resume" else "running")
        mp.barrier()
        t0 = time.perf_counter()
        try:
            result = train(cfg, resume=step.action == "resume")
        except BaseException as e:
            report.update(i, status="failed", wall_s=round(time.perf_counter() - t0, 3), error=f"{type(e).__name__}: {e}")
            raise
        wall = round(time.perf_counter() - t0, 3)
        steps = int(result.get("step", cfg.max_steps))
        del result
        if rank == 0:
            stamp = {**expected, "steps": steps, "wall_s": wall, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "run": uuid.uuid4().hex}
            atomic_write_text(stage_dir / DONE_FILE, json.dumps(stamp, indent=1) + "\n")
        report.update(i, status="resumed" if step.action == "resume" else "trained", steps=steps, wall_s=wall)
        mp.barrier()
        gc.collect()  # the stage's model and optimizer before the next stage builds its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return report.stages
