"""Video-caption training data: JSONL manifests ``{"video": "clip.mp4", "caption": ...}``
(paths relative to the manifest) or WebDataset shards (``key.mp4`` + ``key.txt``) -> examples ``[<video>] + [bos] + caption + [eos]`` with
the clip decoded by decord, uniformly sampled and tiled per frame.

Corrupt, zero-byte, audio-only or missing files are skipped and counted (``bad_video`` /
``missing_video``) like bad images; training never stops on them.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Sequence

import torch

from .batch import Batch
from .collate import collate_examples
from .datasets import EMPTY_TEXT, ExampleDataset, SkipSample, shifted_labels
from .sources import Record, WebDatasetSource, _JsonlSource
from .tiling import CLIP_MEAN, CLIP_STD, ImageProcessor, normalize_tiles
from .video import VideoLoadError, VideoProcessor

MISSING_VIDEO = "missing_video"
BAD_VIDEO = "bad_video"


class JsonlVideoSource(_JsonlSource):
    """``{"video": "rel.mp4" | ["a.mp4", ...], "caption" | "text": str}`` per line."""

    def _fields(self, obj: dict, root: str) -> dict[str, Any]:
        text = obj.get("caption", obj.get("text"))
        if text is not None and not isinstance(text, str):
            raise ValueError("caption must be a string")
        return {"videos": self._images(obj, root, "video", "videos"), "text": text, "meta": obj}


@dataclass
class VideoBatch(Batch):
    """A Batch plus videos [B, V, F, T, 3, S, S] (float32, or uint8 pixels with
    ``data.tile_dtype: uint8``; absent tiles, padded frames and absent videos exact zeros),
    their tile grids [B, V, 2] and valid frame counts [B, V]."""

    videos: torch.Tensor | None = None
    video_aspect_ratios: torch.Tensor | None = None
    video_frames: torch.Tensor | None = None

    def media_inputs(self) -> dict:
        return {} if self.videos is None else {"video": (self.videos, self.video_aspect_ratios, self.video_frames)}

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor | None = None) -> "VideoBatch":
        """Batch's `_map` (hence `to` and `pin_memory`) over the video tensors too."""
        move = (lambda t: None if t is None else fn(t))  # noqa: E731
        return replace(super()._map(fn, images), videos=move(self.videos),
                       video_aspect_ratios=move(self.video_aspect_ratios), video_frames=move(self.video_frames))

    def normalized(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                   dtype: torch.dtype = torch.float32) -> "VideoBatch":
        """Batch.normalized, and uint8 videos normalised likewise (per frame, like images)."""
        base = super().normalized(mean, std, dtype)
        if self.videos is None or self.videos.dtype != torch.uint8:
            return base
        counts = frame_tile_counts(self.video_aspect_ratios, self.video_frames, self.videos.shape[2])
        return replace(base, videos=normalize_tiles(self.videos, counts, mean, std, dtype))


