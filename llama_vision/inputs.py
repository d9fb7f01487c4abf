"""Turning user inputs (token rows, PIL images) into model tensors, with clear errors."""
from __future__ import annotations

from typing import Any

import torch


def pad_rows(rows: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, list[int]]:
    """Right-pad ragged rows -> (tokens [B, max_len], lengths). Padding sits after each row,
    so causal attention keeps it out of every real position."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every row needs at least one token")
    lengths = [len(r) for r in rows]
    out = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device), lengths


def count_placeholders(rows: list[list[int]], ids: set[int]) -> list[int]:
    return [sum(t in ids for t in row) for row in rows]


def check_media_counts(rows: list[list[int]], media: list[list[Any]] | None, ids: set[int], what: str = "image") -> None:
    """Each placeholder token marks one item: counts must match row by row."""
    counts = count_placeholders(rows, ids)
    media = media if media is not None else [[] for _ in rows]
    if len(media) != len(rows):
        raise ValueError(f"{len(rows)} token rows but {len(media)} {what} lists")
    for i, (c, items) in enumerate(zip(counts, media)):
        if c != len(items):
            raise ValueError(f"row {i}: {c} {what} token(s) but {len(items)} {what}(s) given")


def prepare_image_batch(model, rows: list[list[int]], images: list[list[Any]] | None, device=None, processor=None):
    """PIL images per row -> (images [B, N, T, 3, S, S] in the vision encoder's dtype,
    aspect_ratios [B, N, 2]) or None when no row has an image. A `processor` with
    output="uint8" sends the pixels to `device` and normalises them there (same values)."""
    mod = model.modalities["image"]
    check_media_counts(rows, images, mod.placeholder_ids)
    if images is None or not any(images):
        return None
    from llama_vision.data.image import ImageProcessor, stack_aspect_ratios, stack_images

    args = model.args
    processor = processor or ImageProcessor(tile_size=args.vision_chunk_size, max_num_tiles=args.vision_max_num_chunks)
    processed = [[processor(im) for im in row] for row in images]
    tiles, num_tiles = stack_images([[t for t, _ in row] for row in processed], args.vision_max_num_chunks)
    ars = stack_aspect_ratios([[ar for _, ar in row] for row in processed])
    dtype = model.vision_model.vision_projection.weight.dtype
    if tiles.dtype == torch.uint8:  # a cast alone would skip the normalisation
        return processor.normalize(tiles.to(device), num_tiles, dtype), ars.to(device)
    return tiles.to(device=device, dtype=dtype), ars.to(device)


def prepare_images(model, rows: list[list[int]], images: list[list[Any]] | None, device=None):
    """`prepare_image_batch` for either kind of image modality -> (rows, image inputs or
    None). Cross-attention (Meta's): the rows as given. Projector (LLaVA): each row's image
    placeholders expanded to as many as its image has tokens, and the inputs
    (pixel_values [B, N, C, 3, S, S], image_sizes [B, N, 2], (0, 0) for no image)."""
    mod = model.modalities["image"]
    if mod.fusion != "projector":
        return rows, prepare_image_batch(model, rows, images, device=device)
    check_media_counts(rows, images, mod.placeholder_ids)
    if images is None or not any(images):
        return rows, None
    from llama_vision.data.image import stack_aspect_ratios, stack_images
    from llama_vision.data.llava_images import LlavaImageProcessor

    processor = LlavaImageProcessor.for_params(model.args.llava)
    processed = [[processor(im) for im in row] for row in images]
    expanded = _expand_placeholders(rows, [[processor.tokens_per_item(size) for _, size in row] for row in processed], mod)
    pixels, _ = stack_images([[p for p, _ in row] for row in processed], processor.max_num_tiles)
    sizes = stack_aspect_ratios([[size for _, size in row] for row in processed], absent=0)
    dtype = next(model.vision_model.parameters()).dtype
    return expanded, (pixels.to(device=device, dtype=dtype), sizes.to(device))


def prepare_videos(model, rows: list[list[int]], videos: list[list[Any]] | None, device=None, num_frames: int | None = None):
    """Videos per row for the LLaVA projector video modality (llama_vision.model.llava
    `add_llava_video_modality`) -> (rows with each video placeholder expanded to the video's
    tokens_per_item, (frames [B, V, F, 3, S, S], frame_counts [B, V]) or None). A video is a
    file path (decoded, `num_frames` frames sampled uniformly: default the modality's
    `num_frames`), uint8 frames [F, H, W, 3] (array or tensor, used as they are) or a list
    of PIL images; every frame is processed like the tower's images
    (LlavaImageProcessor.for_video_params)."""
    mod = model.modalities.get("video")
    if mod is None or mod.fusion != "projector":
        if videos is not None and any(videos):
            raise ValueError("this model has no projector video modality (params.json `llava` has no `video` entry)")
        return rows, None
    check_media_counts(rows, videos, mod.placeholder_ids, what="video")
    if videos is None or not any(videos):
        return rows, None
    return prepare_video_clips(model, rows, [[projector_clip(model, v, num_frames) for v in row] for row in videos], device)


def projector_clip(model, video: Any, num_frames: int | None = None) -> torch.Tensor:
    """One video (a path, an encoded file's bytes, uint8 frames [F, H, W, 3] or PIL images:
    `prepare_videos`) -> its processed frames [f, 3, S, S] for the projector video modality
    of `model`. Raises VideoLoadError for a file that cannot be decoded."""
    import os
    import tempfile

    import numpy as np

    from llama_vision.data.llava_images import LlavaImageProcessor
    from llama_vision.data.video import VideoProcessor, frames_to_pil

    llava = model.args.llava
    frame = LlavaImageProcessor.for_video_params(llava)
    if isinstance(video, (bytes, bytearray)):
        # the decoders read files: the bytes spill to a temporary one for the decode
        with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
            f.write(video)
            f.flush()
            return projector_clip(model, f.name, num_frames)
    if isinstance(video, (str, os.PathLike)):
        n = num_frames or llava["video"].get("num_frames", 8)
        out, _, info = VideoProcessor(n, frame.image_size, 1, image_processor=frame)(video)
        return out[: info.valid, 0]
    pil = video if isinstance(video, (list, tuple)) else frames_to_pil(
        video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video))
    if not pil:
        raise ValueError("a video needs at least one frame")
    return torch.cat([frame(im)[0] for im in pil])


def prepare_video_clips(model, rows: list[list[int]], clips: list[list[torch.Tensor]], device=None):
    """`prepare_videos` for clips already processed (`projector_clip`: [f, 3, S, S] each)."""
    mod = model.modalities["video"]
    check_media_counts(rows, clips, mod.placeholder_ids, what="video")
    if not any(clips):
        return rows, None
    expanded = _expand_placeholders(rows, [[mod.tokens_per_item(c.shape[0]) for c in row] for row in clips], mod)
    v = max(len(r) for r in clips)
    f = max(c.shape[0] for r in clips for c in r)
    side = next(c for r in clips for c in r).shape[-1]
    dtype = next(model.vision_model.parameters()).dtype
    pixels = torch.zeros(len(rows), v, f, 3, side, side, dtype=dtype)
    counts = torch.zeros(len(rows), v, dtype=torch.long)
    for b, items in enumerate(clips):
        for i, c in enumerate(items):
            pixels[b, i, : c.shape[0]] = c.to(dtype)
            counts[b, i] = c.shape[0]
    return expanded, (pixels.to(device), counts.to(device))


def _expand_placeholders(rows: list[list[int]], counts: list[list[int]], mod) -> list[list[int]]:
    """Each row's k-th placeholder of projector modality `mod` (any of its ids) repeated
    counts[row][k] times, as the datasets expand them (data.datasets.expand_images)."""
    from llama_vision.data.datasets import expand_images

    expanded = []
    for row, n in zip(rows, counts):
        ids = [mod.token_id if t in mod.placeholder_ids else t for t in row]
        out, _, _ = expand_images(ids, [False] * len(ids), n, mod.token_id, max_seq_len=len(ids) + sum(n))
        expanded.append(out)
    return expanded
