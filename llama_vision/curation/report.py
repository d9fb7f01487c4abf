"""report.json, score histograms and contact sheets of removed samples.

``report.json``::

    read:    samples, usable, skipped {reason: n}, skip_examples {reason: [message, ...]},
             worker_seconds (decoding)
    stages:  [{name, decides (sample | corpus | metadata), input, kept, removed,
               removed_by_reason {reason: n}, worker_seconds (summed over Ray workers),
               global_seconds (corpus-wide decision), score {column, threshold, n, mean,
               p5, p50, p95}, histogram, contact_sheet (paths relative to the output),
               details (duplicate pairs, concept counts, the keep-fraction cut)}]
    output:  samples, shards, pattern (brace pattern of the written shards)
    resume:  shards_cached (taken from an earlier run), shards_scanned
    timing:  scan_s, decide_s, write_s, report_s, total_s

Plots (matplotlib, Agg): ``plots/<stage>_hist.png`` (scores of the samples that reached
the stage, kept vs removed, threshold line) and ``plots/<stage>_removed.png`` (the first
removed samples in corpus order with reason and caption).
"""

from __future__ import annotations

import io
import textwrap
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from llama_vision.config import config_to_dict
from llama_vision.utils.io import atomic_write_bytes

from . import parts as cache
from .batches import column
from .stages import score_column, score_threshold, timing_label

if TYPE_CHECKING:  # pragma: no cover
    from .decide import Corpus, StageOutcome
    from .layout import OutputLayout


def _score_summary(values: np.ndarray, threshold) -> dict:
    v = values[np.isfinite(values)]
    if not len(v):
        return {"n": 0, "threshold": threshold}
    p5, p50, p95 = np.percentile(v, [5, 50, 95])
    return {"n": int(len(v)), "threshold": threshold, "mean": round(float(v.mean()), 5),
            "p5": round(float(p5), 5), "p50": round(float(p50), 5), "p95": round(float(p95), 5)}


def _reached(corpus: "Corpus", outcomes: list["StageOutcome"], upto: int) -> np.ndarray:
    """bool [n]: rows alive when stage ``upto`` started."""
    alive = np.asarray([s == "" for s in corpus.get("skip")], dtype=bool)
    for out in outcomes[:upto]:
        alive &= ~np.isin(corpus.gid, out.removed_gids)
    return alive


