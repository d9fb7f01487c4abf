"""Curation configs: a YAML file with run settings and an ordered ``stages:`` list.

::

    modality: image
    seed: 0
    clip: {model_config: tiny_clip.json, weights: tiny_clip.safetensors}
    stages:
      - name: caption_rules
        min_words: 3
      - name: clip_score
        threshold: 0.28

Each ``stages`` entry is a mapping with a ``name`` and that stage's parameters; the name picks
the stage's dataclass (:data:`STAGE_CONFIGS`), which checks the keys and types like every
other config of the project (unknown keys are a :class:`ConfigError` naming
``stages[i].key``, with a did-you-mean). Overrides (``tools/curate.py ... key=value``) use
the stage name as the first part of the key: ``clip_score.threshold=0.3``; other keys are
top-level (``seed=1``, ``clip.weights=/models/clip.safetensors``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from llama_vision.config import ConfigError, apply_override, build_dataclass, config_to_dict, load_yaml

__all__ = [
    "ClipConfig",
    "CurationConfig",
    "FramesConfig",
    "STAGE_CONFIGS",
    "load_curation_config",
    "select_stages",
]

Modality = Literal["image", "video"]

# --------------------------------------------------------------------------- shared sections


@dataclass
class ClipConfig:
    """The open_clip model of the CLIP-backed stages (clip_score, semantic_dedup,
    video_text_similarity), read from local files only: nothing is downloaded."""

    model: Optional[str] = None
    """open_clip architecture name (``ViT-B-32``...; ``open_clip.list_models()``). Exactly one
    of model and model_config."""
    model_config: Optional[Path] = None
    """An open_clip model-config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``) for an
    architecture open_clip does not ship; registered under the file's stem."""
    weights: Optional[Path] = None
    """The model's weights: ``.safetensors``, or a torch file loaded with
    ``weights_only=True`` (never unpickled)."""
    resize_mode: Literal["squash", "shortest", "longest"] = "squash"
    """How images reach the model's square input: ``squash`` keeps the whole picture
    (captions describe all of it), ``shortest`` is open_clip's resize + centre crop."""
    batch_size: int = 64
    """Images per forward pass (the stage's sub-batches; Ray's batches may be larger)."""
    concurrency: int = 1
    """Actors in the pool; each loads the model once."""
    num_gpus: float = 0.0
    """GPUs per actor (0: CPU). With GPUs the model runs on ``cuda``."""
    num_cpus: float = 1.0
    """CPUs each actor reserves; on a small local Ray keep actors' CPUs below the total so
    that the reading/decoding tasks still get one."""


@dataclass
class FramesConfig:
    """How videos are decoded for the video stages (decode errors are counted, never raised)."""

    num_frames: int = 8
    """Frames sampled uniformly over each clip (llama_vision.data.video.load_video)."""
    size: int = 128
    """Frames are resized to size x size for the video stages."""


# --------------------------------------------------------------------------- stage configs


@dataclass
class CaptionRulesConfig:
    """Caption heuristics (images and videos): length, charset, repetition, URLs, file
    names and boilerplate. A caption failing any rule is removed with that rule as reason."""

    name: Literal["caption_rules"] = "caption_rules"
    min_words: int = 3
    """Fewer words than this: ``too_short``."""
    max_words: int = 64
    """More words than this: ``too_long``."""
    min_alpha_fraction: float = 0.6
    """Fewer letters than this fraction of the non-space characters: ``charset``."""
    allowed_scripts: list[str] = field(default_factory=lambda: ["LATIN"])
    """Unicode scripts letters may belong to (a name prefix of the characters'
    ``unicodedata.name``); letters of other scripts count as not alphabetic."""
    max_repeat_fraction: float = 0.5
    """The most frequent word making up more than this fraction of a caption with at least
    four words: ``repetition``."""
    reject_urls: bool = True
    """A URL or a domain name in the caption: ``url``."""
    reject_filenames: bool = True
    """A camera/file name (``IMG_1234.JPG``, ``photo.png``): ``filename``."""
    boilerplate: list[str] = field(default_factory=lambda: [
        r"\bclick here\b", r"\bbuy now\b", r"\bfree shipping\b", r"\ball rights reserved\b",
        r"\bstock (photo|image|footage)\b", r"\blorem ipsum\b", r"\bsubscribe\b", r"\bcopyright\b",
        r"\bdownload\b", r"\bshutterstock\b", r"\bwatermark\b",
    ])
    """Regular expressions (case-insensitive, ``re.search``) of boilerplate text:
    ``boilerplate``."""


