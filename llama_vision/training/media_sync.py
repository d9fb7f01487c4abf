"""Same modules on every data-parallel rank, whatever media its micro-batch holds (FSDP).

Under FSDP every module's forward is a collective (its parameters are all-gathered over
the DP ranks, and its backward reduce-scatters them). A rank whose micro-batch has no
image while another rank's has one would skip the vision encoder and the adapters and
leave the others waiting in their all-gathers. So, per micro-batch, the ranks agree (one
all-reduce per optimizer step) which modalities anyone has, and a rank lacking one gets a
dummy input for it: one blank 1-tile image (or 1-frame video) per row that no text token
attends to. It runs the same modules as its peers and contributes exact zeros: the
adapters' output for rows that see no media is multiplied by their row mask (0), so every
gradient through it is 0, and the vision encoder's gradient is 0 * its output's.

The same holds for the learnable embedding table, which the decoder reads only for batches
holding a new token id (an image placeholder): if any rank's micro-batch has one, every
rank reads it (zero rows of gradient where it has none); if none has, nobody does.

A LLaVA model's image modality (projector fusion) takes its dummy differently: one blank
image in row 0 at the tower's size (its projector video modality one blank frame), with no
placeholder anywhere; the model encodes it and
adds its tokens, times 0, to the decoder's input embeddings (VisionLanguageModel.
unattended_media, switched on by `unattended_images`), so the tower and projector run
forward and backward after the decoder, as on the ranks whose rows hold images, and every
output and gradient stays exactly as without it.

The dummy's FLOPs are not counted (flops.py counts images by `num_images`, which stays 0).
A micro-batch no rank has media in runs no media module anywhere: nothing to agree on.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch

import model_parallel as mp
from llama_vision.data.batch import PreferenceBatch

__all__ = ["blank_batch", "embedding_tables", "media_present", "projector_blank", "unattended_images", "uniform_media",
           "with_dummy_media"]

def media_present(batch, vocab_size: int) -> list[bool]:
    """[has images, has videos, has a new token id (>= vocab_size: the learnable table)]
    of a Batch / VideoBatch / PreferenceBatch."""
    lm = batch.chosen if isinstance(batch, PreferenceBatch) else batch
    rows = [batch.chosen.tokens, batch.rejected.tokens] if isinstance(batch, PreferenceBatch) else [batch.tokens]
    new_ids = any(bool((t >= vocab_size).any()) for t in rows)
    videos = getattr(lm, "videos", None) is not None or getattr(lm, "frames", None) is not None  # (Meta's / projector's)
    return [lm.images is not None, videos, new_ids]


def projector_blank(model) -> tuple[int, int] | None:
    """(crops, size) of the dummy image of `model`'s image modality when it is a LLaVA
    projector (one blank size x size image, cut into as many crops as AnyRes gives it); None
    for Meta's cross-attention image modality."""
    vision = getattr(model, "vision_model", None)
    mod = getattr(model, "modalities", {}).get("image")
    if mod is None or mod.fusion != "projector":
        return None
    from llama_vision.data.anyres import num_anyres_crops

    anyres = vision.config.anyres
    size = vision.vision_encoder.config.image_size if anyres is None else anyres.crop_size
    crops = 1 if anyres is None else num_anyres_crops((size, size), anyres.grid_pinpoints, anyres.crop_size)
    return crops, size


