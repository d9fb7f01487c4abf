"""The training-stage config: one dataclass tree, loaded from configs/train/*.yaml and
overridable as key=value on the command line (`tools/train.py --config X max_steps=10`).

Every field carries an attribute docstring (the string right below it); `tools/train.py
--help` lists them all (see `llama_vision.config.config_keys`), and a test fails if a
field has none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


@dataclass
class SourceConfig:
    """One source of a data mixture (`data.sources`)."""

    paths: list[str] = field(default_factory=list)
    """Shards / manifests of this source (brace patterns and globs as in `data.paths`)."""
    kind: Literal["caption_wds", "caption_jsonl", "conversations", "llava_json", "video_jsonl", "video_wds"] = "caption_wds"
    """Record format of `paths` (as `data.kind`: caption_wds, caption_jsonl, conversations,
    llava_json, or video_jsonl / video_wds); the sources of one mixture may differ. Video
    sources mix with the others on a LLaVA model's projector video path (OneVision's
    image + video stage); Meta's video adapters train on video data alone."""
    weight: float = 1.0
    """Share of the mixture's samples drawn from this source: weight / sum of weights. A
    small source with a large weight is read again and again (the paper's resampling of
    low-frequency data)."""
    image_root: Optional[str] = None
    """Folder that media paths of this source's manifests are relative to (null: each
    manifest's own folder)."""


@dataclass
class DataConfig:
    """What the stage reads: format, files, sequence length, tiling, shuffling."""

    kind: Literal["caption_wds", "caption_jsonl", "conversations", "llava_json", "dpo", "video_jsonl", "video_wds"] = "caption_wds"
    """Record format of `paths`: caption_wds = img2dataset-style tar shards (key.jpg + key.txt
    or key.json); caption_jsonl = JSONL manifest ({image, caption}) + image folder;
    conversations = SFT dialogs (JSONL, loss on assistant turns); llava_json = the same from
    LLaVA's files (a JSON array, read streaming, or JSONL, of {id, image(s), conversations:
    [{from: human|gpt|system, value: "<image>\\n..."}]} or ShareGPT-style {messages, images}
    rows; llama_vision/data/llava.py); dpo = preference pairs
    (JSONL prompt + chosen/rejected, for stage dpo); video_jsonl / video_wds = video + caption
    (JSONL manifest + mp4 files, or tar shards with key.mp4 + key.txt)."""
    paths: list[str] = field(default_factory=list)
    """Shards / manifests to read; brace (`{000000..000099}`) and glob patterns expand. Must
    not be empty."""
    image_root: Optional[str] = None
    """Folder that media paths in JSONL manifests are relative to; null: each manifest's own
    folder. Unused for tar shards."""
    max_seq_len: int = 512
    """Longest example in tokens (image placeholders included), capped at the model's
    max_seq_len. Longer ones keep their first tokens (images past the cut are dropped)."""
    tile_size: Optional[int] = None
    """Tile side in pixels for images and video frames; null: the model's vision_chunk_size."""
    max_num_tiles: Optional[int] = None
    """Most tiles per image; null: the model's vision_max_num_chunks (videos use
    `video.tiles_per_frame`)."""
    text_only: bool = False
    """Drop the images (a text stage trained on the captions alone)."""
    shuffle: bool = True
    """Shuffle the shard order every epoch and mix records through a shuffle buffer; false:
    source order."""
    shuffle_buffer: int = 1000
    """Records in the shuffle buffer. It only mixes records within its reach: a sorted file
    stays nearly sorted, so shuffle such files when writing them."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process). Resuming needs
    the same value (and seed and world size)."""
    split: Literal["auto", "shard", "record"] = "auto"
    """How records reach the DP ranks x DataLoader workers: record = every partition reads
    its blocks of one global record order (the same at every layout: a checkpoint resumes
    at another DP degree or worker count, and DP=N equals one process), shard = each reads
    its own files (cheapest I/O; resume only at the same layout), auto = shard when there
    are at least as many files as partitions (and more than one partition)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture instead of `paths` / `kind`: [{paths, kind, weight, image_root}, ...]
    (LM kinds). Each sample's source is drawn by weight, deterministically per DP rank and
    worker; a resumed run continues the draws and every source's own position."""
    eval_paths: list[str] = field(default_factory=list)
    """Held-out shards / manifests of the same kind as `paths`, read in order (no shuffle)
    for validation every `eval_every` steps; empty: no validation."""
    packing: bool = False
    """Pack several samples into each row, up to `max_seq_len` tokens (greedy, in stream
    order), instead of padding one sample per row: `micro_batch_size` then counts packed
    rows. Self-attention stays inside each sample, positions restart per sample and an
    image is seen by its own sample only (docs/decoder_input.md); the loss per target token
    is unchanged. Kinds caption_wds, caption_jsonl, conversations and llava_json."""
    max_tokens_per_batch: int = 0
    """Token-budget micro-batches (0: off, a fixed `micro_batch_size`): take samples in
    stream order while rows x longest row (the padded tokens) stays within this budget, at
    least one sample, so short samples make larger micro-batches. With `packing`, a
    micro-batch is max_tokens_per_batch // max_seq_len packed rows (must be >= max_seq_len).
    Not for kind dpo."""
    tile_dtype: Literal["float32", "uint8"] = "float32"
    """Dtype of the image and video-frame tiles the DataLoader hands out. float32: normalised
    tiles, as the model reads them; uint8: the resized pixels (a quarter of the host memory,
    pinned-memory copies and host-to-device traffic), normalised on the training device
    right after the copy to exactly the float32 values (same losses). uint8 is recommended
    on GPU."""


