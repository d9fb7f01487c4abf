"""docs/extending.md runs: its `# doc-test: <name>` code blocks are executed (from the
repository root, blocks of one name in one namespace), the YAML config block loads as a
TrainConfig, and the documented audio adapter learns a toy task with only its own
parameters trainable."""
from __future__ import annotations

import re

import pytest
import torch

from _helpers import ROOT

DOC = ROOT / "docs" / "extending.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def doc_blocks(name: str, lang: str = "python") -> list[str]:
    """The fenced `lang` blocks of the doc whose first line is `# doc-test: <name>`."""
    marker = f"# doc-test: {name}"
    return [body for kind, body in BLOCK.findall(DOC.read_text()) if kind == lang and body.startswith(marker + "\n")]


def run_blocks(name: str) -> dict:
    blocks = doc_blocks(name)
    assert blocks, f"no `{name}` doc-test blocks in {DOC}"
    namespace: dict = {"__name__": f"doc_{name}"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[{name} block {i}]", "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the doc's paths are relative to the repository root


def test_video_blocks_run():
    ns = run_blocks("video")
    model = ns["model"]
    assert "video" in model.modalities and ns["VIDEO"] == 513
    assert any(k.startswith("video_aggregator.") for k in model.state_dict())


def test_config_block_is_a_valid_video_stage(tmp_path):
    from llama_vision.config import load_config
    from llama_vision.training.train_config import TrainConfig

    (block,) = doc_blocks("config", lang="yaml")
    path = tmp_path / "video_pretrain.yaml"
    path.write_text(block)
    cfg = load_config(TrainConfig, path)
    assert cfg.stage == "video_pretrain" and cfg.data.kind == "video_jsonl"
    # lora: on by default, an empty group without a `lora:` block.
    assert vars(cfg.trainable) == {"decoder": False, "vision": False, "adapters": False, "video": True, "lora": True}
    assert (cfg.video.num_frames, cfg.video.frames_per_group, cfg.video.tiles_per_frame) == (16, 16, 4)


def toy_audio_batch(gen: torch.Generator, audio_id: int, batch: int = 8):
    """Class k in 0..3 = energy in mel band k (rows 4k..4k+3); the token after the clip
    must name the class (ids 10..13). Clip lengths vary; padding is noise."""
    labels = torch.randint(0, 4, (batch,), generator=gen)
    lengths = torch.randint(24, 41, (batch, 1), generator=gen)
    mels = 0.3 * torch.randn(batch, 1, 16, 40, generator=gen)
    for i, k in enumerate(labels.tolist()):
        mels[i, 0, 4 * k : 4 * k + 4, : lengths[i, 0]] += 2.0
    tokens = torch.tensor([[audio_id, 1]] * batch)
    return tokens, (mels, lengths), labels + 10


def test_audio_example_trains_only_its_adapter_and_learns():
    ns = run_blocks("audio")
    model, optimizer, audio_id = ns["model"], ns["optimizer"], ns["AUDIO"]
    assert ns["counts"]["audio"] > 0 and sum(v for k, v in ns["counts"].items() if k != "audio") == 0
    model.train()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(30):
        tokens, audio, target = toy_audio_batch(gen, audio_id)
        logits = model(tokens, media_inputs={"audio": audio})[:, 1]
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                owned = name.startswith(("audio_encoder.", "text_model.audio_cross_attention_layers.",
                                         "text_model.placeholder_embeddings.audio."))
                assert (p.grad is not None) == owned, name
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, losses
    # It listens: on fresh clips the right class beats a wrong one (labels rotated by 1).
    model.eval()
    with torch.no_grad():
        tokens, audio, target = toy_audio_batch(gen, audio_id, batch=64)
        logits = model(tokens, media_inputs={"audio": audio})[:, 1]
        right = torch.nn.functional.cross_entropy(logits, target)
        wrong = torch.nn.functional.cross_entropy(logits, (target - 10 + 1) % 4 + 10)
    assert right < wrong - 0.3, (right, wrong)
