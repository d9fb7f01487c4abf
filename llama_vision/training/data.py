"""Build a stage's dataset + resumable loader from its DataConfig."""
from __future__ import annotations

from functools import partial

import model_parallel as mp
from llama_vision.data.batching import MicroBatchDataset, TokenBudgetBatcher, UnpackedRows
from llama_vision.data.collate import build_dataloader
from llama_vision.data.datasets import CaptionDataset, ConversationDataset, DPODataset
from llama_vision.data.image import ImageProcessor
from llama_vision.data.llava import LlavaJsonSource
from llama_vision.data.mixture import MixtureDataset
from llama_vision.data.packing import NextFitPacker, collate_packed
from llama_vision.data.sources import ConversationSource, DPOSource, JsonlCaptionSource, Record, WebDatasetSource

from .train_config import TrainConfig

VIDEO_KINDS = ("video_jsonl", "video_wds")


class WithoutImages:
    """A record source with the images removed (text-only samples, e.g. for a text stage
    trained on the caption language alone)."""

    def __init__(self, source):
        self.source = source
        self.shards = getattr(source, "shards", [])

    def iter_shard(self, shard: str):
        for record in self.source.iter_shard(shard):
            yield Record(record.key, record.source, {**record.fields, "images": []}, record.error, record.message)


_KINDS = {
    "caption_wds": (lambda c: WebDatasetSource(c.paths), CaptionDataset),
    "caption_jsonl": (lambda c: JsonlCaptionSource(c.paths, c.image_root), CaptionDataset),
    "conversations": (lambda c: ConversationSource(c.paths, c.image_root), ConversationDataset),
    "llava_json": (lambda c: LlavaJsonSource(c.paths, c.image_root), ConversationDataset),
    "dpo": (lambda c: DPOSource(c.paths, c.image_root), DPODataset),
}


def build_loader(cfg: TrainConfig, tokenizer, model_args, dp_rank: int, dp_size: int, *, loop: bool = True):
    """-> ResumableDataLoader of Batch (or PreferenceBatch for DPO), looping forever
    (step-based training: data-parallel ranks never wait for each other at an epoch end).
    data.packing / data.max_tokens_per_batch: micro-batches of a varying number of
    samples (see `micro_batches`). data.tile_dtype: uint8 hands out uint8 pixels, which the
    consumer normalises on its device (`batch.to(device).normalized()`)."""
    data = cfg.data
    if data.sources and data.paths:
        raise ValueError("data.sources and data.paths are both set: a mixture lists its paths per source (clear data.paths)")
    if not data.paths and not data.sources:
        raise ValueError("data.paths is empty: point it at the training shards / manifests")
    check_batching(cfg)
    if data.sources:
        dataset = _mixture(cfg, tokenizer, model_args, dp_rank, dp_size, loop)
    elif data.kind in VIDEO_KINDS:
        from llama_vision.data.video_dataset import build_video_dataset

        dataset = build_video_dataset(cfg, tokenizer, model_args, dp_rank, dp_size, loop=loop)
    else:
        dataset = _example_dataset(cfg, data.kind, data, tokenizer, model_args, dp_rank, dp_size, loop=loop, seed=cfg.seed)
    # Page-locked batches for a CUDA run: the trainer's non_blocking copies are then
    # asynchronous (from pageable memory they are synchronous, through a staging copy).
    pin_memory = mp.process_device(cfg.device).type == "cuda"
    if data.packing or data.max_tokens_per_batch:
        return build_dataloader(micro_batches(cfg, dataset), batch_size=None, num_workers=data.num_workers, pin_memory=pin_memory)
    return build_dataloader(dataset, batch_size=cfg.micro_batch_size, num_workers=data.num_workers, pin_memory=pin_memory)


def _example_dataset(cfg: TrainConfig, kind: str, files, tokenizer, model_args, dp_rank: int, dp_size: int, *, loop: bool, seed: int):
    """The example dataset of `kind` over `files` (anything with `paths` and `image_root`:
    the DataConfig, or one of its sources)."""
    data = cfg.data
    make_source, dataset_cls = _KINDS[kind]
    llava = getattr(model_args, "llava", None)
    if llava is not None and llava.get("name", "image") == "image":
        processor = llava_processor(cfg, model_args)
    else:
        processor = ImageProcessor(
            tile_size=data.tile_size or model_args.vision_chunk_size,
            max_num_tiles=data.max_num_tiles or model_args.vision_max_num_chunks,
            output=data.tile_dtype,
        )
    source = make_source(files)
    return dataset_cls(
        WithoutImages(source) if data.text_only else source,
        tokenizer,
        processor,
        max_seq_len=min(data.max_seq_len, model_args.max_seq_len),
        seed=seed,
        shuffle=data.shuffle,
        shuffle_buffer=data.shuffle_buffer,
        rank=dp_rank,
        world_size=dp_size,
        loop=loop,
        block_size=record_block(cfg),
        split=data.split,
    )


def llava_processor(cfg: TrainConfig, model_args):
    """The LLaVA modality's image processor (the model's tower size and layout; images
    expand to their tokens' placeholders in the examples)."""
    from llama_vision.data.llava_images import LlavaImageProcessor

    if cfg.data.tile_dtype != "float32":
        raise ValueError("data.tile_dtype: uint8 is Meta's tiler's (its normalisation table); the LLaVA modality's "
                         "images are float32: set data.tile_dtype: float32")
    return LlavaImageProcessor.for_params(model_args.llava)