def with_dummy_media(batch, want: list[bool], tile_size: int, projector: tuple[int, int] | None = None):
    """`batch` plus a blank, unattended input for every modality in `want` it lacks.
    projector: (crops, size) of a LLaVA image modality's dummy (projector_blank): one blank
    image in row 0 that no row has placeholders for; the model keeps its tokens in the graph
    with weight 0 (VisionLanguageModel.unattended_media, set by `unattended_images`)."""
    if isinstance(batch, PreferenceBatch):
        chosen = with_dummy_media(batch.chosen, want, tile_size, projector)
        # The pair shares one images tensor (encoded once for both continuations).
        rejected = dataclasses.replace(
            batch.rejected, images=chosen.images, aspect_ratios=chosen.aspect_ratios, num_tiles=chosen.num_tiles
        )
        return PreferenceBatch(chosen, rejected)
    rows = len(batch)
    changes = {}
    if want[0] and batch.images is None and projector is not None:
        crops, size = projector
        sizes = torch.zeros(rows, 1, 2, dtype=torch.long)
        sizes[0, 0] = size  # (height, width): only row 0's slot is a real image
        changes.update(images=torch.zeros(rows, 1, crops, 3, size, size), aspect_ratios=sizes,
                       num_tiles=torch.zeros(rows, 1, dtype=torch.long))
    elif want[0] and batch.images is None:
        changes.update(
            images=torch.zeros(rows, 1, 1, 3, tile_size, tile_size),
            aspect_ratios=torch.ones(rows, 1, 2, dtype=torch.long),
            num_tiles=torch.zeros(rows, 1, dtype=torch.long),
        )
    has_clips = getattr(batch, "videos", None) is not None or getattr(batch, "frames", None) is not None
    if want[1] and not has_clips and hasattr(batch, "frames"):
        # A projector video modality (ProjectorVideoBatch): one blank frame in row 0, no
        # placeholder anywhere, kept in the graph with weight 0 like the projector's image.
        if projector is None:
            raise TypeError("a ProjectorVideoBatch needs the LLaVA image modality's dummy size (projector_blank)")
        counts = torch.zeros(rows, 1, dtype=torch.long)
        counts[0, 0] = 1
        changes.update(frames=torch.zeros(rows, 1, 1, 3, projector[1], projector[1]), frame_counts=counts)
    elif want[1] and not has_clips:
        if not hasattr(batch, "videos"):
            raise TypeError(f"another rank's micro-batch has videos but this rank's is a {type(batch).__name__}")
        changes.update(
            videos=torch.zeros(rows, 1, 1, 1, 3, tile_size, tile_size),
            video_aspect_ratios=torch.ones(rows, 1, 2, dtype=torch.long),
            video_frames=torch.ones(rows, 1, dtype=torch.long),  # one frame, so the encoder runs
        )
    return dataclasses.replace(batch, **changes) if changes else batch


def uniform_media(micro: list, tile_size: int, vocab_size: int, device: torch.device,
                  projector: tuple[int, int] | None = None) -> list[tuple[object, bool]]:
    """The micro-batches of this rank, each with a dummy input for every modality that
    some DP rank's micro-batch at the same index has, and whether any rank's has a new
    token id (then every rank must read the learnable table: `embedding_tables`). One
    all-reduce over DP for all of them. projector: see with_dummy_media."""
    present = torch.tensor([media_present(b, vocab_size) for b in micro], dtype=torch.uint8, device=device)
    anywhere = mp.all_reduce_max(present, "dp").tolist()
    return [(with_dummy_media(b, [bool(x) for x in want[:2]], tile_size, projector), bool(want[2]))
            for b, want in zip(micro, anywhere)]


def blank_batch(like=None):
    """A one-row batch with no target (labels all -100) that sees no media, of `like`'s
    type: what a rank runs while another still has held-out batches to validate."""
    from llama_vision.data.batch import IGNORE_INDEX, Batch

    fields = dict(
        tokens=torch.zeros(1, 2, dtype=torch.long), labels=torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
        lengths=torch.tensor([2]), images=None, aspect_ratios=torch.ones(1, 1, 2, dtype=torch.long),
        num_tiles=torch.zeros(1, 1, dtype=torch.long), num_images=torch.zeros(1, dtype=torch.long), keys=["<blank>"],
    )
    cls = type(like) if like is not None and not isinstance(like, PreferenceBatch) else Batch
    return cls(**fields)


@contextmanager
def unattended_images(model, on: bool = True):
    """Within: projector-modality items without placeholders are encoded and kept in the
    graph with weight 0 (VisionLanguageModel.unattended_media) if `on`."""
    before = model.unattended_media
    model.unattended_media = on
    try:
        yield
    finally:
        model.unattended_media = before


@contextmanager
def embedding_tables(model, every_table: bool):
    """Within: the decoder reads every embedding table whatever ids the batch holds
    (`TextDecoder.embed_all_tables`) if every_table."""
    text = model.text_model
    before = text.embed_all_tables
    text.embed_all_tables = every_table
    try:
        yield
    finally:
        text.embed_all_tables = before
