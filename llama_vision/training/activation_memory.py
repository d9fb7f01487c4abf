"""Activation memory of one training micro-batch on one GPU, counted from shapes: the
tensors autograd keeps for backward in this model's code, plus the transients around
the loss and one layer's backward. No forward pass is run.

Notation (per GPU, TP degree ``tp``): D = dim; qw = (n_heads / tp) * head_dim; kvw =
max(1, n_kv_heads / tp) * head_dim (one KV head per rank when tp > n_kv_heads, as
``GQAProjections``); F = ffn_hidden_dim / tp; H = n_heads / tp; V = vocab_size; W =
vision_width, Wl = W / tp, Fv = int(vision_mlp_ratio * W) / tp, Hv = vision_heads / tp.
Bytes per element: f = 4 (float32: the residual streams, every norm's saved input, the
norms' outputs, log-softmax), c = 2 under bf16 autocast (GPU, ``dtype: bf16``: linear and
attention outputs), else 4. ``lin(x)`` is what a TRAINABLE linear keeps of its float32
input x (``x`` elements): c * x * k under autocast, which casts the input once per
consuming linear (k consumers: 3 for wq/wk/wv, 2 for w1/w3), else f * x (one shared
tensor). A frozen linear keeps nothing of its input. Masked SDPA calls (image encoder,
cross-attention, perceiver) convert their boolean mask to a float mask of q's dtype and
keep it: c per (query, key) pair. On CUDA a masked call also expands GQA K/V to every
query head (``attention.sdpa``), so cross-attention keeps K/V at qw, not kvw.

Per token, per unit, when the unit saves anything (its weights train or a gradient flows
through it; checkpointed units keep only their input, f * D (or f * W), and recompute):

* decoder layer (``TransformerBlock``): f*(2D + 2 + H) + c*(2qw + 2kvw + 3F); trainable
  weights add f*2D (RMSNorm outputs for the norm weights) + lin(D, k=3) + lin(D, k=2) +
  c*F (w2's input). Packed rows (data.packing) attend under a segment mask: + c*S (the
  float mask over the row's S keys), and on CUDA K/V at qw.
* image / video adapter block (``GatedCrossAttentionBlock``), per text token:
  f*(4D + 2 + 2qw + 2H) + c*(D + 2qw + 3F) + c*Tm (the float mask over the row's Tm media
  tokens) + lin(D, 1) + lin(qw, 1) + lin(D, 2) + c*F; per media token (K/V, computed in
  ``prepare_media`` OUTSIDE the block, so never recomputed): f*2kvw (+ rsqrt) + c*2kv',
  kv' = qw on CUDA, kvw on the CPU.
* ViT layer (``ImageTransformerBlock``), per token of the image's L = tiles * ceil8(P)
  padded tokens: f*(2W + 4 + Hv) + c*(4Wl + 2Fv) + c*L (float mask) + lin(W, 3) +
  lin(W, 1); gated (global) layers + c*2W (branch outputs for the gate gradients).
* ViT stem and head per image: patches lin(3p^2) per patch, position tables, ln_pre /
  ln_post inputs f*W per token; projection input lin((1 + taps) * W) per real token
  (P = grid^2 + 1 per tile) when the projection trains; the projection's output (the
  media tokens every adapter's wk / wv read) c*D per media token, once.
* LLaVA tower (a projector modality, llama_vision.model.llava; replicated at TP > 1: it
  runs whole on every rank), per token of the n = g^2 (+1 CLIP class token) tokens of
  each crop, Wt = the tower's width, Mt = its MLP width, Ht = its heads, only when the
  tower trains (otherwise no input of it needs a gradient and it keeps nothing). Per
  block (ClipBlock; the selected layer's blocks run, those after it do not):
  f*(2Wt + 4 + Ht) (both LayerNorms' inputs and stats, SDPA's logsumexp) + c*(4Wt + Mt)
  (q, k, v, the attention output out_proj reads, fc1's output) + the activation's
  (QuickGELU: its sigmoid and product, c*2Mt; GELU / tanh-GELU: fc2's input, c*Mt) + both
  LayerNorms' outputs (the q/k/v and fc1 inputs: f*2Wt; under autocast the linears' own
  bf16 copies, lin(Wt, 3) + lin(Wt, 1)). Stem: the pixels lin(3p^2) per patch, CLIP's
  ln_pre input and stats f*(Wt + 2) per token, ln_post's likewise under post_layernorm.
  Projector per crop: linear_1's input (the tower's output storage, all n tokens; its bf16
  copy under autocast) when it trains; its output c*D (GELU's input, mlp2x_gelu) when a
  gradient flows, linear_2's input c*D when it trains. The placement of its tokens in the
  decoder input: the index of every valid token (int64 x 3) and the masked_scatter /
  where masks (a byte per text token each).
* perceiver layer (video aggregator), per media token of a group: f*2 + lin(D, 2) +
  c*2Dl (K/V, Dl = D / tp); per latent: f*(2D + 4 + H) + lin(D, 3) + c*(2Dl + 4F') +
  c*(M + Q) (float mask over the group's M media + Q latent keys).

Around them: the batch (tokens, labels int64; images float32 [n, T, 3, S, S]), the RoPE
rotations (complex64), the boolean masks (once per forward), and

* autocast copies: under bf16 autocast every trainable float32 weight a linear reads is
  cast to bf16 once per forward and kept for backward: 2 bytes per TP-local trainable
  linear weight element (passed in by the planner, which knows the parameters).
* transient = max(loss head, backward working set): the loss head is f*3V per text token
  (log-softmax output, its gradient and the logits' gradient, full V on every TP rank:
  the logits are gathered); the working set is one unit's full saved set (its
  intermediates' gradients) plus, when that kind is checkpointed, the same again for its
  recomputed forward. A video stage's frozen frame encoding (no_grad) runs before the
  decoder; its one-layer working set over all frames is in the same max.

activations = inputs + sum(stored per unit) + media + autocast copies + transient.

Checked against the real thing on the CPU (float32): the saved-tensor bytes of a forward
on tiny configs (tests/test_plan_memory.py, `torch.autograd.graph.saved_tensors_hooks`;
Meta's ViT, and a LLaVA CLIP / SigLIP tower + projector without AnyRes) and the RSS of a
whole training step on a ~50M-parameter config. AnyRes (LLaVA-NeXT / OneVision) is sized
for its largest grid (the most crops and tokens an image can take) and its packing is not
counted: not checked. The bf16-autocast / CUDA coefficients follow the same code paths but
have not been measured on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from llama_vision.model.args import ModelArgs
from llama_vision.model.modality import every_kth

__all__ = ["KINDS", "ActivationEstimate", "BatchShape", "TowerShape", "VideoShape", "estimate_activations"]

F32 = 4
#: Activation-checkpointing kinds (config `activation_checkpointing`).
KINDS = ("decoder", "vision", "adapters", "perceiver")


@dataclass(frozen=True)
class VideoShape:
    """The video modality of a micro-batch: `videos` clips of `frames` frames of `tiles`
    tile slots each, aggregated `frames_per_group` -> `n_latents` tokens by a perceiver
    of `depth` layers and `heads` heads (SwiGLU width `ffn_hidden_dim`); a video adapter
    before every `every_k_image_layers`-th image adapter layer."""

    videos: int
    frames: int
    tiles: int
    frames_per_group: int
    n_latents: int
    depth: int
    heads: int
    ffn_hidden_dim: int
    every_k_image_layers: int
    freeze_image_encoder: bool = True

    @property
    def groups(self) -> int:
        return math.ceil(self.frames / self.frames_per_group)


@dataclass(frozen=True)
class TowerShape:
    """The image encoder of a LLaVA-style projector modality (llama_vision.model.llava): a
    CLIP / SigLIP tower (`ClipVisionConfig` fields) and its projector. Each image is
    `crops` crops of image_size^2 pixels (1 without AnyRes); each crop runs `blocks` blocks
    over `positions` tokens and gives `features` tokens to the projector; an image takes
    `tokens_per_image` placeholders of the decoder input."""

    crops: int
    image_size: int
    patch_size: int
    in_channels: int
    width: int
    heads: int
    mlp_dim: int
    blocks: int  # blocks that run: the selected layer's
    positions: int  # tokens through the blocks per crop: g^2 (+1 class token)
    features: int  # tokens per crop out of the tower
    tokens_per_image: int
    act: str = "quick_gelu"
    pre_layernorm: bool = True  # CLIP's ln_pre
    post_layernorm: bool = False
    projector: str = "mlp2x_gelu"

    @classmethod
    def of(cls, vision) -> "TowerShape":
        """The shape of a `LlavaVisionModel` (its tower a ClipVisionTower), for its largest
        image: without AnyRes one crop and the tower's tokens; with AnyRes the grid that
        takes the most crops, and the most placeholders any image can take."""
        from llama_vision.data.anyres import num_anyres_crops

        t = vision.vision_encoder.config
        anyres, newline = vision.config.anyres, vision.image_newline is not None
        crops, tokens = 1, vision.config.image_tokens(t)
        if anyres is not None:
            sizes = [tuple(p) for p in anyres.grid_pinpoints]
            crops = max(num_anyres_crops(size, anyres.grid_pinpoints, anyres.crop_size) for size in sizes)
            tokens = max(anyres.num_image_tokens(size, image_newline=newline) for size in sizes)
        return cls(crops=crops, image_size=t.image_size, patch_size=t.patch_size, in_channels=t.in_channels,
                   width=t.width, heads=t.heads, mlp_dim=t.mlp_dim, blocks=t.selected_layer, positions=t.num_positions,
                   features=t.num_tokens, tokens_per_image=tokens, act=t.act, pre_layernorm=t.has_class_token,
                   post_layernorm=t.post_layernorm, projector=vision.projector.kind)


@dataclass(frozen=True)
class BatchShape:
    """One micro-batch on one data-parallel rank. rows x seq_len text tokens through the
    decoder (DPO: chosen and rejected rows, 2 per pair); `images` images encoded, each of
    `tiles` tile slots (the encoder runs every slot); each row attends to
    `images_per_row` images; `kv_rows`: rows whose cross-attention K/V are materialised
    (DPO's rejected rows read copies of the chosen rows' K/V: 2 x pairs; default rows);
    `packed`: rows hold several samples (data.packing), so self-attention runs masked;
    `tower`: the images go through a LLaVA projector modality's tower (each image then
    `tower.crops` crops, `tiles` unused) instead of Meta's ViT and adapters."""

    rows: int
    seq_len: int
    images: int = 0
    images_per_row: int = 0
    tiles: int = 0
    video: VideoShape | None = None
    kv_rows: int | None = None
    packed: bool = False  # packed rows: block-diagonal causal self-attention under a mask
    tower: TowerShape | None = None  # a LLaVA model's image encoder


