#!/usr/bin/env python
"""Peak host memory (RSS) of DPO training steps on the CPU, through the real trainer.

Model: the medium random-weight config of ``benchmarks/cpu_vs_hf.py`` (text dim 512, 8 trunk
+ 2 cross-attention layers, Llama 3 vocabulary; ViT width 256, 8 + 2 global layers, 112 px
tiles), float32, trunk frozen, vision encoder + adapters trained (what configs/train/
image_dpo.yaml trains). Data: shapes-world preference pairs (one image per prompt),
micro-batch 2, ``--steps`` optimizer steps. Each run is a fresh process (``ru_maxrss`` is a
high-water mark); we report its RSS after the Trainer is built (model, DPO reference,
optimizer) and its peak over the steps, median over ``--runs``.

  python benchmarks/dpo_step_memory.py --runs 3

Only public APIs (TrainConfig, Trainer) are used, so a copy of this script placed in another
checkout's benchmarks/ measures that version (it imports the checkout it lies in).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(a: argparse.Namespace) -> None:
    import torch

    from llama_vision.config import load_config
    from llama_vision.training.train_config import TrainConfig
    from llama_vision.training.trainer import Trainer

    torch.set_num_threads(a.threads)
    overrides = [
        "stage=dpo", f"model={a.params}", f"tokenizer={a.tokenizer}", f"output_dir={a.out}", f"max_steps={a.steps}",
        "checkpoint_every=100000", "save_final=false", "tensorboard=false", "micro_batch_size=2", "dtype=fp32",
        "data.kind=dpo", f'data.paths=["{a.data}"]', "data.max_seq_len=128", "data.shuffle=false", "data.num_workers=0",
        "trainable.decoder=false", "trainable.vision=true", "trainable.adapters=true", "optim.warmup_steps=1",
    ]
    trainer = Trainer(load_config(TrainConfig, None, overrides))
    built = rss_mib()
    trainer.fit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_params = sum(p.numel() for p in trainer.model.parameters())
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(json.dumps({"rss_after_build_mib": built, "peak_rss_mib": peak, "params": n_params, "trainable": n_train}))


def prepare(workdir: Path) -> tuple[Path, Path]:
    import yaml

    import importlib.util

    from llama_vision.data.synthetic.chat_sets import write_chat_sets

    spec = importlib.util.spec_from_file_location("cpu_vs_hf", ROOT / "benchmarks" / "cpu_vs_hf.py")
    cpu_vs_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_vs_hf)
    PARAMS = cpu_vs_hf.PARAMS  # noqa: N806 - the medium config, shared with that benchmark

    params = workdir / "medium.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    sets = write_chat_sets(workdir / "chat", n=16)
    return params, Path(sets["dpo"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "reference" / "tokenizer.model"),
                   help="a Llama 3 tokenizer.model (the medium config has its 128,256-token vocabulary)")
    p.add_argument("--workdir", default=None, help="where the data and runs go (default: a temp dir)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if not Path(a.tokenizer).is_file():
        p.error(f"tokenizer not found: {a.tokenizer} (pass --tokenizer)")
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="dpo_mem_"))
    workdir.mkdir(parents=True, exist_ok=True)
    params, data = prepare(workdir)
    results = []
    for i in range(a.runs):
        cmd = [sys.executable, __file__, "--worker", f"--params={params}", f"--data={data}", f"--out={workdir / f'run{i}'}",
               f"--tokenizer={a.tokenizer}", f"--steps={a.steps}", f"--threads={a.threads}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {k: statistics.median(r[k] for r in results) for k in results[0]}
    summary.update(runs=a.runs, steps=a.steps, micro_batch_size=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
