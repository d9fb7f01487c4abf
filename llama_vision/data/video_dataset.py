"""Video-caption training data: JSONL manifests ``{"video": "clip.mp4", "caption": ...}``
(paths relative to the manifest) or WebDataset shards (``key.mp4`` + ``key.txt``) -> examples ``[<video>] + [bos] + caption + [eos]`` with
the clip decoded by decord, uniformly sampled and tiled per frame.

Corrupt, zero-byte, audio-only or missing files are skipped and counted (``bad_video`` /
``missing_video``) like bad images; training never stops on them.

For a LLaVA model with the projector video modality (params ``llava: {video: ...}``:
llama_vision.model.llava.add_llava_video_modality) the frames are one S x S crop each,
resized / normalised like the tower's images (``LlavaImageProcessor.for_video_params``),
the ``<|video|>`` placeholder is expanded to the video's ``tokens_per_item`` and batches are
:class:`ProjectorVideoBatch` (``media_inputs() == {"video": (frames, frame_counts)}``).
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
from .datasets import EMPTY_LABELS, EMPTY_TEXT, ExampleDataset, SkipSample, shifted_labels
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


@dataclass
class ProjectorVideoBatch(Batch):
    """A Batch plus the projector video modality's inputs: frames [B, V, F, 3, S, S]
    (float32; padded frames and absent videos exact zeros) and valid frame counts [B, V]
    (0: no video). (Fields named apart from VideoBatch's: Meta's video FLOP counting and
    media padding do not apply to it.)"""

    frames: torch.Tensor | None = None
    frame_counts: torch.Tensor | None = None

    def media_inputs(self) -> dict:
        return {} if self.frames is None else {"video": (self.frames, self.frame_counts)}

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor | None = None) -> "ProjectorVideoBatch":
        move = (lambda t: None if t is None else fn(t))  # noqa: E731
        return replace(super()._map(fn, images), frames=move(self.frames), frame_counts=move(self.frame_counts))


def collate_projector_video_examples(examples: Sequence[dict], pad_id: int, image_token_id: int,
                                     max_num_tiles: int = 1) -> ProjectorVideoBatch:
    """Examples whose videos are [F, 3, S, S] clips (the projector path) -> ProjectorVideoBatch;
    examples without videos (a mixture's image or text rows, images of up to
    `max_num_tiles` crops) collate beside them."""
    base = collate_examples(examples, pad_id, max_num_tiles, image_token_id)
    per_row = [ex.get("videos") or [] for ex in examples]
    if not any(per_row):
        return ProjectorVideoBatch(**base.__dict__)
    first = next(x for r in per_row for x in r)
    v = max(len(r) for r in per_row)
    frames = torch.zeros(len(examples), v, *first.shape, dtype=first.dtype)
    counts = torch.zeros(len(examples), v, dtype=torch.long)
    for b, ex in enumerate(examples):
        for i, (clip, n) in enumerate(zip(per_row[b], ex.get("video_frames") or [])):
            frames[b, i, :n] = clip[:n]
            counts[b, i] = n
    return ProjectorVideoBatch(**base.__dict__, frames=frames, frame_counts=counts)


class VideoCaptionDataset(ExampleDataset):
    """tokens_per_video(frames) (the projector video modality's `tokens_per_item`): each
    `<|video|>` expanded to that many placeholders and clips [F, 3, S, S] (one crop per
    frame); None: Meta's video modality (one placeholder per video, tiled frames)."""

    def __init__(self, source, tokenizer, processor: VideoProcessor, video_token_id: int,
                 tokens_per_video: Callable[[int], int] | None = None, **kwargs):
        super().__init__(source, tokenizer, processor.image_processor, **kwargs)
        self.video_processor = processor
        self.video_token_id = video_token_id
        self.tokens_per_video = tokens_per_video

    def collate_fn(self, max_num_tiles: int = 1):
        """max_num_tiles (the projector path): the most crops an image of the batch has (a
        mixture's image sources)."""
        if self.tokens_per_video is not None:
            return partial(collate_projector_video_examples, pad_id=self.tokenizer.pad_id, image_token_id=self.image_token_id,
                           max_num_tiles=max_num_tiles)
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
        if self.tokens_per_video is not None:
            return self._projector_example(record, videos, caption)
        prefix = [self.video_token_id] * len(videos) + [tok.bos_id]
        tokens = (prefix + caption + [tok.eos_id])[: self.max_seq_len]
        labels = shifted_labels(tokens, ([False] * len(prefix) + [True] * (len(caption) + 1))[: len(tokens)])
        clips, ratios, frames = self.load_videos(videos)
        return {"key": record.key, "tokens": tokens, "labels": labels, "images": [], "aspect_ratios": [],
                "videos": clips, "video_ratios": ratios, "video_frames": frames}


    def _projector_example(self, record: Record, videos: list, caption: list[int]) -> dict:
        tok = self.tokenizer
        clips, _, frames = self.load_videos(videos)
        prefix = [self.video_token_id] * sum(self.tokens_per_video(n) for n in frames) + [tok.bos_id]
        if len(prefix) >= self.max_seq_len:  # a video's tokens are all or none: nothing left to learn
            raise SkipSample(EMPTY_LABELS, f"the videos take {len(prefix) - 1} tokens, max_seq_len is {self.max_seq_len}")
        tokens = (prefix + caption + [tok.eos_id])[: self.max_seq_len]
        labels = shifted_labels(tokens, ([False] * len(prefix) + [True] * (len(caption) + 1))[: len(tokens)])
        return {"key": record.key, "tokens": tokens, "labels": labels, "images": [], "aspect_ratios": [],
                "videos": [c[:, 0] for c in clips], "video_ratios": [(1, 1)] * len(clips), "video_frames": frames}


def _projector_video_dataset(cfg, tokenizer, model_args, source, dp_rank: int, dp_size: int, loop: bool, seed: int):
    """The projector video modality's dataset (module docstring)."""
    from llama_vision.data.llava_images import LlavaImageProcessor
    from llama_vision.model.llava import LlavaConfig, LlavaVideoConfig, llava_frame_tokens

    data, llava = cfg.data, model_args.llava
    if data.tile_dtype != "float32":
        raise ValueError("data.tile_dtype: uint8 is Meta's tiler's; the LLaVA video modality's frames are float32")
    video = LlavaVideoConfig(**llava["video"])
    _, tower = LlavaConfig.from_params(llava)
    frame = LlavaImageProcessor.for_video_params(llava)
    per_frame = llava_frame_tokens(llava)
    newline = 1 if llava.get("image_newline") else 0
    processor = VideoProcessor(num_frames=cfg.video.num_frames, tile_size=tower.image_size, max_num_tiles=1,
                               image_processor=frame)
    token_id = video.token_id if video.token_id is not None else model_args.vocab_size + 1
    return VideoCaptionDataset(
        source, tokenizer, processor, video_token_id=token_id, tokens_per_video=lambda n: n * per_frame + newline,
        max_seq_len=min(data.max_seq_len, model_args.max_seq_len), seed=seed, shuffle=data.shuffle,
        shuffle_buffer=data.shuffle_buffer, rank=dp_rank, world_size=dp_size, loop=loop, block_size=cfg.micro_batch_size,
        split=data.split,
    )


def has_projector_video(model_args) -> bool:
    """Whether the model's video modality is a LLaVA model's projector path (params
    `llava: {video: ...}`), whose clips collate beside image and text rows."""
    llava = getattr(model_args, "llava", None)
    return llava is not None and llava.get("video") is not None


def build_video_dataset(cfg, tokenizer, model_args, dp_rank: int, dp_size: int, loop: bool = True, files=None,
                        seed: int | None = None) -> VideoCaptionDataset:
    """The video dataset of `files` (anything with `kind`, `paths` and `image_root`: the
    DataConfig, or one of its sources; default cfg.data), shuffled with `seed` (default cfg.seed)."""
    data, v = cfg.data, cfg.video
    files = files or data
    seed = cfg.seed if seed is None else seed
    source = WebDatasetSource(files.paths) if files.kind == "video_wds" else JsonlVideoSource(files.paths, files.image_root)
    if has_projector_video(model_args):
        return _projector_video_dataset(cfg, tokenizer, model_args, source, dp_rank, dp_size, loop, seed)
    tile_size = data.tile_size or model_args.vision_chunk_size
    processor = VideoProcessor(num_frames=v.num_frames, tile_size=tile_size, max_num_tiles=v.tiles_per_frame,
                               image_processor=ImageProcessor(tile_size, v.tiles_per_frame, output=data.tile_dtype))
    return VideoCaptionDataset(
        source, tokenizer, processor,
        video_token_id=model_args.vocab_size + 1,
        max_seq_len=min(data.max_seq_len, model_args.max_seq_len), seed=seed, shuffle=data.shuffle,
        shuffle_buffer=data.shuffle_buffer, rank=dp_rank, world_size=dp_size, loop=loop, block_size=cfg.micro_batch_size,
        split=data.split,
    )
