"""The demo pipeline's pieces in-process: the stage-0 text corpus and stage reuse keys."""
from __future__ import annotations

import json
from pathlib import Path

from llama_vision.demo import pipeline
from llama_vision.demo.pipeline import DemoOptions, prepare_data, run_stage


def _is_video_caption(text: str) -> bool:
    return " moves " in text


def test_text_corpus_interleaves_video_captions(tmp_path):
    # Stage 0 reads less than an epoch through a 512-row shuffle buffer: if the corpus were
    # sorted by kind (all image captions, then all video captions), it would never see a
    # video sentence and stage 2 would have to teach the frozen decoder their grammar.
    opts = DemoOptions(workdir=str(tmp_path), n_train_images=400, n_test_images=4, n_train_videos=40, n_test_videos=4)
    data = prepare_data(opts)
    rows = [json.loads(line)["caption"] for line in Path(data["text_captions"]).read_text().splitlines()]
    kinds = [_is_video_caption(r) for r in rows]
    assert sum(kinds) >= 40 and not all(kinds)
    share = sum(kinds) / len(kinds)
    for start in range(0, len(rows), len(rows) // 4):
        quarter = kinds[start : start + len(rows) // 4]
        assert abs(sum(quarter) / len(quarter) - share) < 0.1, (start, sum(quarter), len(quarter))
    # Deterministic in the seed: a rebuild from the same data gives the same corpus.
    Path(data["stamp"]).unlink()
    again = prepare_data(opts)
    assert [json.loads(line)["caption"] for line in Path(again["text_captions"]).read_text().splitlines()] == rows


def test_run_stage_reuse_key_includes_dependencies(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, check, cwd):
        calls.append(cmd)
        final = out / "final"
        final.mkdir(parents=True, exist_ok=True)
        (final / "params.json").write_text("{}")

    monkeypatch.setattr(pipeline.subprocess, "run", fake_run)
    config = tmp_path / "stage.yaml"
    config.write_text("stage: text\n")
    dep = tmp_path / "stamp.json"
    dep.write_text('{"corpus": 1}')
    out = tmp_path / "stage0"
    logs: list[str] = []
    run_stage(config, out, ["max_steps=3"], logs.append, (dep,))
    assert len(calls) == 1
    assert run_stage(config, out, ["max_steps=3"], logs.append, (dep,)) == 0.0  # reused
    assert len(calls) == 1 and any("reusing" in line for line in logs)
    dep.write_text('{"corpus": 2}')  # the data it trained on changed: train again
    run_stage(config, out, ["max_steps=3"], logs.append, (dep,))
    assert len(calls) == 2
    run_stage(config, out, ["max_steps=4"], logs.append, (dep,))  # so do changed overrides
    assert len(calls) == 3
