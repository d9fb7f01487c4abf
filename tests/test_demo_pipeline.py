"""The demo pipeline's pieces in-process: the stage-0 text corpus, stage reuse keys and
the forced-choice direction score (the harness's option log-likelihood)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import tiny_model
from examples.shapes_demo import pipeline
from examples.shapes_demo.pipeline import DemoOptions, direction_choices, direction_index, prepare_data, run_stage
from llama_vision.eval.loglikelihood import continuation_logprobs
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


def test_forced_choice_log_likelihoods_match_scoring_each_caption_alone():
    """The harness's batched continuation log-likelihood (all four direction captions of
    every clip in one forward) == each caption scored alone, by hand."""
    model, tok = _tiny_video_model(), _WordTokenizer()
    size = model.args.vision_chunk_size
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(3, 1, 4, 1, 3, size, size, generator=g)
    ratios = torch.ones(3, 1, 2, dtype=torch.long)
    frames = torch.tensor([[4], [3], [4]])
    captions = ["the red circle moves left.", "the blue square moves up.", "the green triangle moves down."]
    token = model.modalities["video"].token_id
    context = [token, tok.bos_id]
    rows = [(i, c) for i in range(3) for c in direction_choices(captions[i])]
    media = {"video": tuple(t[[i for i, _ in rows]] for t in (videos, ratios, frames))}
    got = continuation_logprobs(model, [context] * len(rows), [tok.encode(c, bos=False, eos=False) for _, c in rows], media)

    for (i, caption), (logp, _) in zip(rows, got):
        ids = [*context, *tok.encode(caption, bos=False, eos=False)]
        one = {"video": (videos[i : i + 1], ratios[i : i + 1], frames[i : i + 1])}
        with torch.no_grad():
            logits = model(torch.tensor([ids]), media_inputs=one)[0].double()
        want = sum(torch.log_softmax(logits[k], -1)[ids[k + 1]].item() for k in range(1, len(ids) - 1))
        assert abs(logp - want) < 1e-4, (caption, logp, want)

    # With the gates at 0 the video cannot matter: the same caption gets the same scores.
    zero_gates(model)
    same = continuation_logprobs(model, [context] * 3, [tok.encode(captions[0], bos=False, eos=False)] * 3,
                                 {"video": (videos, ratios, frames)})
    assert max(x for x, _ in same) - min(x for x, _ in same) < 1e-5


def test_direction_choices_reject_a_foreign_caption():
    assert direction_choices("the red circle moves up.")[direction_index("the red circle moves up.")] == "the red circle moves up."
    with pytest.raises(ValueError, match="not a shapes-world video caption"):
        direction_choices("a red circle at the top left.")
