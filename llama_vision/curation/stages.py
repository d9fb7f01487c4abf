"""The stage table: for each configured stage, what runs during the per-shard scan (a
batch function or an actor class, with its Ray resources), whether its verdict is known
per sample or needs the whole corpus, and which of its columns the report and the output
metadata use.

Per-sample stages decide during the scan (``<stage>__reason``); the decision is applied
afterwards in YAML order together with the global ones:

=====================  =========  ==============================================
stage                  decides    scan step
=====================  =========  ==============================================
caption_rules          sample     text_rules.caption_rules
resolution             sample     image_stages.resolution
clip_score             sample*    image_stages.ClipImageEmbedder (actor)
phash_dedup            corpus     image_stages.phash_signals -> dedup.phash_duplicates
semantic_dedup         corpus     (CLIP embeddings) -> dedup.semantic_duplicates
concept_resample       corpus     resample.match_concepts -> resample.balanced_keep
ocr                    --         image_stages.TesseractOcr (actor; metadata only)
video_limits           sample     video_stages.video_limits
text_overlay           sample     video_stages.TextOverlayOcr (actor)
video_text_similarity  sample*    video_stages.ClipVideoScorer (actor)
motion                 sample     video_stages.motion
=====================  =========  ==============================================

(*) with ``keep_fraction`` instead of ``threshold`` the decision is global (a quantile).
The two image CLIP stages share one embedding pass, placed at the first of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import image_stages, resample, text_rules, video_stages
from .batches import column, reason_column
from .config import CurationConfig

GLOBAL_STAGES = ("phash_dedup", "semantic_dedup", "concept_resample")


@dataclass(frozen=True)
class ScanStep:
    """One ``Dataset.map_batches`` of the scan."""

    label: str
    fn: Any  # a batch function, or an actor class (constructed once per actor)
    kwargs: dict = field(default_factory=dict)  # fn_kwargs, or the actor's constructor kwargs
    actor: bool = False
    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0


def decides_per_sample(stage) -> bool:
    """True when the stage's verdict is a per-sample ``<stage>__reason`` column."""
    if stage.name in GLOBAL_STAGES or stage.name == "ocr":
        return False
    return getattr(stage, "keep_fraction", None) is None


# Stages whose scan step is one batch function run as Ray tasks (the model-backed ones,
# actor pools, are built in scan_steps).
_TASK_STEPS = {
    "caption_rules": text_rules.caption_rules,
    "resolution": image_stages.resolution,
    "video_limits": video_stages.video_limits,
    "motion": video_stages.motion,
    "phash_dedup": image_stages.phash_signals,
    "concept_resample": resample.match_concepts,
}


def scan_steps(cfg: CurationConfig) -> list[ScanStep]:
    """decode, then each stage's scan step in YAML order. ``prior`` (the reason columns of
    the per-sample stages before a step) lets a step skip rows already rejected."""
    steps = [ScanStep("decode_images", image_stages.decode_images)] if cfg.modality == "image" else [
        ScanStep("decode_videos", video_stages.decode_videos, kwargs={"frames": cfg.frames})]
    prior: list[str] = []
    clip_done = False
    for stage in cfg.stages:
        kw = {"cfg": stage, "prior": tuple(prior)}
        name = stage.name
        if name in _TASK_STEPS:
            steps.append(ScanStep(name, _TASK_STEPS[name], kwargs=kw))
        elif name in ("clip_score", "semantic_dedup"):
            if not clip_done:
                score = next((s for s in cfg.stages if s.name == "clip_score"), None)
                steps.append(ScanStep(
                    "clip", image_stages.ClipImageEmbedder, actor=True,
                    kwargs={"clip": cfg.clip, "score_stage": score.name if score else None,
                            "threshold": score.threshold if score else None, "prior": tuple(prior)},
                    concurrency=cfg.clip.concurrency, num_cpus=cfg.clip.num_cpus, num_gpus=cfg.clip.num_gpus))
                clip_done = True
        elif name == "video_text_similarity":
            steps.append(ScanStep(
                name, video_stages.ClipVideoScorer, actor=True,
                kwargs={"clip": cfg.clip, "stage": name, "threshold": stage.threshold, "prior": tuple(prior)},
                concurrency=cfg.clip.concurrency, num_cpus=cfg.clip.num_cpus, num_gpus=cfg.clip.num_gpus))
        elif name == "ocr":
            steps.append(ScanStep(name, image_stages.TesseractOcr, actor=True, kwargs=kw,
                                  concurrency=stage.concurrency, num_cpus=stage.num_cpus))
        elif name == "text_overlay":
            steps.append(ScanStep(name, video_stages.TextOverlayOcr, actor=True, kwargs=kw,
                                  concurrency=stage.concurrency, num_cpus=stage.num_cpus))
        else:  # pragma: no cover -- config.STAGE_CONFIGS and this table list the same stages
            raise KeyError(name)
        if decides_per_sample(stage):
            prior.append(reason_column(name))
    return steps


