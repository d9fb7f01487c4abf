"""The curation run on Ray Data: scan every input shard, decide over the corpus, write.

1. **Scan** (Ray Data, one streaming job over the input shards not yet done):
   ``from_items(shards) -> map_batches(read) -> map_batches(decode) -> one map_batches per
   stage (functions as tasks, model stages as actor pools that load their model once, on
   GPU with num_gpus) -> map_batches(write_parts)``. Every row of every shard ends up in
   the per-shard cache (curation.parts) with its per-sample signals and verdicts; a shard
   whose rows are all there is committed with a done marker. **Resume**: a rerun skips
   committed shards and rescans the others from scratch.
2. **Decide** (curation.decide; driver + Ray): the stages in YAML order over the rows still alive:
   per-sample verdicts from the cache, corpus-wide decisions (exact/near/semantic
   duplicates, concept resampling, keep-fraction quantiles) recomputed from the cached
   signals on every run, so they always see the whole corpus, wherever a duplicate lives.
3. **Write** (curation.write; Ray Data over the shards): one output WebDataset shard per input shard
   (``shards/000003.tar`` from input 3; kept samples in input order) and its per-sample
   decisions (``samples/000003.parquet``); then report.json and the plots (curation.report).

Determinism: rows are identified by (input shard position, row position), every decision
is a function of the cached rows in that order and the seed (random draws are hashes of
(seed, sample uid)), and the reader's batches -- hence the model batches -- are cut the
same way on every run, so the output does not depend on Ray's scheduling.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from llama_vision.config import ConfigError
from llama_vision.utils.io import atomic_write_text

from . import parts as cache
from .checks import validate_files
from .config import CurationConfig
from .decide import decide, load_corpus
from .io import expand_inputs, read_shard_batches
from .layout import OutputLayout, progress_bar
from .report import build_report, write_plots
from .stages import in_flight_columns, scan_steps
from .write import write_outputs


# --------------------------------------------------------------------------- Ray


def init_ray(cfg: CurationConfig, address: str | None) -> None:
    """Connect to ``address`` (``auto`` = the cluster ``ray start`` made on this machine),
    else start a local Ray with ``cfg.num_cpus`` CPUs; an already initialised Ray (an
    application or a test that owns it) is used as it is."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, _system_config=local_ray_system_config(cfg.num_cpus))


def local_ray_system_config(num_cpus: int | None) -> dict:
    """Settings of the local Ray: keep a few idle workers beyond one per CPU. By default
    Ray kills idle workers over ``num_cpus`` whenever actors (the model stages, the
    shuffle's aggregators) take CPU slots, so every later job restarts its workers and
    re-imports torch (seconds each on a small machine)."""
    cpus = num_cpus or os.cpu_count() or 1
    return {"num_workers_soft_limit": 2 * cpus + 2}


def _data_context(progress: bool) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.verbose_stats_logs = False
    if not progress:  # --no-progress: also no per-operator execution logs
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _read(batch: dict[str, np.ndarray], modality: str, batch_size: int):
    """map_batches generator over ONE input shard (batch_size=1 on the shard list)."""
    for shard_id, path in zip(batch["shard_id"], batch["path"]):
        yield from read_shard_batches({"shard_id": int(shard_id), "path": str(path)}, modality, batch_size)


# --------------------------------------------------------------------------- 1. scan


def _check_run_file(layout: OutputLayout, cfg: CurationConfig, shards: list[str]) -> None:
    """A work dir belongs to one (config, input list): refuse to mix caches."""
    run_file = layout.work / "run.json"
    want = {"fingerprint": cfg.fingerprint(), "shards": [os.path.abspath(s) for s in shards]}
    if run_file.is_file():
        have = json.loads(run_file.read_text())
        if have != want:
            what = "stages/config" if have.get("fingerprint") != want["fingerprint"] else "input shard list"
            raise ConfigError(
                f"{layout.root} holds a scan made with a different {what}; use another --output, "
                f"or delete {layout.work} to start over")
        return
    layout.work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps(want, indent=1) + "\n")


