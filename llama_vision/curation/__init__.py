"""Data curation at scale on Ray Data (Llama 3 paper, section 7): quality filters,
de-duplication, concept resampling and OCR for image-text pairs; text rules, overlaid-text,
video-text similarity and motion filters for video-text pairs.

    from llama_vision.curation import load_curation_config, run_curation

    cfg = load_curation_config("configs/curate/image.yaml", ["clip.weights=clip.safetensors"])
    report = run_curation(cfg, "shards/{000000..000099}.tar", "curated/")

Modules, one job each: config (YAML -> per-stage dataclasses), io (shard readers, the
WebDataset writer), text_rules / image_stages / video_stages / resample / dedup (the stage
functions and actor classes), clip_model / ocr (the models), stages (what runs where),
parts (the resumable per-shard cache), layout (the output folder), pipeline (the run: Ray
and the scan), decide (the corpus-wide decisions), write (the output shards), report
(report.json and plots). tools/curate.py is the command line; docs/curation.md the guide.
"""
from .config import CurationConfig, load_curation_config, select_stages
from .pipeline import run_curation

__all__ = ["CurationConfig", "load_curation_config", "run_curation", "select_stages"]
