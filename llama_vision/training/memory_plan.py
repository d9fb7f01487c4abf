"""Memory per GPU of a training config, planned from the meta-device model (no weight is
allocated: the 90B plan takes seconds on a laptop).

    plan = plan_memory(cfg, gpus=8, gpu_memory_bytes=80 * 10**9)   # -> MemoryPlan
    print(format_plan(plan))

W GPUs = DP data-parallel ranks x `tp` tensor-parallel ranks. Bytes on the most loaded
GPU (rank 0 of the DP group under fsdp; the largest ZeRO-1 shard under zero1):

* weights: each parameter's TP-local tensor (a TP-split parameter holds 1/tp of its
  elements, replicated ones are whole; the model is built at that TP degree, so this is
  exactly what `model_parallel.layers` allocates) in its storage dtype
  (`training.precision`: frozen parameters in frozen_param_dtype, trainable ones
  float32). fsdp at DP > 1: every parameter is sharded on dim 0 over the DP ranks with
  torch.chunk semantics, padded by FSDP2 to ceil(dim0 / DP) rows on every rank
  (rank 0 holds the largest chunk, so the padded size is its exact size).
* grads: float32, trainable parameters only; sharded like the weights under fsdp,
  whole under zero1 and at DP = 1.
* optimizer: AdamW's exp_avg + exp_avg_sq (float32, the parameter's or its shard's
  shape) and its `step` scalar per parameter (a 4-byte host tensor for CUDA parameters,
  so counted only for a CPU plan). zero1: torch's ZeroRedundancyOptimizer partition is
  simulated exactly (each param group's parameters, largest first, onto the rank with the
  fewest elements so far) and the most loaded rank is reported; fsdp: sharded as the
  weights.
* fsdp transient (fsdp, DP > 1): the all-gathered (unsharded, TP-local) parameters while
  a unit computes. Units are the trainer's (`parallelize.fsdp_units`: each decoder layer,
  adapter block, ViT layer and perceiver layer, a LLaVA model's tower blocks; the vision
  projection or a LLaVA tower and projector, the token embeddings and the output head;
  then the vision model, the video aggregator and the decoder holding what is left).
  Counted: the enclosing units (those with units inside: gathered while their children
  run) and the root's own parameters, + the two largest other units (one computing, one
  prefetched) + the largest unit's unsharded gradients before their reduce-scatter.
* dpo reference (stage dpo): the reference policy's copy of the trainable tensors,
  placed like them.
* activations: `activation_memory.estimate_activations` for one micro-batch of
  micro_batch_size rows (DPO: pairs; data.max_tokens_per_batch: that budget of
  full-length rows) of data.max_seq_len tokens, each with `images_per_sample` images
  (packed rows: images per row) of data.max_num_tiles tile slots (a LLaVA model: the
  tower's crops, AnyRes its largest grid; video stages: one clip of video.num_frames
  frames), with the kinds of activation checkpointing that take effect on this model (the
  trainer's `parallelize.apply_activation_checkpointing` is asked), at this TP degree. Its module docstring holds the per-token formula:
  inputs + stored per unit + media + autocast copies + max(loss head, one layer's backward).

total = weights + grads + optimizer + fsdp transient + dpo reference + activations: all
alive together at the peak of a step once AdamW has its state (from step 2; under
gradient accumulation the gradients also outlive a micro-batch's activations). fits:
total + reserve (CUDA context, NCCL and cuBLAS workspaces, allocator slack) <= the card.

The weights, gradients and AdamW state are exact (tests/test_plan_memory.py compares them
with a real model's tensor storage after a real optimizer step); activations are an
estimate.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Sequence

import torch
from torch import nn

from .activation_memory import KINDS, BatchShape, TowerShape, VideoShape, estimate_activations
from .train_config import TrainConfig

__all__ = [
    "CARDS",
    "GIB",
    "MemoryPlan",
    "ParamSpec",
    "StateBytes",
    "batch_shape",
    "build_meta_model",
    "checkpoint_kinds",
    "format_plan",
    "fsdp_unit_names",
    "llava_tower_shape",
    "param_specs",
    "per_rank_state",
    "plan_memory",
    "readme_table",
    "simulated_tp",
    "zero1_partition",
]

GIB = 1 << 30
#: Cards of the README table: name -> bytes (nominal, decimal gigabytes).
CARDS = {"H100 80 GB": 80 * 10**9, "H200 141 GB": 141 * 10**9}
#: Default allowance for what is not the model's: CUDA context, NCCL / cuBLAS workspaces,
#: caching-allocator fragmentation.
DEFAULT_RESERVE = 2 * GIB


@dataclass(frozen=True)
class ParamSpec:
    """One parameter on one GPU before data-parallel sharding: its TP-local shape, storage
    bytes per element, whether it trains, its FSDP unit (module name; "" = the root) and
    whether a linear layer reads it as a weight matrix (autocast keeps a bf16 copy of those
    that train)."""

    name: str
    shape: tuple[int, ...]
    element_size: int
    trainable: bool
    unit: str = ""
    matmul: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size

    def fsdp_numel(self, dp: int) -> int:
        """Elements of a rank's dim-0 shard, padded as FSDP2 pads: ceil(dim0 / dp) rows."""
        if not self.shape:
            raise ValueError(f"parameter {self.name} is 0-dimensional: FSDP shards on dim 0 and cannot hold it")
        return math.ceil(self.shape[0] / dp) * math.prod(self.shape[1:])


