"""Video-caption training data from a JSONL manifest and from WebDataset shards with .mp4
members: good clips become examples, broken/missing ones are skipped and counted."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from _helpers import SHARED
from llama_vision.data.collate import build_dataloader
from llama_vision.data.sources import WebDatasetSource
from llama_vision.data.video import VideoProcessor
from llama_vision.data.video_dataset import JsonlVideoSource, VideoBatch, VideoCaptionDataset
from llama_vision.data.synthetic.shapes import draw_motion_video, write_mp4
from llama_vision.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    for i, direction in enumerate(["left", "up"]):
        frames = draw_motion_video(np.random.default_rng(i), direction, num_frames=8, size=(56, 56), colour="red", kind="square")
        write_mp4(frames, d / f"c{i}.mp4")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    return d


def _dataset(source):
    tok_path = SHARED / "reference" / "tokenizer.model"
    if not tok_path.exists():
        pytest.skip("needs ../shared/reference/tokenizer.model")
    return VideoCaptionDataset(source, load_tokenizer(tok_path), VideoProcessor(4, 28, 1), video_token_id=128257,
                               max_seq_len=64, shuffle=False)


def _check(ds):
    batches = list(build_dataloader(ds, batch_size=4))
    assert len(batches) == 1 and isinstance(batches[0], VideoBatch)
    b = batches[0]
    assert b.videos.shape == (2, 1, 4, 1, 3, 28, 28) and b.video_frames.tolist() == [[4], [4]]
    assert (b.tokens[:, 0] == 128257).all() and int((b.labels != -100).sum()) > 0
    assert sum(ds.skipped().values()) == 2
    assert torch.isfinite(b.videos).all()


def test_jsonl_manifest(clips):
    rows = [{"video": "c0.mp4", "caption": "the red square moves left."},
            {"video": "c1.mp4", "caption": "the red square moves up."},
            {"video": "broken.mp4", "caption": "the red square moves up."},
            {"video": "gone.mp4", "caption": "the red square moves up."}]
    (clips / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = _dataset(JsonlVideoSource(str(clips / "m.jsonl")))
    _check(ds)
    assert ds.skipped() == {"bad_video": 1, "missing_video": 1}


def test_webdataset_shard_with_mp4(clips, tmp_path):
    shard = tmp_path / "videos-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, name, text in [("a", "c0.mp4", "the red square moves left."), ("b", "c1.mp4", "moves up."),
                                ("c", "broken.mp4", "moves up."), ("d", "broken.mp4", "")]:
            for ext, data in (("mp4", (clips / name).read_bytes()), ("txt", text.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = _dataset(WebDatasetSource(str(shard)))
    _check(ds)
    assert ds.skipped() == {"bad_video": 1, "empty_text": 1}