def histogram_png(path, name: str, scores: np.ndarray, removed: np.ndarray, threshold) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    finite = np.isfinite(scores)
    bins = np.histogram_bin_edges(scores[finite], bins=40) if finite.any() else 10
    ax.hist([scores[finite & ~removed], scores[finite & removed]], bins=bins, stacked=True,
            color=["#4c8c4a", "#c0392b"], label=["kept", "removed"])
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_title(f"{name}: {int(finite.sum())} samples")
    ax.set_xlabel(name)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _thumbnail(data: bytes, size: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image.thumbnail((size, size))
    except Exception:  # noqa: BLE001 -- a removed sample's picture is only illustration
        image = Image.new("RGB", (size, size), (60, 60, 60))
    return image


def contact_sheet_png(path, title: str, tiles: list[tuple[bytes, str, str]], size: int = 96, columns: int = 6) -> None:
    """tiles: (encoded image, reason, caption) -> a grid with the reason and the caption's
    start under each thumbnail."""
    font = ImageFont.load_default()
    cell_w, text_h = size + 8, 40
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * cell_w, 18 + rows * (size + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), title, fill=(0, 0, 0), font=font)
    for k, (data, why, caption) in enumerate(tiles):
        x, y = (k % columns) * cell_w + 4, 18 + (k // columns) * (size + text_h)
        thumb = _thumbnail(data, size)
        sheet.paste(thumb, (x, y))
        draw.text((x, y + size + 1), why[:18], fill=(170, 30, 30), font=font)
        for j, line in enumerate(textwrap.wrap(caption or "(no caption)", 17)[:2]):
            draw.text((x, y + size + 13 + 12 * j), line, fill=(40, 40, 40), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _removed_tiles(layout: "OutputLayout", gids: np.ndarray, why: np.ndarray, video: bool) -> list[tuple]:
    """(picture, reason, caption) of the removed samples ``gids`` (sorted), read from the
    scan cache: the image itself, or a video's middle-frame thumbnail."""
    picture = "thumb" if video else "media"
    tiles = []
    for shard_id in np.unique(gids >> 32):
        mine = (gids >> 32) == shard_id
        table = cache.read_shard_table(layout.work, int(shard_id), ["index", picture, "text"])
        index = cache.column_numpy(table, "index")
        rows = {int(i): r for r, i in enumerate(index)}
        for gid, reason in zip(gids[mine], why[mine]):
            r = rows[int(gid & 0xFFFFFFFF)]
            tiles.append((table.column(picture)[r].as_py(), str(reason), table.column("text")[r].as_py()))
    return tiles


def write_plots(cfg, corpus: "Corpus", outcomes: list["StageOutcome"], reason: np.ndarray, layout: "OutputLayout") -> dict:
    """Histograms and contact sheets per stage; returns {stage: {"histogram", "contact_sheet"}}.
    ``reason``: object [n], every row's removal reason in corpus order."""
    layout.plots.mkdir(parents=True, exist_ok=True)
    plots: dict[str, dict] = {}
    for k, (stage, out) in enumerate(zip(cfg.stages, outcomes)):
        entry: dict = {}
        col = score_column(stage)
        if col is not None and col in corpus.columns:
            reached = _reached(corpus, outcomes, k)
            removed = np.isin(corpus.gid, out.removed_gids)
            scores = np.asarray(corpus.columns[col], np.float64)
            path = layout.plots / f"{stage.name}_hist.png"
            histogram_png(path, col, scores[reached], removed[reached], score_threshold(stage))
            entry["histogram"] = str(path.relative_to(layout.root))
        if out.removed:
            gids = np.sort(out.removed_gids)[: cfg.thumbnails_per_stage]
            why = reason[np.searchsorted(corpus.gid, gids)]
            tiles = _removed_tiles(layout, gids, why, cfg.modality == "video")
            path = layout.plots / f"{stage.name}_removed.png"
            contact_sheet_png(path, f"{stage.name}: {out.removed} removed (first {len(tiles)} shown)", tiles)
            entry["contact_sheet"] = str(path.relative_to(layout.root))
        plots[stage.name] = entry
    return plots


def build_report(cfg, shards: list[str], pending: list[int], corpus: "Corpus", outcomes: list["StageOutcome"],
                 kept: int, layout: "OutputLayout", plots: dict, timing: dict) -> dict:
    """The report.json content (see the module docstring); ``pending``: the shard ids this
    run scanned (the others came from the cache)."""
    skip = corpus.get("skip")
    skipped = Counter(s for s in skip.tolist() if s)
    examples: dict[str, list[str]] = {}
    for s, m in zip(skip.tolist(), corpus.get("message").tolist()):
        if s and len(examples.setdefault(s, [])) < 3:
            examples[s].append(str(m)[:300])
    seconds = {name: float(np.nansum(v)) for name, v in corpus.columns.items() if name.endswith("__seconds")}
    stages = []
    for k, (stage, out) in enumerate(zip(cfg.stages, outcomes)):
        col = score_column(stage)
        entry = {
            "name": stage.name,
            "decides": out.decides,
            "input": out.input,
            "kept": out.input - out.removed,
            "removed": out.removed,
            "removed_by_reason": dict(sorted(out.reasons.items())),
            "worker_seconds": round(seconds.get(column(timing_label(stage.name), "seconds"), 0.0), 4)
            if k == _first_with_label(cfg, timing_label(stage.name)) else 0.0,
            "global_seconds": round(out.seconds, 4),
            **plots.get(stage.name, {}),
        }
        if col is not None and col in corpus.columns:
            reached = _reached(corpus, outcomes, k)
            thr = score_threshold(stage)
            entry["score"] = {"column": col, **_score_summary(np.asarray(corpus.columns[col], np.float64)[reached], thr)}
        if out.details:
            entry["details"] = out.details
        stages.append(entry)
    n_shards = len(shards)
    return {
        "modality": cfg.modality,
        "seed": cfg.seed,
        "config": config_to_dict(cfg),
        "inputs": {"shards": n_shards, "first": shards[0] if shards else None, "last": shards[-1] if shards else None},
        "read": {"samples": len(corpus), "usable": int(len(corpus) - sum(skipped.values())),
                 "skipped": dict(sorted(skipped.items())), "skip_examples": examples,
                 "worker_seconds": round(seconds.get("decode__seconds", 0.0), 4)},
        "stages": stages,
        "output": {"samples": kept, "shards": n_shards, "pattern": layout.pattern(n_shards) if n_shards else None,
                   "dir": str(layout.shards)},
        "resume": {"shards_cached": n_shards - len(pending), "shards_scanned": len(pending)},
        "timing": {k: round(v, 3) for k, v in timing.items()},
    }


def _first_with_label(cfg, label: str) -> int:
    """Index of the first stage whose scan time is recorded under ``label`` (the shared
    CLIP pass is reported once, on the first CLIP stage)."""
    return next(i for i, s in enumerate(cfg.stages) if timing_label(s.name) == label)
