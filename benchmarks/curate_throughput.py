#!/usr/bin/env python
"""Curation throughput on CPU: samples/s per core of the model-free stages, the CLIP stage
and OCR, through the real pipeline (llama_vision.curation.run_curation on a local Ray).

Data: the shapes world's image shards (llama_vision.data.synthetic.shapes: 112-448 px
JPEGs of 1-3 shapes with captions; ``--samples`` images in shards of 256), generated into
``--workdir`` (the clip configuration reads the first ``--clip-samples`` of them: a ViT-B/32
does a few images per second per core). Each configuration runs configs/curate/image.yaml restricted to some stages
(``--stages``), from scratch into its own output folder:

* ``model_free``: caption_rules, resolution, phash_dedup, concept_resample (tasks only);
* ``clip``: clip_score with an open_clip ViT-B-32 of random weights (the architecture of
  image.yaml; written once to a local safetensors file, nothing downloaded), one actor
  with all CPUs but one, threshold -1 so that no sample is dropped;
* ``ocr``: the ocr stage (tesseract, one actor).

Reported per configuration: samples read, wall seconds of the whole run (Ray start not
included: one Ray for all), end-to-end samples/s and samples/s per core (``--cpus`` of the
local Ray), and per stage the summed worker-seconds the pipeline records (``report.json``:
``worker_seconds``) as samples per worker-second, i.e. what one core does in the stage
function itself, without scheduling and I/O. The 1-minute load average before and after
each configuration is recorded: other processes' load slows every figure.

  .venv/bin/python benchmarks/curate_throughput.py --samples 2048 --clip-samples 512 --cpus 2 --out /tmp/curate_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "model_free": ["caption_rules", "resolution", "phash_dedup", "concept_resample"],
    "clip": ["clip_score"],
    "ocr": ["ocr"],
}


def prepare_data(workdir: Path, n: int) -> str:
    from llama_vision.data.synthetic.shapes import generate_shapes_world

    info = generate_shapes_world(workdir / "data", n_train_images=n, n_test_images=0, n_train_videos=0,
                                 n_test_videos=0, seed=0, shard_size=256, progress=False)
    return info["image_shards"]


def random_vit_b32(workdir: Path) -> Path:
    """ViT-B-32 with open_clip's random init, as a local weights file (reused)."""
    path = workdir / "vit_b32_random.safetensors"
    if not path.exists():
        import open_clip
        from safetensors.torch import save_file

        model = open_clip.create_model("ViT-B-32", pretrained=None)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--clip-samples", type=int, default=512,
                        help="the clip configuration reads only the first shards holding this many samples")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    parser.add_argument("--workdir", default="/tmp/curate_throughput")
    parser.add_argument("--out", default=None, help="write the JSON here (else stdout only)")
    args = parser.parse_args(argv)

    import ray

    from llama_vision.curation import load_curation_config, run_curation, select_stages
    from llama_vision.curation.pipeline import local_ray_system_config

    workdir = Path(args.workdir)
    shards = prepare_data(workdir, args.samples)
    weights = random_vit_b32(workdir)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             _system_config=local_ray_system_config(args.cpus))
    actor_cpus = max(1, args.cpus - 1)
    results = []
    for name in args.configs.split(","):
        overrides = [f"clip.weights={weights}", f"clip.num_cpus={actor_cpus}", "clip_score.threshold=-1",
                     f"ocr.num_cpus={actor_cpus}"]
        cfg = select_stages(load_curation_config(ROOT / "configs" / "curate" / "image.yaml", overrides), CONFIGS[name])
        out = workdir / f"out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        inputs = shards[: max(1, -(-args.clip_samples // 256))] if name == "clip" else shards
        report = run_curation(cfg, inputs, out, progress=False)
        wall = time.perf_counter() - start
        n = report["read"]["samples"]
        stages = {s["name"]: {"worker_seconds": s["worker_seconds"],
                              "samples_per_worker_second": round(s["input"] / s["worker_seconds"], 1)
                              if s["worker_seconds"] else None} for s in report["stages"]}
        decode = report["read"]["worker_seconds"]
        row = {"config": name, "stages": CONFIGS[name], "samples": n, "wall_s": round(wall, 2),
               "samples_per_s": round(n / wall, 1), "samples_per_s_per_core": round(n / wall / args.cpus, 1),
               "decode_samples_per_worker_second": round(n / decode, 1) if decode else None,
               "stage_throughput": stages, "timing": report["timing"],
               "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        results.append(row)
        print(json.dumps(row), flush=True)
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
           "processor": platform.processor(), "nproc": os.cpu_count(), "ray_cpus": args.cpus,
           "python": platform.python_version(), "ray": ray.__version__, "samples": args.samples, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
