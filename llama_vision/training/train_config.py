"""The training-stage config: one dataclass tree, loaded from configs/train/*.yaml and
overridable as key=value on the command line (`tools/train.py --config X max_steps=10`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class DataConfig:
    # caption_wds: img2dataset-style tar shards; caption_jsonl: manifest + image folder;
    # conversations: SFT dialogs; dpo: preference pairs; video_jsonl / video_wds: video +
    # caption (manifest + mp4 files, or tar shards with key.mp4 + key.txt).
    kind: Literal["caption_wds", "caption_jsonl", "conversations", "dpo", "video_jsonl", "video_wds"] = "caption_wds"
    paths: list[str] = field(default_factory=list)
    image_root: Optional[str] = None
    max_seq_len: int = 512
    tile_size: Optional[int] = None  # default: the model's vision_chunk_size
    max_num_tiles: Optional[int] = None  # default: the model's vision_max_num_chunks
    text_only: bool = False  # drop the images (a text stage trained on the captions alone)
    shuffle: bool = True
    shuffle_buffer: int = 1000
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0
    # tanh gates start at 0 and get tiny gradients until the adapter carries signal; a larger
    # step for them shortens that cold start (1.0 = the paper's plain AdamW).
    gate_lr_multiplier: float = 1.0


@dataclass
class TrainableConfig:
    """Which parameter groups train (see llama_vision.model.trainability)."""

    decoder: bool = False
    vision: bool = True
    adapters: bool = True
    video: bool = False


@dataclass
class InitConfig:
    """Start values for a stage that trains the vision encoder and adapters from scratch,
    applied after `init_from` is loaded and only to parameters this stage trains (a
    resumed run restores its trained values on top).

    gates: every trainable tanh gate (cross-attention adapters, ViT global layers and
        tile/position embeddings) starts at this value. None keeps the paper's 0 (the
        decoder's output is unchanged at the start); a randomly initialised encoder behind
        closed gates gets almost no gradient, so small from-scratch runs learn far faster
        from an open gate (e.g. 1.0, tanh = 0.76).
    vision_pos_embed_scale: multiplies the ViT's patch- and tile-position embeddings. At
        the default init (std width^-0.5) position is a few per cent of a patch's content
        signal, which makes "where is it" slow to learn from scratch.
    """

    gates: Optional[float] = None
    vision_pos_embed_scale: float = 1.0


@dataclass
class DPOConfig:
    beta: float = 0.1
    ref_ema_every: int = 0  # 0: the reference model stays the initial policy
    ref_ema_decay: float = 0.99


@dataclass
class VideoTrainConfig:
    num_frames: int = 16
    frames_per_group: int = 16
    tiles_per_frame: int = 1
    n_latents: int = 32
    depth: int = 2
    heads: int = 8
    every_k_image_layers: int = 4


@dataclass
class TrainConfig:
    stage: Literal["pretrain", "anneal", "sft", "dpo", "video_pretrain", "video_sft", "text"] = "pretrain"
    model: str = "configs/model/tiny.yaml"  # params.json or YAML of Meta params
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {vision_chunk_size: 448}
    init_from: Optional[str] = None  # a Meta/HF vision checkpoint dir (previous stage)
    init_text_from: Optional[str] = None  # a text-only Llama trunk (swapped in; adapters kept)
    tokenizer: str = ""
    output_dir: str = "runs/default"
    max_steps: int = 1000
    checkpoint_every: int = 500
    keep_last: int = 3
    seed: int = 0
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    tp: int = 1
    dtype: Literal["fp32", "bf16"] = "bf16"  # autocast dtype on GPU; CPU runs fp32
    # A step whose loss or gradient is not finite is skipped (no optimizer/scheduler step,
    # no checkpoint, counted as `skipped_nonfinite`); this many in a row stop the run.
    max_consecutive_nonfinite: int = 5
    # Peak FLOP/s of one device for the logged MFU; None: looked up for known GPUs (no MFU
    # on the CPU unless set).
    peak_flops_per_device: Optional[float] = None
    activation_checkpointing: bool = False
    log_every: int = 1
    tensorboard: bool = True
    save_final: bool = True
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: InitConfig = field(default_factory=InitConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    video: VideoTrainConfig = field(default_factory=VideoTrainConfig)