@dataclass
class ResolutionConfig:
    """Image size limits (pixels as decoded)."""

    name: Literal["resolution"] = "resolution"
    min_side: int = 64
    """Shorter side below this: ``too_small``."""
    max_side: int = 16384
    """Longer side above this: ``too_large``."""
    max_aspect: float = 3.0
    """long side / short side above this: ``bad_aspect``."""


@dataclass
class ClipScoreConfig:
    """CLIP score (cosine of the image and caption embeddings of the ``clip`` model). Either
    a fixed ``threshold`` or, globally, the best ``keep_fraction`` of the samples that reach
    the stage."""

    name: Literal["clip_score"] = "clip_score"
    threshold: Optional[float] = 0.28
    """Remove samples scoring below this (``low_clip_score``). 0.28 is LAION-400M's value for
    OpenAI's ViT-B/32; other models need their own."""
    keep_fraction: Optional[float] = None
    """Instead of a threshold: keep this fraction of the stage's input, by score (a global
    decision over the whole corpus)."""

    def __post_init__(self):
        if (self.threshold is None) == (self.keep_fraction is None):
            raise ConfigError("clip_score: set exactly one of threshold and keep_fraction")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"clip_score.keep_fraction must be in (0, 1], got {self.keep_fraction}")


@dataclass
class PhashDedupConfig:
    """Exact (identical bytes) and near duplicates (perceptual hash within a Hamming
    distance, imagehash.phash), across the whole corpus; the first sample in corpus order
    (input shard, then position) is kept."""

    name: Literal["phash_dedup"] = "phash_dedup"
    max_distance: int = 4
    """Hashes at most this many bits apart (of 64) are near duplicates."""


@dataclass
class SemanticDedupConfig:
    """SemDeDup: k-means (faiss) over the ``clip`` image embeddings, then inside each
    cluster every sample whose cosine similarity to an earlier one (corpus order) exceeds
    ``1 - epsilon`` is removed."""

    name: Literal["semantic_dedup"] = "semantic_dedup"
    epsilon: float = 0.03
    """Duplicates are closer than cosine similarity 1 - epsilon."""
    num_clusters: int = 1024
    """k-means clusters (capped at one per 40 samples)."""
    kmeans_iterations: int = 20
    kmeans_sample: int = 500_000
    """k-means is fitted on at most this many samples (every n-th in corpus order)."""


@dataclass
class ConceptResampleConfig:
    """MetaCLIP-style balancing: count the samples whose caption contains each concept
    (word n-gram match, lowercase), then keep a sample with probability
    ``min(1, cap / count)`` per matched concept (kept if any draw keeps it)."""

    name: Literal["concept_resample"] = "concept_resample"
    concepts: list[str] = field(default_factory=list)
    """The concept vocabulary (words or multi-word phrases)."""
    concepts_file: Optional[Path] = None
    """Or a text file with one concept per line (added to ``concepts``)."""
    cap: int = 20_000
    """At most about this many samples per concept are kept."""
    keep_unmatched: bool = True
    """Keep samples whose caption matches no concept (MetaCLIP drops them)."""


@dataclass
class OcrConfig:
    """OCR (tesseract, its Debian package ``tesseract-ocr``): the recognised text goes into
    the sample's JSON metadata as ``ocr_text``; no sample is removed."""

    name: Literal["ocr"] = "ocr"
    languages: str = "eng"
    """Tesseract language(s), ``+``-joined (each needs its tesseract-ocr-<lang> package)."""
    psm: int = 11
    """Tesseract page segmentation mode (11: sparse text, as much as possible in no
    particular order -- captions, signs and banners rather than pages)."""
    min_confidence: float = 80.0
    """Words below this confidence (0-100) are ignored (texture read as text scores lower)."""
    upscale: float = 1.0
    """Images are scaled by this before OCR (tesseract needs text ~20 px high)."""
    border: float = 0.4
    """A white margin of this fraction of the image's longer side is added around each
    binarised page (curation.ocr: tesseract misses text that runs to the edge)."""
    concurrency: int = 1
    """Actors in the pool."""
    num_cpus: float = 1.0
    """CPUs each actor reserves (tesseract runs one thread per process)."""


@dataclass
class VideoLimitsConfig:
    """Duration, frame-rate and resolution limits of videos (from the container)."""

    name: Literal["video_limits"] = "video_limits"
    min_duration_s: float = 1.0
    max_duration_s: float = 600.0
    min_fps: float = 4.0
    max_fps: float = 120.0
    min_side: int = 64
    """Shorter side of the frames below this: ``low_resolution``."""
    max_aspect: float = 3.0