@dataclass(frozen=True)
class StateBytes:
    """Per-GPU bytes of the training state (see the module docstring)."""

    frozen_weights: int
    trainable_weights: int
    grads: int
    optimizer: int
    fsdp_transient: int
    optimizer_rank: int = 0  # the DP rank whose optimizer state is reported (zero1: the largest)


def zero1_partition(groups: Sequence[Sequence[int]], dp: int) -> list[list[tuple[int, int]]]:
    """torch's ZeroRedundancyOptimizer partition: `groups` are the param groups' element
    counts in order; each group's parameters, largest first (stable), go to the rank with
    the fewest elements so far (the lowest rank on ties). Returns per rank its
    (group index, position in group) pairs."""
    sizes = [0] * dp
    ranks: list[list[tuple[int, int]]] = [[] for _ in range(dp)]
    for gi, group in enumerate(groups):
        for pos in sorted(range(len(group)), key=lambda i: group[i], reverse=True):
            r = min(range(dp), key=lambda k: (sizes[k], k))
            ranks[r].append((gi, pos))
            sizes[r] += group[pos]
    return ranks


def per_rank_state(
    params: Sequence[ParamSpec],
    dp: int,
    data_parallel: str,
    *,
    optimizer_groups: Sequence[Sequence[int]] | None = None,
    step_bytes: int = 4,
    master_element_size: int = 4,
    enclosing_units: frozenset[str] = frozenset(),
) -> StateBytes:
    """Weights, grads, AdamW state and FSDP transient buffers on the most loaded GPU of a
    DP group of `dp` ranks. optimizer_groups: AdamW's param groups as indices into
    `params` (default: one group of the trainable ones, in order); step_bytes: bytes of
    the per-parameter `step` counter on the device (0 when it lives on the host);
    enclosing_units: FSDP units that hold other units (gathered while those run)."""
    if dp < 1:
        raise ValueError(f"data-parallel degree must be >= 1, got {dp}")
    if data_parallel not in ("fsdp", "zero1"):
        raise ValueError(f"data_parallel must be 'fsdp' or 'zero1', got {data_parallel!r}")
    fsdp = data_parallel == "fsdp" and dp > 1
    if optimizer_groups is None:
        optimizer_groups = [[i for i, p in enumerate(params) if p.trainable]]
    frozen = trainable = grads = 0
    for p in params:
        n = p.fsdp_numel(dp) if fsdp else p.numel
        if p.trainable:
            trainable += n * p.element_size
            grads += n * master_element_size
        else:
            frozen += n * p.element_size
    moments = 2 * master_element_size  # exp_avg + exp_avg_sq
    rank = 0
    if fsdp or dp == 1:
        optimizer = sum((params[i].fsdp_numel(dp) if fsdp else params[i].numel) * moments + step_bytes
                        for group in optimizer_groups for i in group)
    else:  # zero1: whole parameters spread over the ranks
        numels = [[params[i].numel for i in group] for group in optimizer_groups]
        per_rank = [sum(numels[g][k] * moments + step_bytes for g, k in owned)
                    for owned in zero1_partition(numels, dp)]
        optimizer = max(per_rank)
        rank = per_rank.index(optimizer)
    transient = _fsdp_transient(params, master_element_size, enclosing_units) if fsdp else 0
    return StateBytes(frozen, trainable, grads, optimizer, transient, rank)