@dataclass
class ActivationEstimate:
    """Bytes per GPU. `parts`: component -> bytes (their sum is `total`); `saved`: what
    autograd holds for backward at the end of the forward (all parts but `inputs`,
    `autocast_copies` and `transient`, plus the log-softmax output it keeps)."""

    parts: dict[str, int] = field(default_factory=dict)
    saved: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())


class _Bytes:
    """Element sizes: f (float32) and c (compute dtype: 2 under bf16 autocast, else 4)."""

    def __init__(self, autocast: bool):
        self.autocast = autocast
        self.c = 2 if autocast else F32

    def lin(self, elems: float, consumers: int = 1) -> float:
        """What trainable linears keep of one float32 input of `elems` elements read by
        `consumers` of them: autocast casts it once per linear, else the tensor is shared."""
        return self.c * elems * consumers if self.autocast else F32 * elems


@dataclass
class _Unit:
    kind: str  # activation-checkpointing kind
    full: float  # bytes saved when not checkpointed
    ckpt: float  # bytes stored when checkpointed (its inputs)


def estimate_activations(
    args: ModelArgs,
    shape: BatchShape,
    *,
    tp: int = 1,
    trainable: frozenset[str] | set[str] = frozenset({"vision", "adapters"}),
    checkpointed: frozenset[str] | set[str] = frozenset(),
    autocast: bool = False,
    device_type: str = "cuda",
    autocast_copy_bytes: int = 0,
) -> ActivationEstimate:
    """Activation bytes of one forward + backward of `shape` on one GPU (see the module
    docstring for every term). trainable: trainability groups that train ("decoder",
    "vision", "adapters", "video"); checkpointed: activation-checkpointing kinds (KINDS);
    autocast: bf16 autocast (GPU, dtype bf16); device_type: "cuda" or "cpu" (which
    attention path expands GQA K/V); autocast_copy_bytes: the bf16 copies of trainable
    linear weights that autocast keeps (added under autocast only)."""
    unknown = set(checkpointed) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown activation-checkpointing kind(s) {sorted(unknown)}; kinds: {list(KINDS)}")
    tower = shape.tower
    meta_vit = (shape.images > 0 and tower is None) or shape.video is not None  # Meta's ViT runs (a LLaVA tower is replicated)
    if tp < 1 or args.n_heads % tp or (meta_vit and args.vision_heads % tp):
        raise ValueError(f"tp={tp} must divide n_heads={args.n_heads} and vision_heads={args.vision_heads}")
    b = _Bytes(autocast)
    c = b.c
    dec, vis, ada, vid = ("decoder" in trainable, "vision" in trainable, "adapters" in trainable, "video" in trainable)
    d, hd = args.dim, args.head_dim
    qw, kvw, hl = args.n_heads // tp * hd, max(1, args.n_kv_heads // tp) * hd, args.n_heads // tp
    ffn = args.ffn_hidden_dim / tp
    tokens = shape.rows * shape.seq_len
    parts: dict[str, float] = {}
    units: list[_Unit] = []

    def add(name: str, value: float) -> None:
        parts[name] = parts.get(name, 0.0) + value

    llava = tower is not None and shape.images > 0 and shape.images_per_row > 0
    has_images = shape.images > 0 and shape.images_per_row > 0 and shape.tiles > 0 and tower is None
    video = shape.video
    add("inputs", tokens * 16)  # tokens + labels, int64
    if has_images:
        add("inputs", shape.images * shape.tiles * args.vision_in_channels * args.vision_chunk_size**2 * F32)
    if llava:
        add("inputs", shape.images * tower.crops * tower.in_channels * tower.image_size**2 * F32)
        saved, tower_units = _llava_tower(b, tower, shape.images * tower.crops, d, vis, ada, "vision" in checkpointed)
        add("vision", saved)
        units.extend(tower_units)
        if vis or ada:  # the projector's tokens placed in the decoder input: index, masked_scatter, where
            add("media", shape.images * tower.tokens_per_image * 24 + 2 * tokens)
    if video is not None:
        add("inputs", video.videos * video.frames * video.tiles * args.vision_in_channels * args.vision_chunk_size**2 * F32)

    # --- image encoder ----------------------------------------------------------------
    p_tok = args.vision_tokens_per_tile  # grid^2 + 1
    kv_rows = shape.kv_rows if shape.kv_rows is not None else shape.rows
    # Rows whose media are encoded (K/V projected once each): DPO's pairs, else every row.
    encoded_rows = shape.images // shape.images_per_row if has_images else (video.videos if video is not None else 0)
    image_media = shape.images_per_row * shape.tiles * p_tok if has_images else 0  # media tokens per row
    if has_images:
        vit, working_vit = _vision(args, b, shape.images, shape.tiles, tp, vis, ada, "vision" in checkpointed)
        for name, value in vit.items():
            add(name, value)
        units.extend(working_vit)
        if ada or vis:
            # The projection's output: every adapter's wk / wv input (kept if they train)
            # and the tensor their K/V gradients reach (vision / projection training).
            add("media", (c if ada else 0) * shape.images * shape.tiles * p_tok * d)

    # --- video: frozen frame encoding + perceiver ------------------------------------
    video_media = 0
    nograd_encoder = 0.0
    if video is not None:
        video_media = video.groups * video.n_latents
        frames_tokens = video.videos * video.groups * video.frames_per_group * video.tiles * p_tok
        # Frame features: the encoder's output (c), its zero-filled copy, the float32 copy
        # the aggregator reads and the temporal-embedding sum its norms keep.
        add("video", frames_tokens * d * (2 * c + 2 * F32))
        nograd_encoder = _vision_nograd(args, b, video.videos * video.frames, video.tiles, tp)
        if vid:
            add("video", _perceiver(args, b, video, tp, "perceiver" in checkpointed, units))
            add("video", video.videos * video_media * F32 * d)  # the aggregator's output: the video adapters' K/V input

    # --- decoder with its adapters -------------------------------------------------------
    media_present = has_images or video is not None
    # A LLaVA model's tokens enter at the decoder input: a gradient flows through every
    # layer when the projector or the tower trains.
    g = dec or (media_present and (ada or vid)) or (llava and (ada or vis))
    image_layers = set(args.fusion_schedule) if has_images else set()
    video_layers = set(every_kth(list(args.fusion_schedule), video.every_k_image_layers)) if video is not None else set()
    add("inputs", tokens * 4 * hd)  # RoPE rotations, complex64 [B, S, head_dim / 2]
    for i in range(args.n_layers):
        for active, trains, media_tok, media_grad, name in (
            (i in video_layers, vid, video_media, vid, "video_adapters"),
            (i in image_layers, ada, image_media, vis or ada, "adapters"),
        ):
            if not active or not (g or trains or media_grad):
                continue
            text, kv_norm, kv_sdpa = _adapter(args, b, tp, trains, device_type)
            text += c * media_tok  # the float mask [S, Tm] SDPA keeps
            unit = _Unit("adapters", tokens * text, tokens * F32 * d)
            units.append(unit)
            add(name, unit.ckpt if "adapters" in checkpointed else unit.full)
            # K/V: computed in prepare_media, outside the block (never recomputed); the
            # k_norm per encoded row, what SDPA keeps per row that reads them.
            add(name, media_tok * (encoded_rows * kv_norm + kv_rows * kv_sdpa))
            g = True
        if g or dec:
            per_token = _decoder_layer(b, d, qw, kvw, ffn, hl, dec)
            if shape.packed:  # masked self-attention: the float mask, and CUDA's expanded K/V
                per_token += c * shape.seq_len + (c * 2 * (qw - kvw) if device_type == "cuda" else 0)
            unit = _Unit("decoder", tokens * per_token, tokens * F32 * d)
            units.append(unit)
            add("decoder", unit.ckpt if "decoder" in checkpointed else unit.full)
    for name, present in (("adapters", has_images), ("video_adapters", video is not None)):
        if present and name in parts:
            add(name, shape.rows * shape.seq_len * (image_media if name == "adapters" else video_media))  # bool masks
    if shape.packed and (g or dec):
        add("decoder", shape.rows * shape.seq_len**2)  # the boolean segment mask, once
    if g or dec:
        head = tokens * (F32 * (d + 1) + (F32 * d + b.lin(d) if dec else 0))  # final norm (+ output's input)
        add("decoder", head)
        logsoftmax = tokens * F32 * args.vocab_size
    else:
        logsoftmax = 0.0
    saved = sum(v for k, v in parts.items() if k != "inputs") + logsoftmax

    # --- around the units ------------------------------------------------------------------
    if autocast:
        add("autocast_copies", autocast_copy_bytes)
    loss_head = 3 * logsoftmax
    working = max((u.full + (u.full if u.kind in checkpointed else 0) for u in units), default=0.0)
    add("transient", max(loss_head, working, nograd_encoder))
    return ActivationEstimate({k: int(math.ceil(v)) for k, v in parts.items()}, int(math.ceil(saved)))