@dataclass
class TextOverlayConfig:
    """Overlaid text: the area of OCR word boxes (tesseract) as a fraction of the frame,
    averaged over ``ocr_frames`` of the sampled frames."""

    name: Literal["text_overlay"] = "text_overlay"
    max_text_fraction: float = 0.01
    """Remove videos whose text boxes cover more than this fraction of the frame on
    average (``overlaid_text``)."""
    ocr_frames: int = 4
    """Sampled frames OCR'd per video (spread evenly over the sampled ones)."""
    max_word_height: float = 0.3
    """Words taller than this fraction of the frame are shapes read as letters, not
    overlaid text, and are ignored."""
    languages: str = "eng"
    psm: int = 11
    min_confidence: float = 80.0
    upscale: float = 1.0
    border: float = 0.4
    concurrency: int = 1
    num_cpus: float = 1.0


@dataclass
class VideoTextSimilarityConfig:
    """Contrastive filter: cosine of the mean frame embedding and the caption embedding
    (the ``clip`` model)."""

    name: Literal["video_text_similarity"] = "video_text_similarity"
    threshold: Optional[float] = 0.2
    keep_fraction: Optional[float] = None

    def __post_init__(self):
        if (self.threshold is None) == (self.keep_fraction is None):
            raise ConfigError("video_text_similarity: set exactly one of threshold and keep_fraction")


@dataclass
class MotionConfig:
    """Motion score: mean frame difference or mean optical-flow magnitude (OpenCV
    Farneback) between consecutive sampled frames, per second; low-motion clips are
    removed (``low_motion``)."""

    name: Literal["motion"] = "motion"
    method: Literal["flow", "diff"] = "diff"
    """diff: mean colour change between frames; flow: mean optical-flow magnitude
    (Farneback), which sees little motion inside large uniform regions (the aperture
    problem)."""
    min_motion: float = 0.01
    """In the method's unit: diff, mean per-pixel change (0-1) per second; flow, frame
    diagonals per second (e.g. 0.003)."""
    noise_floor: float = 4.0
    """diff: changes up to this (of 255) are noise, not motion."""


STAGE_CONFIGS: dict[str, type] = {
    "caption_rules": CaptionRulesConfig,
    "resolution": ResolutionConfig,
    "clip_score": ClipScoreConfig,
    "phash_dedup": PhashDedupConfig,
    "semantic_dedup": SemanticDedupConfig,
    "concept_resample": ConceptResampleConfig,
    "ocr": OcrConfig,
    "video_limits": VideoLimitsConfig,
    "text_overlay": TextOverlayConfig,
    "video_text_similarity": VideoTextSimilarityConfig,
    "motion": MotionConfig,
}

#: Which modality each stage applies to.
STAGE_MODALITIES: dict[str, tuple[str, ...]] = {
    "caption_rules": ("image", "video"),
    "concept_resample": ("image", "video"),
    "resolution": ("image",),
    "clip_score": ("image",),
    "phash_dedup": ("image",),
    "semantic_dedup": ("image",),
    "ocr": ("image",),
    "video_limits": ("video",),
    "text_overlay": ("video",),
    "video_text_similarity": ("video",),
    "motion": ("video",),
}

CLIP_STAGES = ("clip_score", "semantic_dedup", "video_text_similarity")


# --------------------------------------------------------------------------- top level