def _fsdp_transient(params: Sequence[ParamSpec], master_element_size: int, enclosing: frozenset[str]) -> int:
    """Unsharded buffers (see the module docstring): the root's and the enclosing units'
    parameters + the two largest other units' + the largest unit's gradients."""
    weights: dict[str, int] = {}
    grads: dict[str, int] = {}
    for p in params:
        weights[p.unit] = weights.get(p.unit, 0) + p.nbytes
        if p.trainable:
            grads[p.unit] = grads.get(p.unit, 0) + p.numel * master_element_size
    outer = sum(weights.pop(u, 0) for u in {"", *enclosing})
    largest = sorted(weights.values(), reverse=True)[:2]
    return outer + sum(largest) + max(grads.values(), default=0)


# --------------------------------------------------------------------------- the model


@contextmanager
def simulated_tp(tp: int) -> Iterator[None]:
    """Build models as tensor-parallel rank 0 of `tp` ranks, without a process group.

    The layer factories (`model_parallel.layers`) size every shard from
    `model_parallel.groups.tp_size()` / `tp_rank()`; those read the module globals
    `is_model_parallel` and `fs_init`, which are swapped here for a view of `tp` ranks.
    Only for building (on the meta device): no collective can run inside."""
    if tp == 1:
        yield
        return
    import model_parallel.groups as groups

    if groups.is_model_parallel():
        raise RuntimeError("simulated_tp: model parallelism is already initialised in this process")

    def no_collectives():
        raise RuntimeError("simulated_tp: a process group was asked for while building a planned model")

    view = SimpleNamespace(
        get_model_parallel_world_size=lambda: tp, get_model_parallel_rank=lambda: 0,
        get_data_parallel_world_size=lambda: 1, get_data_parallel_rank=lambda: 0,
        get_model_parallel_group=no_collectives, get_data_parallel_group=no_collectives,
        model_parallel_is_initialized=lambda: True,
    )
    saved = groups.fs_init, groups.is_model_parallel
    groups.fs_init, groups.is_model_parallel = view, (lambda: True)
    try:
        yield
    finally:
        groups.fs_init, groups.is_model_parallel = saved


def build_meta_model(cfg: TrainConfig, tp: int | None = None, device: str = "cuda") -> nn.Module:
    """The stage's model as built by the trainer (modalities, trainability, `init:`) on
    the meta device at TP degree `tp` (default cfg.tp), rank 0's shards, with the storage
    dtypes `training.precision` gives on `device`. No checkpoint is read."""
    from .build import build_training_model, load_model_params
    from .precision import apply_precision, resolve_precision

    tp = cfg.tp if tp is None else tp
    params = {**load_model_params(cfg.model), **cfg.model_overrides}
    vocab = params.get("vocab_size")
    if vocab in (None, "auto"):
        if not cfg.tokenizer or not Path(cfg.tokenizer).exists():
            raise ValueError(f"model {cfg.model} has vocab_size {vocab!r}: the planner needs the tokenizer to know it, "
                             f"but tokenizer={cfg.tokenizer!r} is not a file; set model_overrides.vocab_size=N")
        from llama_vision.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = SimpleNamespace(n_words=int(vocab))
    shape_only = dataclasses.replace(cfg, init_from=None, init_text_from=None, init_vision_from=None)
    # fork_rng: building seeds the global RNG (the same weights at every TP degree).
    with torch.random.fork_rng(devices=[]), simulated_tp(tp), torch.device("meta"):
        model = build_training_model(shape_only, tokenizer)
    return apply_precision(model, resolve_precision(cfg, device))


