"""tools/infer_image.py and tools/infer_video.py on a tiny Meta checkpoint: one process and
torchrun TP=2 print the same greedy answer; batch JSONL mode; clear errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from _helpers import ROOT, tiny_model

TOOLS = ROOT / "tools"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, request):
    from _helpers import SHARED

    tok = SHARED / "reference" / "tokenizer.model"
    if not tok.exists():
        pytest.skip("needs ../shared/reference/tokenizer.model")
    from llama_vision.checkpoint import save_meta_checkpoint
    from llama_vision.model.video import VideoConfig, add_video_adapters

    d = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(seed=3, vocab_size=128256, dim=64, n_heads=4, n_kv_heads=2)
    add_video_adapters(model, VideoConfig(num_frames=4, frames_per_group=2, tiles_per_frame=1, n_latents=2, depth=1, heads=4, every_k_image_layers=1))
    save_meta_checkpoint(model, d / "m", num_shards=2)
    shutil.copyfile(tok, d / "m" / "tokenizer.model")
    Image.new("RGB", (60, 30), (250, 10, 10)).save(d / "red.png")
    Image.new("RGB", (20, 50), (10, 10, 250)).save(d / "blue.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return d


def _run(args, nproc=1, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []) + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def _answer(stdout: str) -> str:
    return [line for line in stdout.splitlines() if line.startswith("answer:")][0]


def test_infer_image_tp2_equals_single_process(ckpt):
    args = [str(TOOLS / "infer_image.py"), "--ckpt", str(ckpt / "m"), "--image", str(ckpt / "red.png"),
            "--image", str(ckpt / "blue.png"), "--prompt", "Compare the two images.", "--dtype", "fp32", "--max-new-tokens", "8"]
    one = _run(args)
    two = _run(args, nproc=2)
    assert "image 0: 60x30 px" in one.stdout and "tiles of 28 px" in one.stdout
    assert _answer(one.stdout) == _answer(two.stdout)
    assert two.stdout.count("answer:") == 1  # only rank 0 prints


def test_infer_image_jsonl_batch_and_errors(ckpt, tmp_path):
    reqs = tmp_path / "req.jsonl"
    reqs.write_text("\n".join(json.dumps(r) for r in [
        {"image": str(ckpt / "red.png"), "prompt": "Colour?"},
        {"images": [str(ckpt / "broken.jpg")], "prompt": "Colour?"},
        {"prompt": "No image at all."},
    ]) + "\n")
    out = tmp_path / "ans.jsonl"
    _run([str(TOOLS / "infer_image.py"), "--ckpt", str(ckpt / "m"), "--jsonl", str(reqs), "--output", str(out),
          "--dtype", "fp32", "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "answer" in rows[0] and "answer" in rows[2]
    assert "broken.jpg" in rows[1]["error"]
    bad = _run([str(TOOLS / "infer_image.py"), "--ckpt", str(ckpt / "m"), "--image", str(ckpt / "broken.jpg"), "--prompt", "x"], check=False)
    assert bad.returncode == 2 and "broken.jpg" in bad.stderr and "Traceback" not in bad.stderr


def test_infer_video(ckpt, tmp_path):
    import numpy as np

    from llama_vision.data.synthetic.shapes import draw_motion_video, write_mp4

    frames = draw_motion_video(np.random.default_rng(0), "left", num_frames=6, size=(56, 56), colour="red", kind="circle")
    write_mp4(frames, tmp_path / "clip.mp4")
    out = _run([str(TOOLS / "infer_video.py"), "--ckpt", str(ckpt / "m"), "--video", str(tmp_path / "clip.mp4"),
                "--prompt", "Where does it move?", "--dtype", "fp32", "--max-new-tokens", "4"])
    assert "4 frames sampled" in out.stdout and "answer:" in out.stdout
    (tmp_path / "zero.mp4").write_bytes(b"")
    bad = _run([str(TOOLS / "infer_video.py"), "--ckpt", str(ckpt / "m"), "--video", str(tmp_path / "zero.mp4")], check=False)
    assert bad.returncode == 2 and "zero.mp4" in bad.stderr and "Traceback" not in bad.stderr