@dataclass
class CurationConfig:
    """A curation run: what the samples are, the stages in order, and run settings."""

    modality: Modality = "image"
    """``image`` (image-text pairs) or ``video`` (video-text pairs)."""
    seed: int = 0
    """Seeds every random choice (resampling draws, k-means); same input + seed = same output."""
    batch_size: int = 64
    """Rows per batch as the shard readers emit them (all of one input shard)."""
    num_cpus: Optional[int] = None
    """CPUs of the local Ray started when there is no ``--ray-address`` (default: all)."""
    thumbnails_per_stage: int = 24
    """Removed samples shown on each stage's contact sheet."""
    clip: ClipConfig = field(default_factory=ClipConfig)
    frames: FramesConfig = field(default_factory=FramesConfig)
    stages: list[Any] = field(default_factory=list)
    """The stages in order, each a mapping with ``name`` and its parameters."""

    def stage(self, name: str):
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def fingerprint(self) -> str:
        """Hash of everything the per-shard scan depends on (modality, decoding, model,
        stages and their parameters): cached shards are reused only under the same one."""
        data = {"modality": self.modality, "frames": config_to_dict(self.frames),
                "clip": {k: v for k, v in config_to_dict(self.clip).items()
                         if k in ("model", "model_config", "weights", "resize_mode")},
                "stages": [config_to_dict(s) for s in self.stages], "batch_size": self.batch_size}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stage_entries(raw: dict, path: Any) -> list[dict]:
    entries = raw.get("stages", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"config key 'stages' in {path}: expected a non-empty list of stages, got {entries!r}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"config key 'stages[{i}]' in {path}: expected a mapping with a 'name', got {entry!r}")
        if entry["name"] not in STAGE_CONFIGS:
            raise ConfigError(f"config key 'stages[{i}].name': unknown stage {entry['name']!r}; "
                              f"stages: {', '.join(STAGE_CONFIGS)}")
    names = [e["name"] for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"config key 'stages': stage(s) listed twice: {', '.join(dup)}")
    return entries


def load_curation_config(path: str | Path, overrides: Sequence[str] = ()) -> CurationConfig:
    """Read a curation YAML (includes allowed, see llama_vision.config) and apply
    ``key=value`` overrides; ``<stage name>.<key>=value`` sets a stage's parameter.

    Raises ConfigError naming the key for unknown stages or keys, wrong types, a stage
    that does not fit the modality, and missing files (the YAML, a concepts file)."""
    raw = load_yaml(path)
    entries = _stage_entries(raw, path)
    by_name = {e["name"]: e for e in entries}
    for item in overrides:
        head, _, rest = item.partition(".")
        if item.split("=", 1)[0].strip() == "stages":
            raise ConfigError(f"override {item!r}: the stage list is the YAML's; choose a subset with --stages "
                              "and set a stage's parameters with <stage>.<key>=value")
        if head in by_name and "=" in rest:
            apply_override(by_name[head], rest)
        elif head in STAGE_CONFIGS and "=" in rest:
            raise ConfigError(f"override {item!r}: stage {head!r} is not in {path}'s stages")
        else:
            apply_override(raw, item)
    top = {k: v for k, v in raw.items() if k != "stages"}
    cfg = build_dataclass(CurationConfig, top, prefix="")
    stages = []
    for i, entry in enumerate(entries):
        try:
            stage = build_dataclass(STAGE_CONFIGS[entry["name"]], entry, prefix=f"stages[{i}].")
        except ConfigError as exc:  # name the stage too: overrides address it by name
            raise ConfigError(f"{exc} (stage '{entry['name']}' in {path})") from None
        if cfg.modality not in STAGE_MODALITIES[stage.name]:
            raise ConfigError(f"config key 'stages[{i}].name': stage {stage.name!r} does not apply to "
                              f"modality {cfg.modality!r} (it is for {', '.join(STAGE_MODALITIES[stage.name])})")
        stages.append(stage)
    cfg.stages = stages
    base = Path(path).parent
    _resolve_paths(cfg, base)
    return cfg


def _resolve_paths(cfg: CurationConfig, base: Path) -> None:
    """Relative file paths in the YAML are relative to the working directory if they exist
    there, else to the YAML's folder (so a config can sit beside its model files)."""

    def resolve(p: Optional[Path]) -> Optional[Path]:
        if p is None or p.is_absolute() or p.exists():
            return p
        return base / p if (base / p).exists() else p

    cfg.clip.model_config = resolve(cfg.clip.model_config)
    cfg.clip.weights = resolve(cfg.clip.weights)
    for stage in cfg.stages:
        if isinstance(stage, ConceptResampleConfig) and stage.concepts_file is not None:
            stage.concepts_file = resolve(stage.concepts_file)
            if not stage.concepts_file.is_file():
                raise ConfigError(f"config key 'concept_resample.concepts_file': file not found: {stage.concepts_file}")
            extra = [line.strip() for line in stage.concepts_file.read_text(encoding="utf-8").splitlines()]
            stage.concepts = list(dict.fromkeys([*stage.concepts, *(c for c in extra if c)]))
            stage.concepts_file = None  # folded into concepts (and so into the fingerprint)


def select_stages(cfg: CurationConfig, names: Sequence[str] | None) -> CurationConfig:
    """The config restricted to ``names`` (``--stages a,b``), kept in YAML order."""
    if not names:
        return cfg
    unknown = [n for n in names if n not in cfg.stage_names]
    if unknown:
        raise ConfigError(f"--stages: {', '.join(unknown)} not in the config's stages ({', '.join(cfg.stage_names)})")
    return dataclasses.replace(cfg, stages=[s for s in cfg.stages if s.name in set(names)])