def fsdp_unit_names(model: nn.Module) -> tuple[dict[str, str], frozenset[str]]:
    """({parameter name: its FSDP unit's module name}, the units enclosing other units),
    from the trainer's `parallelize.fsdp_units` (innermost first: a parameter belongs to the
    first unit holding it, as fully_shard assigns it). Parameters in no unit are absent
    (the root's)."""
    from .parallelize import fsdp_units

    names = {id(m): n for n, m in model.named_modules()}
    units = [names[id(u)] for u in fsdp_units(model)[0]]
    owner: dict[str, str] = {}
    for unit in units:
        for pname, _ in model.get_submodule(unit).named_parameters(prefix=unit):
            owner.setdefault(pname, unit)
    enclosing = frozenset(u for u in units if any(o != u and o.startswith(u + ".") for o in units))
    return owner, enclosing


def param_specs(model: nn.Module) -> list[ParamSpec]:
    """The model's parameters as they are stored (shape, dtype, trainability, FSDP unit),
    in `named_parameters` order (shared parameters once)."""
    from model_parallel import is_linear

    matmul = {id(m.weight) for m in model.modules() if is_linear(m)}
    owner, _ = fsdp_unit_names(model)
    return [ParamSpec(name, tuple(p.shape), p.element_size(), p.requires_grad, owner.get(name, ""), id(p) in matmul)
            for name, p in model.named_parameters()]


