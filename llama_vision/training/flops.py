"""Matmul FLOPs of one training step of the WHOLE model replica, for MFU.

One count, used by the trainer's logged MFU and by ``benchmarks/train_step.py``::

    shapes = step_shape_from_batch(batch)                      # cheap: no forward pass
    count = step_flops(model.args, shapes, trainable_from_model(model))
    mfu(count.total, step_time_s, tp=mp.tp_size(), peak_flops_per_gpu=peak)

Conventions
-----------
* **What is counted.** Matrix multiplies only, 2 FLOPs per multiply-add: every linear
  layer, the patch embedding (an unfold + linear here, a conv in other encoders), the LM
  head, and attention scores and weighted sums (``QK^T`` and ``AV``: ``2 * 2 * head_dim``
  per (query head, key) pair). Norms, activations, softmax, RoPE, embedding lookups,
  gates, the loss and the optimizer are not counted (elementwise: a few per cent at most).
* **Whole replica, full shapes.** Sizes come from :class:`ModelArgs` (the unsharded
  model), never from a tensor-parallel rank's shards, so the count is the same at every TP
  degree. A replica of ``tp`` GPUs does this work together:
  ``MFU = total / (tp * step_time * peak_per_gpu)`` (:func:`mfu`).
* **Model FLOPs, not hardware FLOPs.** Activation-checkpointing recomputation and the
  backward kernels' re-computation of attention scores (flash attention) are not counted.
* **Causal self-attention** counts the attended keys exactly: a row of ``L`` tokens has
  ``L (L + 1) / 2`` (query, key) pairs per head and layer (flash kernels skip the masked
  half). Attention under an arbitrary boolean mask (cross-attention, the image encoder,
  the perceiver) is counted dense over the keys the kernel is given, since the kernels
  compute masked pairs too.
* **Padding.** Batch padding is left out by default (``include_padding=False``): text
  positions past a row's length and media slots a row does not use (absent images or
  videos) -- work whose result no output depends on. Padding that the model's function
  does depend on is counted: the image encoder runs every tile slot of an image (empty
  tile slots included) with each tile's tokens padded to a multiple of 8, and real
  tokens attend to that padding (the released encoder's quirk, see ``vision.py``).
  ``include_padding=True`` counts the batch as the hardware runs it (every row at the
  padded length, every media slot), which is what an op-level FLOP counter measures.
* **The image encoder**: per image of ``T`` tile slots, ``T * ceil8(grid^2 + 1)`` tokens
  through all ``vision_layers + vision_global_layers`` layers; BOTH the "local" and the
  global layers attend over all tiles of the image (as Meta's encoder does: the local
  transformer also runs on the concatenated tiles, under the padding mask); the patch
  embedding per patch (``T * grid^2``, no class token); the projection to the decoder
  width per output token (``T * (grid^2 + 1)``, pad-to-8 tokens dropped).
* **Cross-attention blocks** (run for every text token of a batch that holds the
  modality, rows without media included -- the block runs and its row mask zeroes them):
  Q, O and the FFN per text token; K and V once per block per media token of the row;
  scores and weighted sum ``text tokens x media tokens`` of the row.
* **Video** (``ModelArgs.video``): each encoded (valid) frame is an image of the video's
  tile slots through the image encoder + projection; the perceiver per group of
  ``frames_per_group`` frames (``ceil(slots / frames_per_group)`` groups, ``slots`` =
  the frames the aggregator is given): ``n_latents`` queries, keys/values over the
  group's ``frames_per_group * T * (grid^2 + 1)`` frame tokens plus the latents; the video
  cross-attention blocks read ``groups * n_latents`` tokens per video.
* **Backward**, per matmul ``Y = A @ B``: one matmul of the forward's size for each
  operand that requires grad (autograd computes exactly those): the weight's gradient if
  the weight trains, the input's if anything trainable lies upstream of it. So a module
  costs 2x its forward for activation gradients when the loss's gradient must flow
  through it to a trainable parameter upstream (the frozen decoder when adapters inside
  it train), plus 2x its trainable weights' forward for their gradients, and nothing when
  nothing upstream trains (the frozen image encoder when only adapters train).
  Trainability is by group (``llama_vision.model.trainability``): "decoder", "vision",
  "adapters" (image projection, image cross-attention, the learnable special-token
  rows), "video" (aggregator, video cross-attention, the <|video|> row). NB: the
  learnable rows sit at the input of the decoder, so whenever a batch holds a media
  placeholder and "adapters" (or "video") trains, the gradient flows back through EVERY
  decoder layer, not only those after the first adapter. Frames of a video are encoded
  under ``no_grad`` when ``VideoConfig.freeze_image_encoder`` (the default).
* A forward pass without backward (DPO's reference model, ``StepShape.backward=False``)
  counts its forward only.

Only the image and video modalities are known here; a modality added with
``add_modality`` by user code is not counted (:func:`trainable_from_model` refuses
models that have one).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, NamedTuple, Sequence

from llama_vision.model.args import ModelArgs
from llama_vision.model.modality import every_kth

__all__ = [
    "COMPONENTS",
    "GROUPS",
    "FlopCount",
    "StepShape",
    "VideoItem",
    "mfu",
    "step_flops",
    "step_shape_from_batch",
    "trainable_from_model",
]

GROUPS = ("decoder", "vision", "adapters", "video")

#: Breakdown keys, in model order.
COMPONENTS = (
    "vision",  # image encoder over images: patch embedding, linears, attention
    "vision_projection",  # encoder features -> decoder width (images)
    "video_encoder",  # video frames through the image encoder + projection
    "video_aggregator",  # the perceiver
    "video_cross_attention",  # video adapter blocks: linears + attention
    "cross_attention",  # image adapter blocks: linears + attention
    "decoder",  # self-attention layers' linears (q, k, v, o) and FFNs
    "self_attention",  # causal scores + weighted sums
    "lm_head",  # the output projection to the vocabulary
)


class VideoItem(NamedTuple):
    """One video of a row. frames: frames run through the image encoder (its valid
    frames); tiles: tile slots per frame; slots: frames the aggregator groups
    (``ceil(slots / frames_per_group)`` groups)."""

    frames: int
    tiles: int
    slots: int


@dataclass(frozen=True)
class StepShape:
    """What one forward (+ backward) pass of the model processes, in plain numbers.

    text_lengths: tokens through the decoder, per row.
    image_tiles: per row, the tile slots of each of its images (empty: no image).
    videos: per row, its videos (:class:`VideoItem`).
    backward: the loss's gradient flows back through this pass (False: a no-grad forward).
    media_source: per row, the row whose encoded media (encoder output and every
        adapter's K/V) it reads; rows sharing a source encode it once (DPO's chosen and
        rejected continuations of one prompt). Empty: every row encodes its own.
    """

    text_lengths: tuple[int, ...]
    image_tiles: tuple[tuple[int, ...], ...] = ()
    videos: tuple[tuple[VideoItem, ...], ...] = ()
    backward: bool = True
    media_source: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_lengths", tuple(int(n) for n in self.text_lengths))
        object.__setattr__(self, "image_tiles", tuple(tuple(int(t) for t in row) for row in self.image_tiles))
        object.__setattr__(self, "videos", tuple(tuple(VideoItem(*map(int, v)) for v in row) for row in self.videos))
        object.__setattr__(self, "media_source", tuple(int(r) for r in self.media_source))
        rows = len(self.text_lengths)
        if any(not 0 <= r < rows for r in self.media_source):
            raise ValueError(f"StepShape.media_source {self.media_source} names rows outside [0, {rows})")
        for name in ("image_tiles", "videos", "media_source"):
            got = len(getattr(self, name))
            if got not in (0, rows):
                raise ValueError(f"StepShape.{name} has {got} rows, text_lengths has {rows}")

    @property
    def encoded_rows(self) -> list[int]:
        """The rows whose media are encoded (and projected to K/V) in this pass."""
        return sorted(set(self.media_source)) if self.media_source else list(range(len(self.text_lengths)))

    @property
    def has_images(self) -> bool:
        return any(self.image_tiles)

    @property
    def has_videos(self) -> bool:
        return any(self.videos)


@dataclass
class FlopCount:
    """Per-component FLOPs (keys from :data:`COMPONENTS`): the forward, and the backward's
    activation-gradient and weight-gradient matmuls."""

    forward: dict[str, int] = field(default_factory=dict)
    backward_activation: dict[str, int] = field(default_factory=dict)
    backward_weight: dict[str, int] = field(default_factory=dict)

    @property
    def forward_total(self) -> int:
        return sum(self.forward.values())

    @property
    def backward_total(self) -> int:
        return sum(self.backward_activation.values()) + sum(self.backward_weight.values())

    @property
    def total(self) -> int:
        return self.forward_total + self.backward_total

    def component(self, name: str) -> int:
        """Forward + backward of one component."""
        return self.forward.get(name, 0) + self.backward_activation.get(name, 0) + self.backward_weight.get(name, 0)

    def breakdown(self) -> dict[str, int]:
        """Flat dict for logs: ``forward/<component>``, ``backward/<component>`` (both
        gradient kinds), ``forward``, ``backward``, ``total``; zero entries left out."""
        out = {}
        for c in COMPONENTS:
            if self.forward.get(c):
                out[f"forward/{c}"] = self.forward[c]
        for c in COMPONENTS:
            b = self.backward_activation.get(c, 0) + self.backward_weight.get(c, 0)
            if b:
                out[f"backward/{c}"] = b
        out.update(forward=self.forward_total, backward=self.backward_total, total=self.total)
        return out

    def __add__(self, other: "FlopCount") -> "FlopCount":
        def merge(a, b):
            out = dict(a)
            for k, v in b.items():
                out[k] = out.get(k, 0) + v
            return out

        return FlopCount(merge(self.forward, other.forward), merge(self.backward_activation, other.backward_activation),
                         merge(self.backward_weight, other.backward_weight))


class _Counter:
    def __init__(self, backward: bool):
        self.backward = backward
        self.fwd: dict[str, int] = defaultdict(int)
        self.act: dict[str, int] = defaultdict(int)
        self.wgt: dict[str, int] = defaultdict(int)

    def linear(self, comp: str, tokens: int, d_in: int, d_out: int, x_grad: bool, w_grad: bool) -> None:
        """tokens x [d_in] @ [d_in, d_out]; backward: dX if x_grad, dW if w_grad."""
        f = 2 * tokens * d_in * d_out
        self.fwd[comp] += f
        if self.backward:
            self.act[comp] += f * bool(x_grad)
            self.wgt[comp] += f * bool(w_grad)

    def matmul(self, comp: str, f: int, a_grad: bool, b_grad: bool) -> None:
        """An activation x activation product of f FLOPs (attention)."""
        self.fwd[comp] += f
        if self.backward:
            self.act[comp] += f * (bool(a_grad) + bool(b_grad))

    def result(self) -> FlopCount:
        keep = lambda d: {k: v for k, v in d.items() if v}  # noqa: E731
        return FlopCount(keep(self.fwd), keep(self.act), keep(self.wgt))


def _ceil8(n: int) -> int:
    return n + (8 - n % 8) % 8


def _trainable_set(trainable: Iterable[str] | Mapping[str, bool]) -> frozenset[str]:
    if isinstance(trainable, Mapping):
        names = {g for g, on in trainable.items() if on}
        unknown = set(trainable) - set(GROUPS)
    else:
        names = set(trainable)
        unknown = names - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown trainability group(s) {sorted(unknown)}; groups: {list(GROUPS)}")
    return frozenset(names)


def _video_config(args: ModelArgs):
    if args.video is None:
        return None
    from llama_vision.model.video import VideoConfig

    return VideoConfig(**args.video)


def _image_encoder(c: _Counter, comp: str, args: ModelArgs, tiles: Sequence[int], enc_grad: bool, proj_grad: bool) -> None:
    """Images of `tiles` tile slots each through the encoder + projection. enc_grad: the
    encoder's weights train (so do its activations); proj_grad: the projection's do."""
    if not tiles:
        return
    w, p, grid2 = args.vision_width, args.vision_patch_size, args.vision_grid**2
    ntok = grid2 + 1
    per_tile = _ceil8(ntok)
    hidden = int(args.vision_mlp_ratio * w)
    layers = args.vision_layers + args.vision_global_layers
    n_tiles = sum(tiles)
    tokens = n_tiles * per_tile
    pairs = sum((t * per_tile) ** 2 for t in tiles)  # every token of an image sees every one
    c.linear(comp, n_tiles * grid2, args.vision_in_channels * p * p, w, x_grad=False, w_grad=enc_grad)
    for _ in range(layers):
        for _ in range(4):  # wq, wk, wv, wo
            c.linear(comp, tokens, w, w, enc_grad, enc_grad)
        c.matmul(comp, 2 * w * pairs, enc_grad, enc_grad)  # Q K^T (heads * head_dim = width)
        c.matmul(comp, 2 * w * pairs, enc_grad, enc_grad)  # A V
        c.linear(comp, tokens, w, hidden, enc_grad, enc_grad)  # c_fc
        c.linear(comp, tokens, hidden, w, enc_grad, enc_grad)  # c_proj
    proj = "vision_projection" if comp == "vision" else comp
    c.linear(proj, n_tiles * ntok, args.vision_output_dim, args.dim, x_grad=enc_grad, w_grad=proj_grad)


def _adapter_block(c: _Counter, comp: str, args: ModelArgs, lengths: Sequence[int], media: Sequence[int], kv_tokens: int,
                   h_grad: bool, media_grad: bool, trains: bool) -> bool:
    """One gated cross-attention block; lengths/media: text and media tokens per row;
    kv_tokens: media tokens projected to K/V (each encoded media once).
    Returns whether the residual stream requires grad after it."""
    d, hd, ffn = args.dim, args.head_dim, args.ffn_hidden_dim
    q_w, kv_w = args.n_heads * hd, args.n_kv_heads * hd
    text = sum(lengths)
    pairs = sum(n * m for n, m in zip(lengths, media))
    c.linear(comp, text, d, q_w, h_grad, trains)  # wq
    c.linear(comp, kv_tokens, d, kv_w, media_grad, trains)  # wk (once per block per media token)
    c.linear(comp, kv_tokens, d, kv_w, media_grad, trains)  # wv
    q_g, kv_g = h_grad or trains, media_grad or trains
    c.matmul(comp, 2 * hd * args.n_heads * pairs, q_g, kv_g)  # Q K^T
    c.matmul(comp, 2 * hd * args.n_heads * pairs, q_g or kv_g, kv_g)  # A V
    out_g = q_g or kv_g
    c.linear(comp, text, q_w, d, out_g, trains)  # wo
    h_g = h_grad or out_g or trains
    c.linear(comp, text, d, ffn, h_g, trains)  # w1
    c.linear(comp, text, d, ffn, h_g, trains)  # w3
    c.linear(comp, text, ffn, d, h_g, trains)  # w2
    return h_g


def _aggregator(c: _Counter, args: ModelArgs, cfg, videos: Sequence[VideoItem], trains: bool, frames_grad: bool) -> None:
    d = args.dim
    ffn = cfg.ffn_hidden_dim or args.ffn_hidden_dim
    q = cfg.n_latents
    groups = sum(math.ceil(v.slots / cfg.frames_per_group) for v in videos)
    # Keys/values of a group: its frames_per_group frames (a partial last group is
    # padded with masked frames) of tiles * (grid^2 + 1) tokens, then the latents.
    kv = sum(math.ceil(v.slots / cfg.frames_per_group) * (cfg.frames_per_group * v.tiles * args.vision_tokens_per_tile + q)
             for v in videos)
    pairs = sum(math.ceil(v.slots / cfg.frames_per_group) * q * (cfg.frames_per_group * v.tiles * args.vision_tokens_per_tile + q)
                for v in videos)
    comp = "video_aggregator"
    for layer in range(cfg.depth):
        lat_g = trains if layer == 0 else (trains or frames_grad)
        kv_g = trains or frames_grad
        c.linear(comp, groups * q, d, d, lat_g, trains)  # wq
        c.linear(comp, kv, d, d, kv_g, trains)  # wk
        c.linear(comp, kv, d, d, kv_g, trains)  # wv
        q_g = lat_g or trains
        c.matmul(comp, 2 * d * pairs, q_g, kv_g)  # Q K^T
        c.matmul(comp, 2 * d * pairs, q_g or kv_g, kv_g)  # A V
        c.linear(comp, groups * q, d, d, q_g or kv_g, trains)  # wo
        for d_in, d_out in ((d, ffn), (d, ffn), (ffn, d)):  # w1, w3, w2
            c.linear(comp, groups * q, d_in, d_out, trains or frames_grad, trains)


def _pass_flops(args: ModelArgs, shape: StepShape, trainable: frozenset[str]) -> FlopCount:
    c = _Counter(shape.backward)
    dec, vis, ada, vid = ("decoder" in trainable, "vision" in trainable, "adapters" in trainable, "video" in trainable)
    lengths = shape.text_lengths
    rows = len(lengths)
    cfg = _video_config(args)
    if shape.has_videos and cfg is None:
        raise ValueError("the step has videos but the model has no video modality (ModelArgs.video is None)")
    max_tiles = max([t for row in shape.image_tiles for t in row] + [v.tiles for row in shape.videos for v in row] + [0])
    if max_tiles > args.vision_max_num_chunks:
        raise ValueError(f"{max_tiles} tile slots per image, more than vision_max_num_chunks={args.vision_max_num_chunks}")

    # Media encoders, over the rows that encode their own media.
    encoded = shape.encoded_rows
    image_media = [0] * rows
    if shape.has_images:
        _image_encoder(c, "vision", args, [t for r in encoded for t in shape.image_tiles[r]], vis, ada)
        image_media = [sum(row) * args.vision_tokens_per_tile for row in shape.image_tiles]
    image_grad = vis or ada
    video_media = [0] * rows
    video_grad = False
    if shape.has_videos:
        items = [v for r in encoded for v in shape.videos[r]]
        frames_grad = not cfg.freeze_image_encoder and (vis or ada)
        _image_encoder(c, "video_encoder", args, [v.tiles for v in items for _ in range(v.frames)],
                       vis and not cfg.freeze_image_encoder, ada and not cfg.freeze_image_encoder)
        _aggregator(c, args, cfg, items, vid, frames_grad)
        video_media = [sum(math.ceil(v.slots / cfg.frames_per_group) for v in row) * cfg.n_latents for row in shape.videos]
        video_grad = vid or frames_grad

    # The decoder stream; the learnable special-token rows (adapters group) and the
    # <|video|> row (video group) are read whenever a placeholder is in the batch.
    media_present = shape.has_images or shape.has_videos
    g = dec or (media_present and (ada or (cfg is not None and vid)))
    d, hd, ffn = args.dim, args.head_dim, args.ffn_hidden_dim
    q_w, kv_w = args.n_heads * hd, args.n_kv_heads * hd
    text = sum(lengths)
    causal_pairs = sum(n * (n + 1) // 2 for n in lengths)
    image_layers = set(args.fusion_schedule) if shape.has_images else set()
    video_layers = set(every_kth(args.fusion_schedule, cfg.every_k_image_layers)) if shape.has_videos else set()
    for i in range(args.n_layers):
        if i in video_layers:  # video blocks run before the image block at a shared layer
            g = _adapter_block(c, "video_cross_attention", args, lengths, video_media,
                               sum(video_media[r] for r in encoded), g, video_grad, vid)
        if i in image_layers:
            g = _adapter_block(c, "cross_attention", args, lengths, image_media,
                               sum(image_media[r] for r in encoded), g, image_grad, ada)
        c.linear("decoder", text, d, q_w, g, dec)  # wq
        c.linear("decoder", text, d, kv_w, g, dec)  # wk
        c.linear("decoder", text, d, kv_w, g, dec)  # wv
        c.matmul("self_attention", 2 * hd * args.n_heads * causal_pairs, g, g)  # Q K^T
        c.matmul("self_attention", 2 * hd * args.n_heads * causal_pairs, g, g)  # A V
        c.linear("decoder", text, q_w, d, g, dec)  # wo
        c.linear("decoder", text, d, ffn, g, dec)  # w1
        c.linear("decoder", text, d, ffn, g, dec)  # w3
        c.linear("decoder", text, ffn, d, g, dec)  # w2
    c.linear("lm_head", text, d, args.vocab_size, g, dec)  # logits at every position
    return c.result()


def step_flops(args: ModelArgs, shapes: StepShape | Iterable[StepShape], trainable: Iterable[str] | Mapping[str, bool]) -> FlopCount:
    """Matmul FLOPs of the whole (unsharded) model for the passes in `shapes` (one step:
    every micro-batch, DPO's chosen/rejected/reference passes), with `trainable` the
    trainability groups that train ("decoder", "vision", "adapters", "video"; a set of
    names or set_trainable-style flags). See the module docstring for the conventions."""
    trainable = _trainable_set(trainable)
    if isinstance(shapes, StepShape):
        shapes = [shapes]
    total = FlopCount()
    for shape in shapes:
        total = total + _pass_flops(args, shape, trainable)
    return total


def trainable_from_model(model) -> frozenset[str]:
    """The trainability groups of `model` with any parameter that requires grad."""
    from llama_vision.model.trainability import trainable_groups

    extra = sorted(set(model.modalities) - {"image", "video"})
    if extra:
        raise ValueError(f"step_flops does not know modalities {extra} (only image and video)")
    # LoRA adaptors ("lora") are not counted: their r-wide matmuls are small next to the
    # base projections, and the input gradients they need through frozen modules below the
    # first trainable ones are left out too (an under-count for LoRA on the trunk).
    return frozenset(g for g, params in trainable_groups(model).items()
                     if g != "lora" and any(p.requires_grad for _, p in params))


def step_shape_from_batch(batch, *, include_padding: bool = False, reference: bool = True) -> list[StepShape]:
    """The passes a training step runs on `batch` (a Batch, VideoBatch or PreferenceBatch),
    from its shapes and counts only (nothing is moved off the device but small counts).

    include_padding=False (default): real text tokens per row (``lengths``) and the media
    each row holds (``num_images``; videos with frames); True: every row at the padded
    length and every media slot, as the hardware runs them. A PreferenceBatch gives what
    `objectives.PairScorer` runs: ONE pass over [chosen rows; rejected rows] in which the
    rejected rows read the chosen rows' encoded media (each pair's images encoded once),
    with backward for the policy and, if `reference`, the same pass forward-only for the
    reference model (it shares the policy's architecture).

    A packed Batch (``segment_ids``, ``data.packing``) with include_padding=False counts
    each packed sample as a row of its own (its tokens, its images): self-attention is
    causal within the sample and cross-attention reads only its own images, so the count
    is the useful work and equals the same samples unpacked. include_padding=True counts
    the packed rows as the hardware runs them (every row at the padded length, every slot).
    """
    from llama_vision.data.batch import PreferenceBatch

    if isinstance(batch, PreferenceBatch):
        chosen, rejected = _lm_shape(batch.chosen, include_padding, True), _lm_shape(batch.rejected, include_padding, True)
        n = len(chosen.text_lengths)
        if include_padding:  # the pair's rows are padded to one length in PairScorer
            width = max(chosen.text_lengths + rejected.text_lengths)
            lengths = (width,) * (2 * n)
        else:
            lengths = chosen.text_lengths + rejected.text_lengths
        pair = StepShape(lengths, chosen.image_tiles * 2 if chosen.image_tiles else (), media_source=tuple(range(n)) * 2)
        return [pair] + ([replace(pair, backward=False)] if reference else [])
    if getattr(batch, "segment_ids", None) is not None and not include_padding:
        return [_packed_shape(batch, True)]
    return [_lm_shape(batch, include_padding, True)]


def _packed_shape(batch, backward: bool) -> StepShape:
    """Each packed sample as its own row: its length and its images' tile slots."""
    # No image_segments (e.g. a blank stand-in image no token attends to): no images.
    image_rows = batch.image_segments.tolist() if batch.images is not None and batch.image_segments is not None else None
    tiles = batch.images.shape[2] if image_rows is not None else 0
    lengths, images = [], []
    for b, row in enumerate(batch.segment_ids.tolist()):
        counts: dict[int, int] = defaultdict(int)
        for s in row:
            if s >= 0:
                counts[s] += 1
        for s in sorted(counts):
            lengths.append(counts[s])
            if image_rows is not None:
                images.append((tiles,) * sum(1 for owner in image_rows[b] if owner == s))
    return StepShape(tuple(lengths), tuple(images), (), backward)


def _lm_shape(batch, include_padding: bool, backward: bool) -> StepShape:
    rows, width = batch.tokens.shape
    lengths = [width] * rows if include_padding else [int(n) for n in batch.lengths.tolist()]
    images = ()
    if batch.images is not None:
        slots, tiles = batch.images.shape[1], batch.images.shape[2]
        counts = [slots] * rows if include_padding else [int(n) for n in batch.num_images.tolist()]
        images = tuple((tiles,) * n for n in counts)
    videos = ()
    if getattr(batch, "videos", None) is not None:
        f, t = batch.videos.shape[2], batch.videos.shape[3]
        frames = batch.video_frames.tolist()
        videos = tuple(
            tuple(VideoItem(int(n), t, f if include_padding else int(n)) for n in row if include_padding or n > 0)
            for row in frames
        )
    return StepShape(tuple(lengths), images, videos, backward)


def mfu(flops_per_replica: float, step_time_s: float, tp: int = 1, peak_flops_per_gpu: float | None = None) -> float | None:
    """Model FLOPs utilisation of a replica of `tp` GPUs: ``flops / (tp * step_time * peak)``.

    `flops_per_replica` is the whole model's work for the step (:func:`step_flops`);
    ``peak_flops_per_gpu=None`` looks up the current CUDA device. None when the peak is
    unknown (CPU, unlisted GPU) or the step time is not positive. Data parallel: pass the
    mean over replicas (every replica runs the same step time)."""
    from .metrics import estimate_mfu

    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    return estimate_mfu(flops_per_replica / tp, step_time_s, peak_flops_per_gpu)