@dataclass
class OptimConfig:
    """AdamW (ZeRO-1 sharded over data-parallel ranks, trainable parameters only)
    and its schedule: linear warmup to `lr`, then cosine decay to `lr x min_lr_ratio`."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup, cosine-decayed until max_steps."""
    min_lr_ratio: float = 0.1
    """Learning rate at max_steps as a fraction of `lr` (0 to 1)."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from lr / warmup_steps to lr (0: none)."""
    weight_decay: float = 0.01
    """Decoupled AdamW weight decay of the weight matrices; norms, biases, gates and
    embeddings get none."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2): decay rates of the gradient's first and second moments."""
    eps: float = 1e-8
    """AdamW epsilon (added to the second-moment root)."""
    grad_clip: Optional[float] = 1.0
    """Clip the global gradient norm (over all TP and DP shards) to this; null: no clipping
    (the norm is still logged as grad_norm)."""
    gate_lr_multiplier: float = 1.0
    """Tanh gates train at lr x this (own param group, no decay). They start at 0 and get tiny
    gradients until the adapter carries signal; a larger step for them shortens that cold
    start (1.0 = the paper's plain AdamW)."""
    group_lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Trainability group -> lr multiplier (the groups of `trainable`: decoder, vision,
    adapters, lora, video, ...), e.g. LLaVA-OneVision's tower at a fifth of the LLM's lr:
    `{vision: 0.2}`; groups not named train at lr. Multiplies with gate_lr_multiplier for a
    group's gates; the schedule scales every group alike."""


@dataclass
class TrainableConfig:
    """Which parameter groups train (see llama_vision.model.trainability);
    the rest are frozen: no gradient and no optimizer state."""

    decoder: bool = False
    """The Llama text decoder: token embeddings, layers, final norm, output head (frozen in
    the paper's image and video stages)."""
    vision: bool = True
    """The ViT image encoder: local and gated global layers, class token, position and tile
    embeddings."""
    adapters: bool = True
    """The image adapters: gated cross-attention layers, the vision projection and the
    learnable special-token rows."""
    video: bool = False
    """The video modality: temporal aggregator and video cross-attention (video_* stages; a
    model without video keeps it off)."""
    lora: bool = True
    """The LoRA adaptors (A and B of every linear `lora.targets` selects); no effect without
    LoRA. Their base weights stay in (and train with) their own groups: LoRA on a frozen
    trunk keeps `decoder: false`."""