def frame_tile_counts(aspect_ratios: torch.Tensor, frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Real tiles of every frame slot: int64 [B, V, F] from grids [B, V, 2] and valid frame
    counts [B, V]: tiles_h * tiles_w for the first `frames` frames, 0 after them (the black
    frames of short="pad", and every frame of an absent video, whose count is 0)."""
    tiles = aspect_ratios[..., 0] * aspect_ratios[..., 1]  # [B, V]
    valid = torch.arange(num_frames, device=frames.device) < frames[..., None]  # [B, V, F]
    return torch.where(valid, tiles[..., None], 0)


def collate_video_examples(examples: Sequence[dict], pad_id: int, max_num_tiles: int, image_token_id: int) -> VideoBatch:
    base = collate_examples(examples, pad_id, max_num_tiles, image_token_id)
    per_row = [ex["videos"] for ex in examples]
    v = max(1, max(len(r) for r in per_row))
    if not any(per_row):
        return VideoBatch(**base.__dict__)
    first = next(x for r in per_row for x in r)
    f, t, c, s, _ = first.shape
    videos = torch.zeros(len(examples), v, f, t, c, s, s, dtype=first.dtype)  # uint8 clips stay uint8
    ratios = torch.ones(len(examples), v, 2, dtype=torch.long)
    frames = torch.zeros(len(examples), v, dtype=torch.long)
    for b, ex in enumerate(examples):
        for i, (clip, ar, n) in enumerate(zip(ex["videos"], ex["video_ratios"], ex["video_frames"])):
            videos[b, i] = clip
            ratios[b, i] = torch.tensor(ar)
            frames[b, i] = n
    return VideoBatch(**base.__dict__, videos=videos, video_aspect_ratios=ratios, video_frames=frames)


class VideoCaptionDataset(ExampleDataset):
    def __init__(self, source, tokenizer, processor: VideoProcessor, video_token_id: int, **kwargs):
        super().__init__(source, tokenizer, processor.image_processor, **kwargs)
        self.video_processor = processor
        self.video_token_id = video_token_id

    def collate_fn(self):
        return partial(collate_video_examples, pad_id=self.tokenizer.pad_id,
                       max_num_tiles=self.video_processor.max_num_tiles, image_token_id=self.image_token_id)

    def load_videos(self, refs: Sequence[str | bytes]):
        """Paths (JSONL manifests) or encoded bytes (WebDataset members) -> tiled clips."""
        clips, ratios, frames = [], [], []
        for ref in refs:
            if isinstance(ref, bytes):
                clip, ar, info = self._decode_bytes(ref)
            elif not os.path.isfile(ref):
                raise SkipSample(MISSING_VIDEO, f"video file {ref!r} does not exist")
            else:
                clip, ar, info = self._decode(ref)
            clips.append(clip)
            ratios.append(tuple(ar))
            frames.append(info.valid)
        return clips, ratios, frames

    def _decode(self, path: str):
        try:
            return self.video_processor(path)
        except VideoLoadError as exc:
            raise SkipSample(BAD_VIDEO, str(exc)) from None

    def _decode_bytes(self, data: bytes):
        # decord reads files: spill the tar member to a temporary file for the decode.
        with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
            f.write(data)
            f.flush()
            return self._decode(f.name)

    def build_example(self, record: Record) -> dict:
        text = record.fields.get("text")
        if not isinstance(text, str) or not text.strip():
            raise SkipSample(EMPTY_TEXT, "empty caption")
        tok = self.tokenizer
        videos = record.fields.get("videos") or []
        caption = tok.encode(text.strip(), bos=False, eos=False)
        prefix = [self.video_token_id] * len(videos) + [tok.bos_id]
        tokens = (prefix + caption + [tok.eos_id])[: self.max_seq_len]
        labels = shifted_labels(tokens, ([False] * len(prefix) + [True] * (len(caption) + 1))[: len(tokens)])
        clips, ratios, frames = self.load_videos(videos)
        return {"key": record.key, "tokens": tokens, "labels": labels, "images": [], "aspect_ratios": [],
                "videos": clips, "video_ratios": ratios, "video_frames": frames}


def build_video_dataset(cfg, tokenizer, model_args, dp_rank: int, dp_size: int, loop: bool = True) -> VideoCaptionDataset:
    data, v = cfg.data, cfg.video
    tile_size = data.tile_size or model_args.vision_chunk_size
    processor = VideoProcessor(num_frames=v.num_frames, tile_size=tile_size, max_num_tiles=v.tiles_per_frame,
                               image_processor=ImageProcessor(tile_size, v.tiles_per_frame, output=data.tile_dtype))
    source = WebDatasetSource(data.paths) if data.kind == "video_wds" else JsonlVideoSource(data.paths, data.image_root)
    return VideoCaptionDataset(
        source, tokenizer, processor,
        video_token_id=model_args.vocab_size + 1,
        max_seq_len=min(data.max_seq_len, model_args.max_seq_len), seed=cfg.seed, shuffle=data.shuffle,
        shuffle_buffer=data.shuffle_buffer, rank=dp_rank, world_size=dp_size, loop=loop, block_size=cfg.micro_batch_size,
        split=data.split,
    )