def _decoder_layer(b: _Bytes, d: int, qw: int, kvw: int, ffn: float, hl: int, trains: bool) -> float:
    """Bytes per token of one TransformerBlock through which a gradient flows."""
    c = b.c
    out = F32 * (2 * d + 2 + hl)  # both RMSNorm inputs (x, h) + their rsqrt; SDPA's logsumexp
    out += c * (2 * qw + 2 * kvw)  # SDPA's q, k, v, out (wo reads out's storage)
    out += c * 3 * ffn  # w1 x, w3 x, silu(w1 x)
    if trains:
        out += F32 * 2 * d  # normalised x for the RMSNorm weight gradients
        out += b.lin(d, 3) + b.lin(d, 2)  # inputs of wq/wk/wv and w1/w3
        out += c * ffn  # w2's input
    return out


def _adapter(args: ModelArgs, b: _Bytes, tp: int, trains: bool, device_type: str) -> tuple[float, float, float]:
    """Bytes of one gated cross-attention block: per text token (without the mask), per
    media token of an encoded row (k_norm's saved tensors) and per media token of each row
    whose attention reads them (the K, V SDPA keeps)."""
    c, d, hd = b.c, args.dim, args.head_dim
    qw, kvw, hl = args.n_heads // tp * hd, max(1, args.n_kv_heads // tp) * hd, args.n_heads // tp
    ffn = args.ffn_hidden_dim / tp
    text = F32 * (2 * d + 2 + 2 * hl)  # RMSNorm inputs x, h + rsqrt; q_norm rsqrt; logsumexp
    text += F32 * qw + c * 2 * qw  # q (q_norm's input), SDPA's q and out
    text += c * 3 * ffn
    if trains:
        text += F32 * (2 * d + qw)  # normalised x, h, q for the norm weight gradients
        text += b.lin(d, 1) + b.lin(qw, 1) + b.lin(d, 2)  # inputs of wq, wo, w1/w3
        text += c * d + F32 * d  # both branch outputs, for the gate gradients
        text += c * ffn  # w2's input
    kv_width = qw if device_type == "cuda" else kvw  # CUDA expands GQA K/V for masked SDPA
    kv_norm = F32 * (kvw * (2 if trains else 1) + max(1, args.n_kv_heads // tp))  # input (+ normalised k), rsqrt
    return text, kv_norm, c * 2 * kv_width


def _vision(args: ModelArgs, b: _Bytes, images: int, tiles: int, tp: int, trains: bool, proj_trains: bool,
            checkpointed: bool) -> tuple[dict[str, float], list[_Unit]]:
    """Saved bytes of the image encoder + projection over `images` images of `tiles`
    tile slots, and its layers as units."""
    c, w = b.c, args.vision_width
    wl, fv, hv = w / tp, int(args.vision_mlp_ratio * w) / tp, args.vision_heads // tp
    p_tok = args.vision_tokens_per_tile
    padded = p_tok + (8 - p_tok % 8) % 8
    seq = tiles * padded  # tokens of one image through every layer
    n_tok = images * seq
    parts: dict[str, float] = {}
    units: list[_Unit] = []
    if trains:
        grid2 = args.vision_grid**2
        patch = args.vision_in_channels * args.vision_patch_size**2
        stem = images * tiles * (grid2 * b.lin(patch) + p_tok * F32 * w * 2 + p_tok * F32 * 2)  # patches, tile table, ln_pre
        stem += n_tok * F32 * (w + 2)  # ln_post's input
        per_token = F32 * (2 * w + 4 + hv) + c * (4 * wl + 2 * fv) + c * seq + b.lin(w, 3) + b.lin(w, 1)
        layers = 0.0
        for gated, count in ((False, args.vision_layers), (True, args.vision_global_layers)):
            unit = _Unit("vision", n_tok * (per_token + (c * 2 * w if gated else 0)), n_tok * F32 * w)
            units.extend([unit] * count)
            layers += count * (unit.ckpt if checkpointed else unit.full)
        parts["vision"] = stem + layers + images * seq * seq  # + the boolean padding mask, once
    if proj_trains:
        parts["vision"] = parts.get("vision", 0.0) + images * tiles * p_tok * b.lin(args.vision_output_dim)
    return parts, units


def _llava_tower(b: _Bytes, t: TowerShape, crops: int, d: int, trains: bool, proj_trains: bool,
                 checkpointed: bool) -> tuple[float, list[_Unit]]:
    """Saved bytes of a LLaVA tower + projector over `crops` crops (module docstring), and
    the tower's blocks as units."""
    c, w, m = b.c, t.width, t.mlp_dim
    n_tok = crops * t.positions
    saved = 0.0
    units: list[_Unit] = []
    if trains:
        grid2 = (t.image_size // t.patch_size) ** 2
        saved += crops * grid2 * b.lin(t.in_channels * t.patch_size**2)  # the conv's input
        norms = int(t.pre_layernorm) + int(t.post_layernorm)
        saved += n_tok * norms * F32 * (w + 2)  # ln_pre / ln_post inputs and stats
        per_token = F32 * (4 + t.heads) + c * (4 * w + m)  # LayerNorm stats, logsumexp; q, k, v, attention out, fc1 out
        per_token += c * m * (2 if t.act == "quick_gelu" else 1)  # QuickGELU: sigmoid + product; GELU: fc2's input
        if b.autocast:  # norm inputs f32; q/k/v and fc1 each keep a bf16 copy of their norm's output
            per_token += F32 * 2 * w + b.lin(w, 3) + b.lin(w, 1)
        else:  # norm inputs, ln_1's output (q/k/v share it), ln_2's output (fc1)
            per_token += F32 * 4 * w
        unit = _Unit("vision", n_tok * per_token, n_tok * F32 * w)
        units.extend([unit] * t.blocks)
        saved += t.blocks * (unit.ckpt if checkpointed else unit.full)
    if proj_trains:  # linear_1's input: the tower's output (its whole storage, a class token too), or its bf16 copy
        saved += crops * t.features * c * w if b.autocast else n_tok * F32 * w
    if (proj_trains or trains) and t.projector == "mlp2x_gelu":
        saved += crops * t.features * c * d * (2 if proj_trains else 1)  # GELU's input (+ linear_2's)
    return saved, units


def _vision_nograd(args: ModelArgs, b: _Bytes, images: int, tiles: int, tp: int) -> float:
    """Peak working set of the image encoder under no_grad over `images` images at once:
    one layer's residual, normed input, q/k/v/out, float mask and MLP hidden states."""
    c, w = b.c, args.vision_width
    p_tok = args.vision_tokens_per_tile
    seq = tiles * (p_tok + (8 - p_tok % 8) % 8)
    fv = int(args.vision_mlp_ratio * w) / tp
    return images * seq * (F32 * 2 * w + c * (4 * w / tp + 2 * fv + seq))


def _perceiver(args: ModelArgs, b: _Bytes, video: VideoShape, tp: int, checkpointed: bool, units: list[_Unit]) -> float:
    """Saved bytes of the temporal aggregator (trainable), its layers appended to units."""
    c, d = b.c, args.dim
    dl, hl, ffn = d / tp, video.heads // tp, video.ffn_hidden_dim / tp
    n = video.videos * video.groups
    q = video.n_latents
    m = video.frames_per_group * video.tiles * args.vision_tokens_per_tile
    media = F32 * 2 + b.lin(d, 2) + c * 2 * dl  # media_norm stats; wk / wv input; K, V
    # latent_norm / ffn_norm inputs and stats, logsumexp; wq/wk/wv and w1/w3 inputs; q, out,
    # the latents' own K / V; the SwiGLU's four [F'] tensors; the float mask.
    latent = F32 * (2 * d + 4 + hl) + b.lin(d, 3) + b.lin(d, 2) + c * (4 * dl + 4 * ffn) + c * (m + q)
    full = n * (m * media + q * latent)
    unit = _Unit("perceiver", full, n * q * F32 * d)
    units.extend([unit] * video.depth)
    stored = video.depth * (unit.ckpt if checkpointed else unit.full)
    return stored + n * q * F32 * (d + 2) + n * q * (m + q)  # final norm's input; the boolean key mask
