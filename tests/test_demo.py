"""tools/demo.py --quick --fusion both end to end (subprocess): metrics.json, loss plots,
the cross-attention vs projector comparison, data and stage reuse."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from examples.shapes_demo.pipeline import scene_line, video_scene_line

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
    assert len(metrics["loss_plots"]) == 5  # stage 0, image, video, image and video (projector)
    # The side-by-side table: both arms on the same frozen trunk, each decoder untouched.
    arms = metrics["fusion_comparison"]
    assert set(arms) == {"cross_attention", "projector"}
    # The projector arm: a contrastively pretrained tower (its wall counted in the arm's), 4 tokens per image.
    assert arms["cross_attention"]["decoder_tokens_per_image"] == 1 and arms["projector"]["decoder_tokens_per_image"] == 4
    assert (work / "tower_clip" / "tower.safetensors").exists() and metrics["tower_clip_wall_s"] > 0
    assert arms["projector"]["image_stage_train_wall_s"] > metrics["stage1_projector_wall_s"]
    for arm in arms.values():
        assert arm["decoder_unchanged"] is True and 0.0 <= arm["image_caption_accuracy"] <= 1.0
        assert arm["prefill_ms_per_image"] > 0 and arm["image_stage_train_wall_s"] > 0
    assert arms["cross_attention"]["image_caption_accuracy"] == metrics["image_caption_accuracy"]
    projector = json.loads((work / "eval" / "images_projector" / "model" / "results.json").read_text())["tasks"]
    assert projector["shapes_image_captions"]["score"] == arms["projector"]["image_caption_accuracy"]
    # Its video stage: OneVision's path on the image stage's checkpoint (4 tokens per frame).
    video = json.loads((work / "eval" / "videos_projector" / "model" / "results.json").read_text())["tasks"]
    assert video["shapes_video_captions"]["score"] == arms["projector"]["video_direction_accuracy"]
    assert video["shapes_video_forced_choice"]["score"] == arms["projector"]["video_direction_forced_choice_accuracy"]
    assert json.loads((work / "stage2_projector" / "final" / "params.json").read_text())["llava"]["video"]["pool"] == "image"
    for arm in arms.values():
        assert 0.0 <= arm["image_caption_accuracy_after_video"] <= 1.0 and arm["video_stage_train_wall_s"] > 0
    assert "| decoder tokens per image | 1 | 4 |" in proc.stdout
    # Stage 0's corpus: every image caption also once with its scene line in the media slot.
    corpus = [json.loads(line) for line in (work / "data" / "text_captions.jsonl").read_text().splitlines()]
    scene_rows = [r for r in corpus if "media_text" in r]
    image_rows = [r for r in scene_rows if " moves " not in r["caption"]]
    assert image_rows and all(r["media_text"] == scene_line(r["caption"]) for r in image_rows)
    # ... and every video caption with its 8 sampled frames' scene lines (32 words).
    video_rows = [r for r in scene_rows if " moves " in r["caption"]]
    assert video_rows and all(len(r["media_text"].split()) == 32 for r in video_rows)
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
    assert "tower_clip: reusing" in proc2.stdout and metrics2["tower_clip_wall_s"] == 0.0


def test_scene_line_names_each_cell_in_pooled_grid_order():
    # Row-major like a 2 x 2 pooled token grid: top left, top right, bottom left, bottom right.
    assert scene_line("a red circle at the top right and a blue square at the bottom left.") == "none redcircle bluesquare none"
    with pytest.raises(ValueError, match="not a shapes-world image caption"):
        scene_line("the red circle moves left.")


def test_video_scene_line_names_the_cell_of_each_sampled_frame():
    # 10 frames, 4 sampled (uniform_indices: 1, 3, 6, 8); the shape moves left along the top.
    centres = [[0.9 - 0.08 * i, 0.3] for i in range(10)]
    row = {"video": "v.mp4", "num_frames": 10, "colour": "red", "kind": "circle", "centres": centres}
    lines = video_scene_line(row, 4).split()
    assert [lines[4 * k:4 * k + 4] for k in range(4)] == [
        ["none", "redcircle", "none", "none"],  # x 0.82
        ["none", "redcircle", "none", "none"],  # x 0.66
        ["redcircle", "none", "none", "none"],  # x 0.42
        ["redcircle", "none", "none", "none"],  # x 0.26
    ]
    row["centres"] = [[0.5, 0.7]] * 10  # on the boundary: the right / bottom cell
    assert video_scene_line(row, 1) == "none none none redcircle"
    with pytest.raises(ValueError, match="needs one centre per frame"):
        video_scene_line({**row, "centres": centres[:3]}, 4)


def test_demo_help():
    proc = subprocess.run([sys.executable, str(REPO / "tools/demo.py"), "--help"], capture_output=True, text=True, cwd=str(REPO))
    assert proc.returncode == 0
    for flag in ("--workdir", "--seed", "--quick", "--skip-video", "--steps-scale", "--fusion"):
        assert flag in proc.stdout