@dataclass
class LoraConfig:
    """LoRA adaptors on chosen linear layers (llama_vision.model.lora): y = W x +
    (alpha / rank) B A x, A kaiming-uniform, B zero (training starts from the base model's
    outputs, bitwise). Trained as the `lora` trainability group, float32 even when the
    frozen base is bf16, sharded like the base weight under tensor parallelism. final/
    then holds the model with LoRA merged (what inference and the next stage read) plus
    lora.safetensors + lora_config.json (the adaptors alone, with the base checkpoint they
    belong to)."""

    targets: list[str] = field(default_factory=list)
    """Module-name patterns of the linears to adapt (fnmatch, `*` spans dots), e.g.
    text_model.layers.*.attention.wq, or shorthands: trunk_attention (wq/wk/wv/wo of every
    decoder layer), trunk_mlp (w1/w2/w3 of every decoder layer), adapters (every linear of
    the image adapters), vision (every linear of the ViT). Each must match a linear. Empty:
    no LoRA, unless `model`'s params.json carries Meta's lora_args ({rank, scale}: LoRA on
    trunk_attention + trunk_mlp, alpha = scale x rank)."""
    rank: int = 8
    """Rank r of A [r, in] and B [out, r]."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adaptors' input (training only; the base path sees none)."""


@dataclass
class InitConfig:
    """Start values for a stage that trains the vision encoder and adapters from
    scratch, applied after `init_from` is loaded and only to parameters this stage trains
    (a resumed run restores its trained values on top)."""

    gates: Optional[float] = None
    """Start value of every trainable tanh gate (cross-attention adapters, ViT global layers,
    tile/position embeddings). null keeps the paper's 0 (the decoder's output is unchanged at
    the start); a random encoder behind closed gates gets almost no gradient, so small
    from-scratch runs learn far faster from an open gate (e.g. 1.0, tanh = 0.76)."""
    vision_pos_embed_scale: float = 1.0
    """Multiplies the ViT's patch- and tile-position embeddings (a LLaVA model's CLIP tower:
    its position embedding). At the default init (std width^-0.5) position is a few per cent
    of a patch's content signal, which makes "where is it" slow to learn from scratch."""


@dataclass
class DPOConfig:
    """The DPO objective (stage dpo only): the reference is a copy of the policy's
    trainable tensors after init_from (the frozen rest is shared)."""

    beta: float = 0.1
    """DPO temperature: scales the policy-minus-reference log-ratio margin (larger: the
    policy is held closer to the reference)."""
    ref_ema_every: int = 0
    """Every this many optimizer steps move the reference towards the policy by EMA (paper:
    optional); 0: the reference stays the initial policy."""
    ref_ema_decay: float = 0.99
    """EMA decay of that update: reference = decay x reference + (1 - decay) x policy."""


@dataclass
class VideoTrainConfig:
    """Shape of the video modality that video_* stages add to the model: a
    perceiver aggregator and video cross-attention adapters (llama_vision.model.video); on
    a LLaVA model (params `llava:`) the projector video modality instead
    (llama_vision.model.llava.add_llava_video_modality: `num_frames` and `pool` only)."""

    num_frames: int = 16
    """Frames sampled per video (the most the aggregator accepts)."""
    frames_per_group: int = 16
    """Consecutive frames merged into one effective frame (paper: 16 in pretraining, 32 in
    SFT); may differ from init_from's (its embeddings are resized on load)."""
    tiles_per_frame: int = 1
    """Most tiles per frame (paper pretraining: 4 of 448 px); at most the model's
    vision_max_num_chunks."""
    n_latents: int = 32
    """Tokens per effective frame (the perceiver's latent queries)."""
    depth: int = 2
    """Perceiver layers of the temporal aggregator."""
    heads: int = 8
    """Perceiver attention heads; must be divisible by `tp`."""
    every_k_image_layers: int = 4
    """A video cross-attention adapter before every k-th image cross-attention layer (the
    last one kept; paper: 4)."""
    pool: str = "bilinear2x"
    """LLaVA models: per-frame token pooling of the projector video modality
    (llama_vision.model.llava.VIDEO_POOLS: OneVision's `bilinear2x`, or `image`)."""