def score_column(stage) -> str | None:
    """The per-sample score a stage's histogram shows."""
    return {
        "clip_score": column("clip_score", "score"),
        "video_text_similarity": column("video_text_similarity", "score"),
        "motion": column("motion", "score"),
        "text_overlay": column("text_overlay", "fraction"),
        "ocr": column("ocr", "text_fraction"),
    }.get(stage.name)


def score_threshold(stage) -> float | None:
    """The line drawn on the histogram (None for a global quantile: the report has it)."""
    return {
        "clip_score": lambda s: s.threshold,
        "video_text_similarity": lambda s: s.threshold,
        "motion": lambda s: s.min_motion,
        "text_overlay": lambda s: s.max_text_fraction,
    }.get(stage.name, lambda s: None)(stage)


def metadata_columns(stage) -> dict[str, str]:
    """{output JSON key: column} a kept sample carries into its ``.json`` member."""
    return {
        "clip_score": {"clip_score": column("clip_score", "score")},
        "video_text_similarity": {"video_text_similarity": column("video_text_similarity", "score")},
        "motion": {"motion_score": column("motion", "score")},
        "text_overlay": {"text_fraction": column("text_overlay", "fraction")},
        "ocr": {"ocr_text": column("ocr", "text")},
        "phash_dedup": {"phash": column("phash_dedup", "phash")},
    }.get(stage.name, {})


def compact_columns(cfg: CurationConfig) -> list[str]:
    """Columns the corpus-wide decisions and the report read from every scanned shard
    (small per sample: no media, no embeddings)."""
    cols = ["shard_id", "index", "skip", "message", "uid", column("decode", "seconds")]
    for stage in cfg.stages:
        name = stage.name
        if decides_per_sample(stage):
            cols.append(reason_column(name))
        if score_column(stage):
            cols.append(score_column(stage))
        if name == "phash_dedup":
            cols += [column(name, "phash"), column(name, "digest"), column(name, "valid")]
        if name == "concept_resample":
            cols.append(column(name, "concepts"))
        seconds = column(timing_label(name), "seconds")
        if seconds not in cols:
            cols.append(seconds)
    return cols


def timing_label(name: str) -> str:
    """The ``<label>__seconds`` column a stage's scan time is recorded under (the two
    image CLIP stages share the ``clip`` pass)."""
    return "clip" if name in ("clip_score", "semantic_dedup") else name


def in_flight_columns() -> tuple[str, ...]:
    """Columns that exist only between scan steps (decoded frames), never written."""
    return video_stages.FRAME_COLUMNS


__all__ = [
    "GLOBAL_STAGES",
    "ScanStep",
    "compact_columns",
    "decides_per_sample",
    "in_flight_columns",
    "metadata_columns",
    "scan_steps",
    "score_column",
    "score_threshold",
]
