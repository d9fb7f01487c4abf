"""Build a stage's dataset + resumable loader from its DataConfig."""
from __future__ import annotations

from llama_vision.data.collate import build_dataloader
from llama_vision.data.datasets import CaptionDataset, ConversationDataset, DPODataset
from llama_vision.data.image import ImageProcessor
from llama_vision.data.sources import ConversationSource, DPOSource, JsonlCaptionSource, Record, WebDatasetSource

from .train_config import TrainConfig


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
    "dpo": (lambda c: DPOSource(c.paths, c.image_root), DPODataset),
}


def build_loader(cfg: TrainConfig, tokenizer, model_args, dp_rank: int, dp_size: int, *, loop: bool = True):
    """-> ResumableDataLoader of Batch (or PreferenceBatch for DPO), looping forever
    (step-based training: data-parallel ranks never wait for each other at an epoch end)."""
    data = cfg.data
    if not data.paths:
        raise ValueError("data.paths is empty: point it at the training shards / manifests")
    if data.kind in ("video_jsonl", "video_wds"):
        from llama_vision.data.video_dataset import build_video_dataset

        dataset = build_video_dataset(cfg, tokenizer, model_args, dp_rank, dp_size, loop=loop)
    else:
        make_source, dataset_cls = _KINDS[data.kind]
        processor = ImageProcessor(
            tile_size=data.tile_size or model_args.vision_chunk_size,
            max_num_tiles=data.max_num_tiles or model_args.vision_max_num_chunks,
        )
        source = make_source(data)
        dataset = dataset_cls(
            WithoutImages(source) if data.text_only else source,
            tokenizer,
            processor,
            max_seq_len=min(data.max_seq_len, model_args.max_seq_len),
            seed=cfg.seed,
            shuffle=data.shuffle,
            shuffle_buffer=data.shuffle_buffer,
            rank=dp_rank,
            world_size=dp_size,
            loop=loop,
        )
    return build_dataloader(dataset, batch_size=cfg.micro_batch_size, num_workers=data.num_workers)