def _optimizer_groups(model: nn.Module, cfg: TrainConfig) -> list[list[int]]:
    """The trainer's AdamW param groups (`optim.stage_param_groups`) as indices into
    `param_specs(model)`."""
    from .optim import stage_param_groups

    index = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    o = cfg.optim
    return [[index[id(p)] for p in g["params"]]
            for g in stage_param_groups(model.named_parameters(), o.lr, o.weight_decay, o.gate_lr_multiplier)]


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of one training config on `gpus` GPUs (see the module docstring)."""

    model: str
    stage: str
    gpus: int
    tp: int
    dp: int
    data_parallel: str  # "fsdp", "zero1", or "none" at DP = 1
    device: str
    params: int  # whole-model element counts (all TP ranks)
    trainable_params: int
    frozen_weights: int
    trainable_weights: int
    grads: int
    optimizer: int
    fsdp_transient: int
    dpo_reference: int
    activations: int
    activation_parts: dict[str, int] = field(default_factory=dict)
    batch: BatchShape | None = None  # the micro-batch the activations are sized for
    checkpointed: tuple[str, ...] = ()  # activation-checkpointing kinds in effect
    not_checkpointed: tuple[str, ...] = ()  # kinds asked for that this model has no switch for
    gpu_memory: int | None = None
    reserve: int = DEFAULT_RESERVE
    lora_params: int = 0  # whole-model element count of the LoRA adaptors (0: no LoRA)
    lora_bytes: int = 0  # their per-GPU weights + grads + AdamW state, included in the totals above

    @property
    def weights(self) -> int:
        return self.frozen_weights + self.trainable_weights

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.fsdp_transient + self.dpo_reference + self.activations

    @property
    def fits(self) -> bool | None:
        """total + reserve <= gpu_memory (None when no card was given)."""
        return None if self.gpu_memory is None else self.total + self.reserve <= self.gpu_memory

    def fits_card(self, card_bytes: int) -> bool:
        return self.total + self.reserve <= card_bytes


def checkpoint_kinds(cfg: TrainConfig, model: nn.Module) -> tuple[frozenset[str], frozenset[str]]:
    """(kinds checkpointed, kinds asked for but without effect) of config
    `activation_checkpointing` on `model`: the trainer's `apply_activation_checkpointing`
    is applied kind by kind and reports whether it found a switch to turn on."""
    from .parallelize import apply_activation_checkpointing

    ac = cfg.activation_checkpointing
    asked = list(KINDS) if ac is True else ([] if ac is False else list(ac))
    unknown = sorted(set(asked) - set(KINDS))
    if unknown:
        raise ValueError(f"activation_checkpointing: unknown kind(s) {unknown}; kinds: {list(KINDS)}")
    on = frozenset(k for k in asked if apply_activation_checkpointing(model, [k]) > 0)
    return on, frozenset(asked) - on


def batch_shape(cfg: TrainConfig, model: nn.Module, images_per_sample: int = 1) -> BatchShape:
    """The micro-batch the planner sizes activations for: micro_batch_size rows (DPO: pairs,
    2 rows each; data.max_tokens_per_batch: as many full-length rows as the budget holds)
    of data.max_seq_len tokens (capped at the model's); image stages `images_per_sample`
    images (per packed row under data.packing) of data.max_num_tiles tile slots each;
    video stages one clip per row as `video.*` shapes it."""
    args = model.args
    seq = min(cfg.data.max_seq_len, args.max_seq_len)
    budget = getattr(cfg.data, "max_tokens_per_batch", 0)
    pairs = max(1, budget // seq) if budget else cfg.micro_batch_size
    rows = pairs * (2 if cfg.stage == "dpo" else 1)
    packed = bool(getattr(cfg.data, "packing", False))
    if cfg.data.kind in ("video_jsonl", "video_wds"):
        if "video" not in model.modalities:
            raise ValueError(f"data.kind {cfg.data.kind} needs a video stage (stage {cfg.stage} builds no video modality)")
        tower = llava_tower_shape(model)
        if model.modalities["video"].fusion == "projector" and tower is not None:
            # LLaVA-OneVision: every frame is one crop through the image tower, its g x g
            # features pooled to ceil(g/2)^2 tokens or as an image (the pooling's own
            # buffers not counted)
            from llama_vision.model.llava import llava_frame_tokens

            frame = dataclasses.replace(tower, crops=1, tokens_per_image=llava_frame_tokens(args.llava))
            frames = cfg.video.num_frames
            return BatchShape(rows, seq, images=rows * frames, images_per_row=frames, tiles=1, kv_rows=rows,
                              packed=packed, tower=frame)
        vc = model.modalities["video"].encode.cfg
        v = cfg.video
        video = VideoShape(rows, v.num_frames, v.tiles_per_frame, vc.frames_per_group, vc.n_latents, vc.depth,
                           vc.heads or args.n_heads, vc.ffn_hidden_dim or args.ffn_hidden_dim, vc.every_k_image_layers,
                           vc.freeze_image_encoder)
        return BatchShape(rows, seq, video=video, packed=packed)
    if cfg.data.text_only or images_per_sample == 0:
        return BatchShape(rows, seq, packed=packed)
    tower = llava_tower_shape(model)
    if tower is not None:  # a LLaVA model: each image is the tower's crops, not Meta's tiles
        return BatchShape(rows, seq, images=pairs * images_per_sample, images_per_row=images_per_sample, tiles=tower.crops,
                          kv_rows=rows, packed=packed, tower=tower)
    tiles = cfg.data.max_num_tiles or args.vision_max_num_chunks
    return BatchShape(rows, seq, images=pairs * images_per_sample, images_per_row=images_per_sample, tiles=tiles,
                      kv_rows=rows, packed=packed)


def llava_tower_shape(model: nn.Module) -> TowerShape | None:
    """The TowerShape of a model whose image modality is a LLaVA projector modality (its
    `vision_model` a LlavaVisionModel), else None."""
    image = model.modalities.get("image")
    if image is None or image.fusion != "projector":
        return None
    vision = model.vision_model
    if not hasattr(getattr(vision, "vision_encoder", None), "config"):
        raise ValueError(f"the planner sizes LLaVA towers that are ClipVisionTowers, got {type(vision.vision_encoder).__name__}")
    return TowerShape.of(vision)


def plan_memory(
    cfg: TrainConfig,
    gpus: int = 8,
    gpu_memory_bytes: int | None = None,
    *,
    device: str = "cuda",
    images_per_sample: int = 1,
    reserve_bytes: int = DEFAULT_RESERVE,
    model: nn.Module | None = None,
) -> MemoryPlan:
    """Plan `cfg` on `gpus` GPUs (DP = gpus / cfg.tp) of `gpu_memory_bytes` each.
    device: "cuda" (frozen weights in bf16 under dtype bf16, bf16 autocast) or "cpu"
    (float32, what a CPU run stores). `model`: a `build_meta_model(cfg, cfg.tp, device)`
    to reuse (plans of one TP degree share it; its activation-checkpointing switches are
    set as cfg asks, which changes nothing on the meta device)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if gpus < 1 or cfg.tp < 1 or gpus % cfg.tp:
        raise ValueError(f"tp={cfg.tp} does not divide the number of GPUs ({gpus}): the world is DP x TP ranks")
    dp = gpus // cfg.tp
    model = build_meta_model(cfg, cfg.tp, device) if model is None else model
    specs = param_specs(model)
    step_bytes = 4 if device == "cpu" else 0  # AdamW's step counters live on the host for CUDA params
    state = per_rank_state(specs, dp, cfg.data_parallel, optimizer_groups=_optimizer_groups(model, cfg), step_bytes=step_bytes,
                           enclosing_units=fsdp_unit_names(model)[1])
    dpo_reference = state.trainable_weights if cfg.stage == "dpo" else 0

    from .flops import trainable_from_model

    autocast = device == "cuda" and cfg.dtype == "bf16"
    copies = 2 * sum(p.numel for p in specs if p.trainable and p.matmul)
    shape = batch_shape(cfg, model, images_per_sample)
    checkpointed, ineffective = checkpoint_kinds(cfg, model)
    act = estimate_activations(
        model.args, shape, tp=cfg.tp, trainable=trainable_from_model(model), checkpointed=checkpointed,
        autocast=autocast, device_type=device, autocast_copy_bytes=copies,
    )
    total_params, trainable_params = _whole_model_counts(cfg, model, specs)
    lora_specs = [p for p in specs if ".adaptor." in p.name]
    lora_state = per_rank_state(lora_specs, dp, cfg.data_parallel, step_bytes=step_bytes) if lora_specs else None
    lora_bytes = lora_state.trainable_weights + lora_state.grads + lora_state.optimizer if lora_state else 0
    if lora_state and not all(p.trainable for p in lora_specs):  # trainable.lora: false (frozen adaptors)
        lora_bytes += lora_state.frozen_weights
    return MemoryPlan(
        model=cfg.model, stage=cfg.stage, gpus=gpus, tp=cfg.tp, dp=dp, data_parallel=cfg.data_parallel if dp > 1 else "none",
        device=device, params=total_params, trainable_params=trainable_params,
        frozen_weights=state.frozen_weights, trainable_weights=state.trainable_weights, grads=state.grads,
        optimizer=state.optimizer, fsdp_transient=state.fsdp_transient, dpo_reference=dpo_reference,
        activations=act.total, activation_parts=act.parts, batch=shape, checkpointed=tuple(sorted(checkpointed)),
        not_checkpointed=tuple(sorted(ineffective)), gpu_memory=gpu_memory_bytes, reserve=reserve_bytes,
        lora_params=_whole_model_counts(cfg, model, lora_specs)[0], lora_bytes=lora_bytes,
    )


def _whole_model_counts(cfg: TrainConfig, model: nn.Module, specs: Sequence[ParamSpec]) -> tuple[int, int]:
    """(parameters, trainable parameters) of the whole model: TP-split tensors x tp."""
    import model_parallel as mp

    plan = mp.shard_plan(model, "runtime")
    total = trainable = 0
    for p in specs:
        n = p.numel * (cfg.tp if plan.get(p.name) is not None else 1)
        total += n
        trainable += n if p.trainable else 0
    return total, trainable


# --------------------------------------------------------------------------- reports


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _describe_batch(plan: MemoryPlan) -> str:
    b = plan.batch
    if b is None:
        return ""
    what = f"{b.rows} x {b.seq_len} tokens"
    if b.images and b.tower is not None:
        t = b.tower
        what += (f", {b.images} image(s) x {t.crops} crop(s) of {t.image_size} px through the LLaVA tower, "
                 f"{t.tokens_per_image} tokens each")
        if t.crops > 1:
            what += " (AnyRes: its largest grid; packing not counted)"
    elif b.images:
        what += f", {b.images} image(s) x {b.tiles} tiles"
    if b.video is not None:
        what += f", {b.video.videos} video(s) x {b.video.frames} frames x {b.video.tiles} tiles"
    ac = ", ".join(plan.checkpointed) or "none"
    note = f"; asked but no switch in the model: {', '.join(plan.not_checkpointed)}" if plan.not_checkpointed else ""
    return f"({what}; activation checkpointing: {ac}{note})"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.2f}M"


