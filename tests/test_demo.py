"""tools/demo.py --quick --fusion both end to end (subprocess): metrics.json, loss plots,
the cross-attention vs projector comparison, data and stage reuse."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
KEYS = (
    "image_caption_accuracy",
    "video_direction_accuracy",
    "control_image_caption_accuracy",
    "control_video_direction_accuracy",
    "decoder_unchanged",
    "wall_s",
)


def _run(workdir: Path, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools/demo.py"), "--workdir", str(workdir), "--quick", "--fusion", "both"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def test_demo_quick_end_to_end_and_reuse(tmp_path):
    work = tmp_path / "demo"
    t0 = time.time()
    proc = _run(work, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - t0 < 300

    metrics = json.loads((work / "metrics.json").read_text())
    for key in KEYS:
        assert key in metrics, key
    for key in KEYS[:4]:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["decoder_unchanged"] is True
    assert metrics["wall_s"] > 0
    for key in ("video_direction_forced_choice_accuracy", "control_video_direction_forced_choice_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert len(metrics["loss_plots"]) == 4  # stage 0, image, video, image (projector)
    # The side-by-side table: both arms on the same frozen trunk, each decoder untouched.
    arms = metrics["fusion_comparison"]
    assert set(arms) == {"cross_attention", "projector"}
    assert arms["cross_attention"]["decoder_tokens_per_image"] == 1 and arms["projector"]["decoder_tokens_per_image"] == 64
    for arm in arms.values():
        assert arm["decoder_unchanged"] is True and 0.0 <= arm["image_caption_accuracy"] <= 1.0
        assert arm["prefill_ms_per_image"] > 0 and arm["image_stage_train_wall_s"] > 0
    assert arms["cross_attention"]["image_caption_accuracy"] == metrics["image_caption_accuracy"]
    projector = json.loads((work / "eval" / "images_projector" / "model" / "results.json").read_text())["tasks"]
    assert projector["shapes_image_captions"]["score"] == arms["projector"]["image_caption_accuracy"]
    assert "| decoder tokens per image | 1 | 64 |" in proc.stdout
    for png in metrics["loss_plots"]:
        assert Path(png).exists() and Path(png).stat().st_size > 0
    assert (work / "data" / "tokenizer.model").exists()
    assert "ground truth:" in proc.stdout
    # The scores come from the evaluation harness (one scoring path): its results.json.
    harness = {(kind, run): json.loads((work / "eval" / kind / run / "results.json").read_text())["tasks"]
               for kind in ("images", "videos") for run in ("model", "control")}
    assert harness["images", "model"]["shapes_image_captions"]["score"] == metrics["image_caption_accuracy"]
    assert harness["images", "control"]["shapes_image_captions"]["score"] == metrics["control_image_caption_accuracy"]
    assert harness["videos", "model"]["shapes_video_captions"]["score"] == metrics["video_direction_accuracy"]
    assert harness["videos", "model"]["shapes_video_forced_choice"]["score"] == metrics["video_direction_forced_choice_accuracy"]

    # A second run reuses the data, the tokenizer and the finished stages.
    tok_mtime = (work / "data" / "tokenizer.model").stat().st_mtime
    proc2 = _run(work, timeout=180)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    assert "data reused" in proc2.stdout
    assert (work / "data" / "tokenizer.model").stat().st_mtime == tok_mtime
    metrics2 = json.loads((work / "metrics.json").read_text())
    assert metrics2["data_wall_s"] < metrics["data_wall_s"] + 5
    assert metrics2["decoder_unchanged"] is True


def test_demo_help():
    proc = subprocess.run([sys.executable, str(REPO / "tools/demo.py"), "--help"], capture_output=True, text=True, cwd=str(REPO))
    assert proc.returncode == 0
    for flag in ("--workdir", "--seed", "--quick", "--skip-video", "--steps-scale", "--fusion"):
        assert flag in proc.stdout
