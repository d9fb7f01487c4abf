"""Data mixtures (data.sources): weights respected within sampling error over 10k samples,
each source read in its own order, resume keeps the mixture position exactly, and a
resume at another layout keeps the weights."""
from __future__ import annotations

import itertools
import json
import math

import pytest

from llama_vision.data.collate import build_dataloader
from llama_vision.data.datasets import CaptionDataset
from llama_vision.data.image import ImageProcessor
from llama_vision.data.mixture import MixtureDataset
from llama_vision.data.sources import JsonlCaptionSource
from llama_vision.tokenizer import load_tokenizer, train_sentencepiece

PROC = ImageProcessor(tile_size=28, max_num_tiles=1)
WEIGHTS = [0.7, 0.2, 0.1]
SIZES = [40, 25, 7]  # the rare source (7 records) has the smallest weight but loops the most often


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("mix_tok") / "tokenizer.model"
    corpus = ["source 0 1 2 record 3 4 5 6 7 8 9 number a red square", "What is this? Yes. No. Hello."] * 50
    return load_tokenizer(train_sentencepiece(corpus, path, vocab_size=400))


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    paths = []
    for s, n in enumerate(SIZES):
        path = root / f"source{s}.jsonl"
        path.write_text("".join(json.dumps({"caption": f"source {s} record {i}"}) + "\n" for i in range(n)))
        paths.append(str(path))
    return paths


def _mixture(tok, manifests, rank=0, world=1):
    parts = [CaptionDataset(JsonlCaptionSource(p), tok, PROC, max_seq_len=16, seed=7 + i, shuffle_buffer=8, rank=rank,
                            world_size=world, loop=True) for i, p in enumerate(manifests)]  # fmt: skip
    return MixtureDataset(parts, WEIGHTS, names=["big", "mid", "rare"], seed=3, rank=rank, world_size=world)


def _source_of(key: str) -> int:
    return int(key.split("source")[1][0])


def test_weights_hold_within_sampling_error_over_10k_samples(tok, manifests):
    keys = [k for b in itertools.islice(build_dataloader(_mixture(tok, manifests), batch_size=50), 200) for k in b.keys]
    n = len(keys)
    assert n == 10_000
    for s, w in enumerate(WEIGHTS):
        share = sum(_source_of(k) == s for k in keys) / n
        sigma = math.sqrt(w * (1 - w) / n)
        assert abs(share - w) < 4 * sigma, (s, share, w)
    # Each source is read in its own epochs: the rare one's 7 records each appear
    # ~10000 * 0.1 / 7 ~ 143 times, all of them in every pass.
    rare = [k for k in keys if _source_of(k) == 2]
    first_pass = rare[:7]
    assert len(set(first_pass)) == 7


def test_resume_keeps_the_mixture_position(tok, manifests):
    full = [b.keys for b in itertools.islice(build_dataloader(_mixture(tok, manifests), batch_size=4, num_workers=2), 30)]
    loader = build_dataloader(_mixture(tok, manifests), batch_size=4, num_workers=2)
    head = [b.keys for b in itertools.islice(loader, 11)]
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    resumed = build_dataloader(_mixture(tok, manifests), batch_size=4, num_workers=2)
    resumed.load_state_dict(state)
    tail = [b.keys for b in itertools.islice(resumed, 19)]
    assert head + tail == full
    assert loader.skipped == {}


def test_resume_at_another_layout_keeps_the_sources_and_weights(tok, manifests):
    states = []
    for rank in range(2):
        loader = build_dataloader(_mixture(tok, manifests, rank, 2), batch_size=5)
        list(itertools.islice(loader, 3))
        states.append(json.loads(json.dumps(loader.state_dict())))
    one = _mixture(tok, manifests)
    loader = build_dataloader(one, batch_size=50)
    loader.load_state_dict(one.resume_state(states, 0, 1, 0))
    keys = [k for b in itertools.islice(loader, 40) for k in b.keys]
    for s, w in enumerate(WEIGHTS):
        share = sum(_source_of(k) == s for k in keys) / len(keys)
        assert abs(share - w) < 4 * math.sqrt(w * (1 - w) / len(keys)), (s, share, w)
    with pytest.raises(ValueError, match="sources"):
        other = MixtureDataset(one.datasets, WEIGHTS, names=["a", "b", "c"])
        other.load_state_dict(states[0])


def test_trainer_reads_a_mixture_and_resumes_it(shapes_corpus, tmp_path):
    """data.sources in a real run: the shapes captions (weight 3) and a small text-only
    caption manifest (weight 1); stop at step 2 + resume == uninterrupted (bitwise)."""
    from _helpers import ROOT, tiny_train_overrides
    from llama_vision.config import load_config
    from llama_vision.training.metrics import read_metrics
    from llama_vision.training.train_config import TrainConfig
    from llama_vision.training.trainer import Trainer

    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"caption": f"a red circle number {i}."}) + "\n" for i in range(5)))
    sources = (f'[{{paths: ["{shapes_corpus["shards"]}"], kind: caption_wds, weight: 3}}, '
               f'{{paths: ["{extra}"], kind: caption_jsonl, weight: 1}}]')

    def cfg(out, **kw):
        over = tiny_train_overrides(shapes_corpus, out, **{"max_steps": 4, "checkpoint_every": 2, "save_final": "false",
                                                           "micro_batch_size": 4, **kw})
        over = [o for o in over if not o.startswith("data.paths=")] + ["data.paths=[]", f"data.sources={sources}"]
        return load_config(TrainConfig, ROOT / "configs/train/tiny_image_pretrain.yaml", over)

    full = Trainer(cfg(tmp_path / "full"))
    full.fit()
    cut = Trainer(cfg(tmp_path / "cut", max_steps=2))
    cut.fit()
    resumed = Trainer(cfg(tmp_path / "cut"))
    resumed.fit(resume=True)
    assert [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    # Packing reads the mixture too: packed rows of both sources' samples.
    packed = Trainer(cfg(tmp_path / "packed", max_steps=1, **{"data.packing": "true"}))
    batch = next(iter(packed.loader))
    assert batch.segment_ids is not None and len(batch.keys) > len(batch)
    with pytest.raises(ValueError, match="data.sources and data.paths are both set"):
        Trainer(load_config(TrainConfig, ROOT / "configs/train/tiny_image_pretrain.yaml",
                            tiny_train_overrides(shapes_corpus, tmp_path / "bad") + [f"data.sources={sources}"]))