def format_plan(plan: MemoryPlan) -> str:
    """A human-readable report of `plan` per GPU, in GiB (MiB for plans under 1 GiB)."""
    unit, scale = ("GiB", GIB) if plan.total >= GIB else ("MiB", 1 << 20)
    size = lambda n: f"{n / scale:8.1f}"  # noqa: E731
    mode = {"none": "no data parallelism (DP = 1)", "fsdp": "FSDP", "zero1": "ZeRO-1"}[plan.data_parallel]
    lines = [
        f"{plan.model} ({plan.stage}): {_count(plan.params)} parameters, {_count(plan.trainable_params)} trainable",
        f"{plan.gpus} GPUs = TP {plan.tp} x DP {plan.dp}, {mode}, planned for {plan.device}",
        "",
        f"{unit} per GPU",
        f"  weights, frozen        {size(plan.frozen_weights)}",
        f"  weights, trainable     {size(plan.trainable_weights)}",
        f"  gradients              {size(plan.grads)}",
        f"  optimizer (AdamW)      {size(plan.optimizer)}",
    ]
    if plan.lora_params:
        lines.append(f"  LoRA, in the above     {size(plan.lora_bytes)}   ({_count(plan.lora_params)} adaptor parameters: "
                     f"weights + gradients + AdamW state)")
    if plan.fsdp_transient:
        lines.append(f"  FSDP all-gather        {size(plan.fsdp_transient)}")
    if plan.dpo_reference:
        lines.append(f"  DPO reference          {size(plan.dpo_reference)}")
    lines.append(f"  activations (est.)     {size(plan.activations)}   {_describe_batch(plan)}")
    for name, value in sorted(plan.activation_parts.items(), key=lambda kv: -kv[1]):
        if value:
            lines.append(f"    {name:<20} {size(value)}")
    lines.append(f"  total                  {size(plan.total)}")
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} a {plan.gpu_memory / GIB:.1f} GiB card (with {plan.reserve / GIB:.1f} GiB reserved)")
    return "\n".join(lines)


