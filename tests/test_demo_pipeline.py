"""The demo pipeline's pieces in-process: the stage-0 text corpus, stage reuse keys and
the forced-choice direction score."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import tiny_model
from examples.shapes_demo import pipeline
from examples.shapes_demo.pipeline import DemoOptions, forced_choice_directions, prepare_data, run_stage
from llama_vision.data.synthetic.shapes import DIRECTIONS
from llama_vision.model import zero_gates
from llama_vision.model.video import VideoConfig, add_video_adapters


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
    monkeypatch.setattr(pipeline, "STAGE_FORMAT", pipeline.STAGE_FORMAT + 1)  # and a new layout
    run_stage(config, out, ["max_steps=4"], logs.append, (dep,))
    assert len(calls) == 4


class _WordTokenizer:
    """Whitespace words -> ids (what the demo's word-level SentencePiece model does)."""

    bos_id, eos_id = 1, 2

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = [self.ids.setdefault(w, 3 + len(self.ids)) for w in text.split()]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos


def _tiny_video_model():
    model = tiny_model(seed=5)
    add_video_adapters(model, VideoConfig(num_frames=4, frames_per_group=2, tiles_per_frame=1, n_latents=2, depth=1,
                                          heads=4, every_k_image_layers=1), seed=5)
    with torch.no_grad():  # open the (zero-initialised) video gates so the video matters
        for name, p in model.named_parameters():
            if "video_cross_attention_layers" in name and "gate" in name:
                p.fill_(1.0)
    return model.eval()


def test_forced_choice_directions_matches_scoring_each_caption_alone():
    model, tok = _tiny_video_model(), _WordTokenizer()
    size = model.args.vision_chunk_size
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(3, 1, 4, 1, 3, size, size, generator=g)
    ratios = torch.ones(3, 1, 2, dtype=torch.long)
    frames = torch.tensor([[4], [3], [4]])
    captions = ["the red circle moves left.", "the blue square moves up.", "the green triangle moves down."]
    token = model.modalities["video"].token_id
    picks = forced_choice_directions(model, tok, token, {"video": (videos, ratios, frames)}, captions)

    want = []
    for i, caption in enumerate(captions):
        scores = []
        for d in DIRECTIONS:
            ids = [token, tok.bos_id, *tok.encode(caption.rsplit(" ", 1)[0] + f" {d}.", bos=False, eos=False), tok.eos_id]
            media = {"video": (videos[i : i + 1], ratios[i : i + 1], frames[i : i + 1])}
            with torch.no_grad():
                logits = model(torch.tensor([ids]), media_inputs=media)[0].double()
            scores.append(sum(torch.log_softmax(logits[k], -1)[ids[k + 1]].item() for k in range(1, len(ids) - 1)))
        want.append(DIRECTIONS[max(range(len(DIRECTIONS)), key=scores.__getitem__)])
    assert picks == want

    # With the gates at 0 the video cannot matter: the same caption gets the same pick.
    zero_gates(model)
    same = ["the red circle moves left."] * 3
    assert len(set(forced_choice_directions(model, tok, token, {"video": (videos, ratios, frames)}, same))) == 1


def test_forced_choice_directions_rejects_a_foreign_caption():
    model = _tiny_video_model()
    size = model.args.vision_chunk_size
    media = {"video": (torch.zeros(1, 1, 4, 1, 3, size, size), torch.ones(1, 1, 2, dtype=torch.long), torch.tensor([[4]]))}
    with pytest.raises(ValueError, match="not a shapes-world video caption"):
        forced_choice_directions(model, _WordTokenizer(), model.modalities["video"].token_id, media, ["a red circle at the top left."])