def scan(cfg: CurationConfig, shards: list[str], pending: list[int], layout: OutputLayout, progress: bool) -> None:
    """Step 1 over the ``pending`` shard ids (see the module docstring)."""
    import ray.data

    if not pending:
        return
    for shard_id in pending:
        cache.reset_shard(layout.work, shard_id)
    items = [{"shard_id": i, "path": shards[i]} for i in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read, fn_kwargs={"modality": cfg.modality, "batch_size": cfg.batch_size},
                        batch_size=1, batch_format="numpy")
    for step in scan_steps(cfg):
        # batch_size=None: a batch is a block as the reader cut it (rows of one shard), so
        # model batches are the same on every run whatever Ray's scheduling.
        if step.actor:
            ds = ds.map_batches(step.fn, fn_constructor_kwargs=step.kwargs, batch_size=None, batch_format="numpy",
                                concurrency=step.concurrency, num_cpus=step.num_cpus, num_gpus=step.num_gpus)
        else:
            ds = ds.map_batches(step.fn, fn_kwargs=step.kwargs, batch_size=None, batch_format="numpy")
    ds = ds.map_batches(cache.write_parts, batch_size=None, batch_format="numpy",
                        fn_kwargs={"work": str(layout.work), "fingerprint": cfg.fingerprint(),
                                   "skip_columns": in_flight_columns()})
    committed: set[int] = set()
    with progress_bar(len(pending), "scan", progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for shard_id, done in zip(batch["shard_id"], batch["done"]):
                if done and int(shard_id) not in committed:
                    committed.add(int(shard_id))
                    bar.update(1)
    missing = [i for i in pending if not cache.is_done(layout.work, i)]
    if missing:  # cannot happen unless a part went missing under us
        raise RuntimeError(f"scan finished but shards {missing[:5]} were not committed")


# --------------------------------------------------------------------------- the run


def run_curation(cfg: CurationConfig, inputs: str | Sequence[str], output: str | os.PathLike, *,
                 ray_address: str | None = None, progress: bool = True) -> dict:
    """Curate ``inputs`` (shard patterns, see curation.io) into ``output``; returns the
    report (also written to ``output/report.json``). Resumes a killed run in the same
    ``output``."""
    t0 = time.perf_counter()
    validate_files(cfg)
    try:
        shards = expand_inputs(list(inputs) if not isinstance(inputs, str) else inputs)
    except FileNotFoundError as exc:  # nothing at all matched: the user's pattern is wrong
        raise ConfigError(f"--input: {exc}") from None
    layout = OutputLayout(Path(output))
    _check_run_file(layout, cfg, shards)
    init_ray(cfg, ray_address)
    _data_context(progress)
    pending = [i for i in range(len(shards)) if not cache.is_done(layout.work, i)]
    scan(cfg, shards, pending, layout, progress)
    t1 = time.perf_counter()
    corpus = load_corpus(cfg, layout, len(shards))
    decisions, outcomes = decide(cfg, corpus, layout, len(shards))
    t2 = time.perf_counter()
    kept = write_outputs(cfg, len(shards), corpus, decisions, layout, progress)
    t3 = time.perf_counter()
    plots = write_plots(cfg, corpus, outcomes, decisions.reason, layout)
    report = build_report(cfg, shards, pending, corpus, outcomes, kept, layout, plots,
                          timing={"scan_s": t1 - t0, "decide_s": t2 - t1, "write_s": t3 - t2})
    report["timing"]["report_s"] = time.perf_counter() - t3
    report["timing"]["total_s"] = time.perf_counter() - t0
    atomic_write_text(layout.report, json.dumps(report, indent=1, sort_keys=False) + "\n")
    return report


__all__ = ["init_ray", "local_ray_system_config", "run_curation", "scan"]