#: The README table's configs: (label, model params), trained as configs/train/image_sft.yaml.
README_MODELS = (("11B", "configs/model/llama3_2_11b_vision.yaml"), ("90B", "configs/model/llama3_2_90b_vision.yaml"))
README_BASE = "configs/train/image_sft.yaml"
#: image_sft.yaml trains at the paper's 448 px; the Llama 3.2 models use 560 px tiles.
README_OVERRIDES = ("model_overrides.vision_chunk_size=560", "data.tile_size=560")


def readme_table(root: str | Path = ".", gpus: int = 8, tps: Sequence[int] = (1, 2, 8),
                 modes: Sequence[str] = ("fsdp", "zero1")) -> str:
    """The README's "Memory per GPU" table (markdown): 11B and 90B image-stage training
    (image_sft.yaml's trainable groups, 560 px tiles) at each TP degree and data-parallel
    mode on one node of `gpus` GPUs, and whether each fits the CARDS."""
    from llama_vision.config import load_config

    root = Path(root)
    head = ["model", "TP x DP", "data parallel", "weights", "grads", "AdamW", "FSDP gather", "activations", "total"]
    head += [f"fits {name}" for name in CARDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, model_path in README_MODELS:
        for tp in tps:
            model = None
            for mode in modes:
                cfg = load_config(TrainConfig, root / README_BASE,
                                  [f"model={root / model_path}", *README_OVERRIDES, f"tp={tp}", f"data_parallel={mode}"])
                model = model or build_meta_model(cfg, tp, "cuda")
                plan = plan_memory(cfg, gpus, device="cuda", model=model)
                cells = [label, f"{tp} x {plan.dp}", mode, _gib(plan.weights), _gib(plan.grads), _gib(plan.optimizer),
                         _gib(plan.fsdp_transient), _gib(plan.activations), _gib(plan.total)]
                cells += ["yes" if plan.fits_card(card) else "no" for card in CARDS.values()]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