@dataclass
class HarnessConfig:
    """Evaluation-harness tasks run during training (llama_vision/eval, configs/eval):
    each task's score is logged as eval/<task> in that step's metrics row; predictions and
    results.json go to output_dir/eval/step_<N>/ (llama_vision/training/eval_hook.py)."""

    tasks: list[str] = field(default_factory=list)
    """Task names (in `task_dir`) or task YAML paths; empty: off."""
    every: int = 0
    """Run the tasks every this many optimizer steps (0: off); also after the last step."""
    data_root: str = "."
    """Folder the tasks' data paths are relative to (tools/eval.py's --data-root)."""
    task_dir: str = "configs/eval"
    """Where task names are looked up."""
    limit: Optional[int] = 64
    """At most this many samples per task (null: the whole task): a progress signal; the
    full benchmark is tools/eval.py on a saved checkpoint."""
    batch_size: int = 8
    """Samples generated together."""
    overrides: list[str] = field(default_factory=list)
    """Task config overrides, key=value (every task) or TASK.key=value."""


@dataclass
class TrainConfig:
    """One training run (top-level keys), with its sections below."""

    stage: Literal["pretrain", "anneal", "sft", "dpo", "video_pretrain", "video_sft", "text"] = "pretrain"
    """The stage: dpo trains the DPO objective (data.kind dpo); video_pretrain / video_sft add
    the video modality shaped by `video.*` (video_sft's init_from must hold video weights);
    pretrain, anneal, sft and text train token cross-entropy. What trains is `trainable.*`."""
    model: str = ""
    """Architecture (required): a Meta params.json (or a checkpoint dir holding one) or a
    YAML of Meta params, e.g. configs/model/tiny.yaml in a checkout; vocab_size null or
    auto takes the tokenizer's."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Params merged over `model`'s, e.g. {vision_chunk_size: 448}."""
    init_from: Optional[str] = None
    """A Meta/HF vision checkpoint dir to start from (usually the previous stage's
    output_dir/final); null: random init."""
    init_text_from: Optional[str] = None
    """A text-only Llama trunk (Meta or HF dir) swapped into the decoder after init_from;
    adapters, vision tower and learnable rows are kept. null: none."""
    init_vision_from: Optional[str] = None
    """LLaVA models (params `llava:`): the CLIP / SigLIP tower's weights (a local
    safetensors / .pt file or HF dir in transformers', open_clip's or our layout, e.g.
    openai/clip-vit-large-patch14-336) loaded into the tower after init_from. null: none."""
    tokenizer: str = ""
    """tokenizer.model (tiktoken BPE or SentencePiece) or a dir holding one; its n_words must
    equal the model's vocab_size. A file is copied into final/."""
    output_dir: str = "runs/default"
    """Run directory: metrics.jsonl, loss.png, tensorboard/, checkpoints/step_N/, final/.
    --resume continues from its latest checkpoint."""
    max_steps: int = 1000
    """Optimizer steps to train (also the length of the LR schedule); skipped non-finite steps
    count."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint (trainable weights, optimizer, scheduler, data position,
    RNG) every this many steps, and at max_steps."""
    keep_last: int = 3
    """Most recent checkpoints/step_N/ kept (at least 1); older ones are deleted."""
    seed: int = 0
    """Seeds the model init (the same weights at every TP degree), the shard order and the
    shuffle buffers."""
    micro_batch_size: int = 8
    """Samples (dpo: preference pairs) per forward/backward on one data-parallel rank.
    Global batch = micro_batch_size x grad_accum_steps x DP ranks (= world / tp), printed at
    start."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step. The loss is divided by the step's global target
    count, so the update equals one step on the whole global batch."""
    tp: int = 1
    """Tensor-parallel degree (GPUs per model replica); the world size must be a multiple of
    it, and world / tp is the number of data-parallel ranks."""
    device: Optional[str] = None
    """Where this process trains: cpu, cuda (its local GPU, cuda:LOCAL_RANK) or cuda:N; null:
    the local GPU when CUDA is available, else the CPU. Sets the process-group backend too
    (nccl on GPU, gloo on the CPU), so `device: cpu` runs multi-process CPU training on a
    machine that has a GPU."""
    dtype: Literal["fp32", "bf16"] = "bf16"
    """bf16: forward under bf16 autocast on GPU (fp32 master weights, gradients and optimizer
    state; frozen weights stored in bf16 unless `frozen_param_dtype` says otherwise); fp32:
    no autocast. CPU runs fp32 either way."""
    frozen_param_dtype: Optional[Literal["fp32", "bf16"]] = None
    """Storage dtype of the FROZEN parameters (trainable ones stay float32 master copies);
    null follows `dtype`: bf16 on GPU under `dtype: bf16`, fp32 on the CPU. bf16 halves the
    frozen trunk's memory; frozen modules then compute in bf16 and hand float32 activations
    on (llama_vision.training.precision). final/ keeps each tensor's stored dtype."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the data-parallel gradient all-reduce (gradients are accumulated in float32
    either way); bf16 halves the traffic but the paper found bf16 gradients unstable through
    the cross-attention layers."""
    max_consecutive_nonfinite: int = 5
    """A step whose loss or gradient is not finite is skipped (no optimizer/scheduler step,
    no checkpoint, counted as `skipped_nonfinite`); this many in a row stop the run."""
    peak_flops_per_device: Optional[float] = None
    """Peak FLOP/s of one device for the logged MFU (e.g. 989e12); null: looked up for known
    GPUs (no MFU on the CPU unless set)."""
    data_parallel: Literal["fsdp", "zero1"] = "fsdp"
    """How data-parallel ranks share the model (DP = world / tp > 1): fsdp = FSDP2
    (`fully_shard`) over the DP dimension of a (dp x tp) DeviceMesh: every parameter, frozen
    trunk included, its gradient and its AdamW state are sharded over the DP ranks (each
    holds 1 / DP), fairscale TP inside each replica; zero1 = whole parameters and gradients
    on every rank, gradients summed, only AdamW's state sharded (ZeRO-1). Same updates either
    way. Ignored at DP = 1."""
    activation_checkpointing: Union[bool, list[str]] = False
    """Recompute activations in backward instead of keeping them: less memory for about one
    more forward of compute. true: every kind; or a list of kinds: decoder (the Llama
    layers), vision (the ViT's local and global layers), adapters (the gated
    cross-attention blocks), perceiver (the video aggregator)."""
    resume_from: Optional[str] = None
    """A checkpoint directory (`checkpoints/step_N` of this or another run, written at any
    TP / DP degree, data-parallel mode or worker count) to resume from while output_dir
    has no checkpoint of its own (once it has, the newest of those: a resumed run that is
    interrupted again continues from its own progress). New checkpoints go to output_dir."""
    checkpoint_async: bool = False
    """Write training checkpoints in the background (torch.distributed.checkpoint.async_save):
    training continues while the previous step's state is written; the checkpoint is
    committed (visible to resume) only once every rank's write finished."""
    log_every: int = 1
    """Log metrics (metrics.jsonl, TensorBoard) every this many steps; the last step and
    skipped non-finite steps are always logged."""
    tensorboard: bool = True
    """Also write the metrics to output_dir/tensorboard/ (if TensorBoard is installed)."""
    profile_steps: int = 0
    """Profile this many optimizer steps with torch.profiler, after one warm-up step (0: off):
    a Chrome trace per rank in output_dir/profile/rank_{r}.json and its top ops by self time
    in rank_{r}.txt. `tools/train.py --profile N` sets it."""
    eval_every: int = 0
    """Validate every this many steps on data.eval_paths (0: never): val_loss and
    val_token_accuracy (greedy argmax == target) over the labelled tokens of every rank,
    logged in the same metrics row as that step's training metrics. Not for stage dpo."""
    eval_max_batches: int = 0
    """At most this many held-out micro-batches per data-parallel rank per validation
    (0: the whole held-out set)."""
    save_final: bool = True
    """At the end, write the whole model in Meta format to output_dir/final/ (tokenizer
    beside it): what inference and the next stage's init_from read. With LoRA: the model
    with the adaptors merged, plus final/lora.safetensors and final/lora_config.json."""
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    """Which parameter groups train; everything else is frozen."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adaptors (off while `lora.targets` is empty)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer and learning-rate schedule."""
    init: InitConfig = field(default_factory=InitConfig)
    """Start values for parameters trained from scratch."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO settings (stage dpo)."""
    video: VideoTrainConfig = field(default_factory=VideoTrainConfig)
    """Video modality shape (video_* stages)."""
    eval_harness: HarnessConfig = field(default_factory=HarnessConfig)
    """Benchmark tasks scored by generation during training (every `eval_harness.every` steps)."""