def _mixture(cfg: TrainConfig, tokenizer, model_args, dp_rank: int, dp_size: int, loop: bool) -> MixtureDataset:
    """data.sources -> a MixtureDataset of one looping example dataset per source (each
    shuffled with its own seed)."""
    from llama_vision.data.video_dataset import build_video_dataset, has_projector_video

    data = cfg.data
    if not loop:
        raise ValueError("data.sources: a mixture is drawn from forever; validation (data.eval_paths) reads plain paths")
    videos = [i for i, src in enumerate(data.sources) if src.kind in VIDEO_KINDS]
    projector_video = has_projector_video(model_args)
    if cfg.stage == "dpo" or (cfg.stage.startswith("video") and not projector_video):
        raise ValueError(f"data.sources: mixtures are of LM sources (caption / conversation kinds), not for stage {cfg.stage}"
                         + (" (Meta's video adapters train on video data alone)" if cfg.stage.startswith("video") else ""))
    if videos and not projector_video:
        raise ValueError(f"data.sources{videos}: video sources mix with image / text sources only on a LLaVA model's "
                         "projector video path (params `llava: {video: ...}`, or a video_* stage on a LLaVA checkpoint)")
    empty = [i for i, src in enumerate(data.sources) if not src.paths]
    if empty:
        raise ValueError(f"data.sources{empty}: paths is empty")
    parts = [build_video_dataset(cfg, tokenizer, model_args, dp_rank, dp_size, loop=True, files=src, seed=cfg.seed + 1000 * i)
             if src.kind in VIDEO_KINDS else
             _example_dataset(cfg, src.kind, src, tokenizer, model_args, dp_rank, dp_size, loop=True, seed=cfg.seed + 1000 * i)
             for i, src in enumerate(data.sources)]
    names = [f"{src.kind}:{','.join(src.paths)}" for src in data.sources]
    collate = None
    if videos:  # a video source's collate takes image and text rows too (not the other way round)
        collate = parts[videos[0]].collate_fn(max_num_tiles=max(p.image_processor.max_num_tiles for p in parts))
    return MixtureDataset(parts, [src.weight for src in data.sources], names=names, seed=cfg.seed, rank=dp_rank,
                          world_size=dp_size, collate=collate)


def record_block(cfg: TrainConfig) -> int:
    """Records handed to a DataLoader worker at a time (record split): one micro-batch's
    worth, so a rank's micro-batches do not depend on data.num_workers (sampler.record_owner).
    Packing and token budgets draw a varying number of records per micro-batch: 1."""
    return 1 if cfg.data.packing or cfg.data.max_tokens_per_batch else cfg.micro_batch_size


PACKABLE_KINDS = ("caption_wds", "caption_jsonl", "conversations", "llava_json")


def check_batching(cfg: TrainConfig) -> None:
    """data.packing / data.max_tokens_per_batch against the kind and the sizes: a clear
    ValueError naming the key when the combination cannot work."""
    data = cfg.data
    if data.max_tokens_per_batch < 0:
        raise ValueError(f"data.max_tokens_per_batch must be >= 0 (0: off), got {data.max_tokens_per_batch}")
    if data.packing and data.kind not in PACKABLE_KINDS:
        raise ValueError(f"data.packing: true is not supported for data.kind={data.kind!r} (packing supports "
                         f"{', '.join(PACKABLE_KINDS)}); set data.packing: false")
    if data.max_tokens_per_batch and data.kind == "dpo":
        raise ValueError("data.max_tokens_per_batch is not supported for data.kind='dpo' (preference pairs are "
                         "batched by micro_batch_size); set data.max_tokens_per_batch: 0")
    if data.packing and not data.max_tokens_per_batch and cfg.micro_batch_size < 1:
        raise ValueError(f"micro_batch_size (packed rows per micro-batch) must be >= 1, got {cfg.micro_batch_size}")


def micro_batches(cfg: TrainConfig, dataset) -> MicroBatchDataset:
    """`dataset` (an ExampleDataset) batched by data.packing / data.max_tokens_per_batch
    (llama_vision.data.batching): micro-batches of whole examples, exact resume."""
    check_batching(cfg)
    data = cfg.data
    capacity = dataset.max_seq_len  # min(data.max_seq_len, the model's)
    if data.packing:
        rows = cfg.micro_batch_size
        if data.max_tokens_per_batch:
            # A packed row may fill up to `capacity` tokens: this many rows keep the padded
            # micro-batch within the budget.
            rows = data.max_tokens_per_batch // capacity
            if rows < 1:
                raise ValueError(f"data.max_tokens_per_batch={data.max_tokens_per_batch} is less than one packed row "
                                 f"of data.max_seq_len={capacity} tokens; raise it to at least {capacity}")
        collate = partial(collate_packed, pad_id=dataset.tokenizer.pad_id,
                          max_num_tiles=dataset.image_processor.max_num_tiles, image_token_id=dataset.image_token_id)
        return MicroBatchDataset(dataset, partial(NextFitPacker, capacity, rows), collate)
    return MicroBatchDataset(dataset, partial(TokenBudgetBatcher, data.max_tokens_per_batch), UnpackedRows(dataset.collate_fn()))
