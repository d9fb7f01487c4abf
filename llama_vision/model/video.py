"""The video modality of the Llama 3 paper (its video adapter), added through the public
extension API (`VisionLanguageModel.add_modality`) without touching the decoder.

Pipeline for a batch of videos [B, V, F, T, 3, S, S] (V videos per row, F frames, T tiles
per frame):

1. every frame goes through the SAME image encoder + projection as images (frames are
   folded into the image batch dim; frozen, under no_grad, by default)
   -> frame tokens [B, V, F, T*P, D];
2. a `TemporalAggregator` (a perceiver resampler) turns each group of `frames_per_group`
   consecutive frames into one "effective frame" of `n_latents` tokens
   -> [B, V, G, n_latents, D], G = ceil(F / frames_per_group);
3. video cross-attention adapters (gated, gates at 0 when added) run before every
   `every_k_image_layers`-th image cross-attention layer, ahead of the image adapter at
   the same position (order=-1), reading the G * n_latents tokens of each video.

The paper's numbers: up to 64 frames; pretraining 16 frames aggregated 16 -> 1 effective
frame (4 tiles of 448 px per frame); SFT 64 frames aggregated 32 -> 2 effective frames.
Only the aggregator and the video adapters train (`set_trainable(..., video=True)`).

The SFT stage starts from the pretrained aggregator although its two per-group tables
change shape (frames_per_group 16 -> 32, groups 1 -> 2): `TemporalAggregator`'s load hook
resizes a checkpoint's `temporal_embedding` [F0, D] -> [F, D] by linear interpolation over
the frame index (`resize_temporal_embedding`) and its `group_embedding` [G0, D] -> [G, D]
by keeping the trained rows and repeating the last one (`resize_group_embedding`). Every
other aggregator tensor must match; the checkpoint loaders (`llama_vision.checkpoint`)
ask `TemporalAggregator.resizes_on_load` which shape differences the hook accepts.
"""
from __future__ import annotations

import dataclasses

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from model_parallel import column_parallel_linear, row_parallel_linear, tp_size

from .attention import attention
from .init import init_weights
from .layers import FeedForward
from .modality import MediaTokens, Modality, every_kth

VIDEO_ENCODER_ATTR = "video_aggregator"
VIDEO_ADAPTER_ATTR = "video_cross_attention_layers"


@dataclass
class VideoConfig:
    """Hyper-parameters of the video modality.

    num_frames: frames sampled per video (the most the aggregator accepts).
    frames_per_group: consecutive frames merged into one effective frame (paper: 16 in
        pretraining, 32 in SFT). A last partial group is padded with masked frames. It and
        max_groups may differ from a loaded checkpoint's: the temporal and group
        embeddings are resized on load (see `TemporalAggregator.resizes_on_load`).
    tiles_per_frame: most tiles per frame the video processor produces (paper
        pretraining: 4 tiles of 448 px); must not exceed the model's vision_max_num_chunks.
    n_latents: tokens per effective frame (the perceiver's latent queries).
    depth, heads: perceiver layers and attention heads (None: the text model's n_heads);
        heads must be divisible by the tensor-parallel degree.
    ffn_hidden_dim: the perceiver's SwiGLU width (None: the text model's).
    every_k_image_layers: a video adapter before every k-th image cross-attention layer,
        counted so the last one is kept (paper: 4).
    token_id: the <|video|> placeholder (None: vocab_size + 1, learnable row 1).
    freeze_image_encoder: run the image encoder + projection under torch.no_grad().
    encoder_batch_frames: encode at most this many frames per image-encoder call (bounds
        activation memory for 64-frame clips); 0 = all frames of the batch at once.
    """

    num_frames: int = 64
    frames_per_group: int = 32
    tiles_per_frame: int = 4
    n_latents: int = 64
    depth: int = 2
    heads: int | None = None
    ffn_hidden_dim: int | None = None
    every_k_image_layers: int = 4
    token_id: int | None = None
    freeze_image_encoder: bool = True
    encoder_batch_frames: int = 0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("num_frames", "frames_per_group", "tiles_per_frame", "n_latents", "depth", "every_k_image_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"VideoConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def max_groups(self) -> int:
        """Effective frames per video: ceil(num_frames / frames_per_group)."""
        return math.ceil(self.num_frames / self.frames_per_group)


class PerceiverBlock(nn.Module):
    """One resampler layer, pre-norm (LayerNorm, as Flamingo):

        lat = lat + Attn(q = LN(lat), kv = [LN(media) ++ LN(lat)])
        lat = lat + FFN(LN(lat))

    Latents also attend to themselves (Flamingo's choice), which keeps every query row
    with at least one valid key even when a whole group is padding (no NaN).
    Heads are split across tensor-parallel ranks: q/k/v column-parallel, wo row-parallel.
    """

    def __init__(self, dim: int, heads: int, ffn_hidden_dim: int, eps: float, backend: str):
        super().__init__()
        if dim % heads:
            raise ValueError(f"aggregator width {dim} is not divisible by heads {heads}")
        if heads % tp_size():
            raise ValueError(f"aggregator heads {heads} do not split across tensor-parallel degree {tp_size()}")
        self.head_dim = dim // heads
        self.n_local_heads = heads // tp_size()
        self.backend = backend
        self.media_norm = nn.LayerNorm(dim, eps=eps)
        self.latent_norm = nn.LayerNorm(dim, eps=eps)
        self.wq = column_parallel_linear(dim, dim)
        self.wk = column_parallel_linear(dim, dim)
        self.wv = column_parallel_linear(dim, dim)
        self.wo = row_parallel_linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.feed_forward = FeedForward(dim, ffn_hidden_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, local width] -> [N, local heads, L, head_dim]."""
        return x.view(x.shape[0], x.shape[1], self.n_local_heads, self.head_dim).transpose(1, 2)

    def forward(self, latents: torch.Tensor, media: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latents [N, Q, D], media [N, M, D], mask bool [N, 1, Q, M + Q] -> [N, Q, D]."""
        n, q_len, _ = latents.shape
        lat = self.latent_norm(latents)
        kv_in = torch.cat([self.media_norm(media), lat], dim=1)
        q, k, v = self._heads(self.wq(lat)), self._heads(self.wk(kv_in)), self._heads(self.wv(kv_in))
        out = attention(q, k, v, mask=mask, backend=self.backend)
        latents = latents + self.wo(out.transpose(1, 2).reshape(n, q_len, -1))
        return latents + self.feed_forward(self.ffn_norm(latents))


class TemporalAggregator(nn.Module):
    """Perceiver resampler over frames (Flamingo-style): each group of `frames_per_group`
    consecutive frames -> `n_latents` tokens (one effective frame).

    Order matters: a learned temporal embedding (frame index within its group) is added to
    every token of a frame, and the latent queries of group g start as
    `latents + group_embedding[g]` so the decoder can tell effective frames apart (its
    cross-attention has no positions of its own). Padding (frames past a video's length,
    the pad frames of a last partial group, empty tiles) is removed by a key-padding mask.

    Parameters: latents [n_latents, D], temporal_embedding [frames_per_group, D],
    group_embedding [max_groups, D], the perceiver layers and a final norm. A state dict
    saved at another frames_per_group or group count loads (the paper's 16 -> 1
    pretraining into its 32 -> 2 SFT): a pre-load hook resizes those two tables (see
    `resizes_on_load`); any other shape difference is a load error naming the key.
    """

    # The tables with one row per frame slot / per group: the only tensors whose shape
    # follows frames_per_group and the group count, hence the only ones resized on load.
    RESIZED_ON_LOAD = ("temporal_embedding", "group_embedding")

    def __init__(
        self,
        dim: int,
        *,
        frames_per_group: int,
        max_groups: int,
        n_latents: int,
        depth: int,
        heads: int,
        ffn_hidden_dim: int,
        eps: float = 1e-5,
        backend: str = "sdpa",
        seed: int = 0,
    ):
        super().__init__()
        self.frames_per_group = frames_per_group
        self.max_groups = max_groups
        self.latents = nn.Parameter(torch.empty(n_latents, dim))
        self.temporal_embedding = nn.Parameter(torch.empty(frames_per_group, dim))
        self.group_embedding = nn.Parameter(torch.empty(max_groups, dim))
        self.layers = nn.ModuleList(PerceiverBlock(dim, heads, ffn_hidden_dim, eps, backend) for _ in range(depth))
        self.checkpoint_activations = False  # recompute each perceiver layer in backward (training)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.reset_parameters(seed)
        self._register_load_state_dict_pre_hook(self._resize_tables_on_load)

    @classmethod
    def from_config(cls, args, cfg: VideoConfig, seed: int = 0) -> "TemporalAggregator":
        return cls(
            args.dim,
            frames_per_group=cfg.frames_per_group,
            max_groups=cfg.max_groups,
            n_latents=cfg.n_latents,
            depth=cfg.depth,
            heads=cfg.heads or args.n_heads,
            ffn_hidden_dim=cfg.ffn_hidden_dim or args.ffn_hidden_dim,
            eps=cfg.norm_eps,
            backend=args.attn_backend,
            seed=seed,
        )

    def reset_parameters(self, seed: int = 0) -> None:
        """The model's deterministic, tensor-parallel-invariant init (`init_weights`): every
        weight ~ N(0, fan_in^-1/2) (the latents and the temporal / group embeddings:
        dim^-1/2), norms 1, biases 0, each seeded by its state-dict name in the model
        (`video_aggregator.*`), so adding the modality to a built model gives the weights
        `build_model` gives a model whose params carry it."""
        if self.latents.device.type != "meta":
            init_weights(self, seed=seed, prefix=VIDEO_ENCODER_ATTR + ".")

    # --- loading an aggregator trained at another frames_per_group / group count ----------
    def resizes_on_load(self, name: str, shape: Sequence[int]) -> bool:
        """Whether a checkpoint tensor `name` (relative to this module, e.g.
        "temporal_embedding") of `shape` is turned into this module's shape by the load hook:
        True only for the two per-slot tables with a different row count and the model's
        width ([F0 >= 1, D] / [G0 >= 1, D]). The checkpoint loaders skip exactly these keys
        in their strict shape check; every other mismatch stays an error."""
        if name not in self.RESIZED_ON_LOAD:
            return False
        want = tuple(getattr(self, name).shape)
        shape = tuple(shape)
        return len(shape) == 2 and shape[0] >= 1 and shape[1] == want[1] and shape != want

    def _resize_tables_on_load(self, state_dict, prefix, *args, **kwargs) -> None:
        """Load pre-hook: the checkpoint's temporal_embedding [F0, D] -> [frames_per_group, D]
        (`resize_temporal_embedding`: linear over the frame index, first and last frame
        kept exactly) and group_embedding [G0, D] -> [max_groups, D]
        (`resize_group_embedding`: trained rows kept, the last one repeated). Same shapes
        are left untouched (bitwise); shapes this cannot resize (another width, not 2-D)
        are left for load_state_dict to report with both shapes."""
        for name, resize in (("temporal_embedding", resize_temporal_embedding), ("group_embedding", resize_group_embedding)):
            key = prefix + name
            if key in state_dict and self.resizes_on_load(name, state_dict[key].shape):
                state_dict[key] = resize(state_dict[key], getattr(self, name).shape[0])

    def forward(self, frames: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [B, V, F, L, D] (+ valid bool [B, V, F, L] or [B, V, F]; None = all valid)
        -> (latents [B, V, G, n_latents, D], group_valid bool [B, V, G]),
        G = ceil(F / frames_per_group). A group with no valid token is marked invalid
        (its latents are a function of the learned queries only)."""
        b, v, f, l, d = frames.shape
        fpg, q_len = self.frames_per_group, self.latents.shape[0]
        g = math.ceil(f / fpg)
        if g > self.max_groups:
            raise ValueError(f"{f} frames make {g} groups of {fpg}; this aggregator takes at most {self.max_groups * fpg} frames")
        if valid is None:
            valid = torch.ones(b, v, f, l, dtype=torch.bool, device=frames.device)
        elif valid.dim() == 3:
            valid = valid[..., None].expand(b, v, f, l)
        pad = g * fpg - f
        if pad:  # the last group is completed with masked (zero) frames
            frames = torch.cat([frames, frames.new_zeros(b, v, pad, l, d)], dim=2)
            valid = torch.cat([valid, valid.new_zeros(b, v, pad, l)], dim=2)
        n = b * v * g
        x = frames.reshape(n, fpg, l, d) + self.temporal_embedding.to(frames.dtype)[None, :, None, :]
        x = x.reshape(n, fpg * l, d)
        key_valid = valid.reshape(n, fpg * l)
        queries = (self.latents[None] + self.group_embedding[:g, None]).to(frames.dtype)  # [G, Q, D]
        lat = queries[None].expand(b * v, g, q_len, d).reshape(n, q_len, d)
        keys = torch.cat([key_valid, key_valid.new_ones(n, q_len)], dim=1)  # latents always valid
        mask = keys[:, None, None, :].expand(n, 1, q_len, keys.shape[1])
        for layer in self.layers:
            if self.checkpoint_activations and self.training:
                lat = torch.utils.checkpoint.checkpoint(layer, lat, x, mask, use_reentrant=False)
            else:
                lat = layer(lat, x, mask)
        return self.norm(lat).view(b, v, g, q_len, d), key_valid.view(b, v, g, -1).any(-1)


def resize_temporal_embedding(embed: torch.Tensor, frames_per_group: int) -> torch.Tensor:
    """A trained temporal embedding [F0, D] -> [F, D], F = frames_per_group, by linear
    interpolation along the frame-index axis with aligned corners (as
    `F.interpolate(mode="linear", align_corners=True)` and the vision encoder's
    position-embedding resize): new frame i reads the trained axis at i * (F0 - 1) / (F - 1),
    so the first and last frames of a group keep their trained rows exactly, and so does
    every new frame that lands on a trained position (F0 = 2 -> F = 3 gives
    [e0, (e0 + e1) / 2, e1]). The row is a frame's relative place within its group's
    time span, which is what a group of 32 frames out of 64 and one of 16 out of 16 share.
    Special cases of the same rule: F0 = 1 repeats the one row; F = 1 keeps row 0.
    F == F0 returns `embed` itself. Interpolated rows are computed in float64 and cast
    back to embed's dtype."""
    if embed.dim() != 2:
        raise ValueError(f"a temporal embedding is [frames, dim], got shape {list(embed.shape)}")
    f0, d = embed.shape
    if frames_per_group < 1:
        raise ValueError(f"frames_per_group must be >= 1, got {frames_per_group}")
    if frames_per_group == f0:
        return embed
    if frames_per_group == 1 or f0 == 1:
        return embed[:1].expand(frames_per_group, d).clone()
    # Exact integer positions: i * (F0 - 1) = lo * (F - 1) + rem, weight rem / (F - 1);
    # a float position could land a hair below F0 - 1 and blur the last frame.
    num = torch.arange(frames_per_group, device=embed.device) * (f0 - 1)
    lo, rem = num // (frames_per_group - 1), num % (frames_per_group - 1)
    hi = torch.clamp(lo + 1, max=f0 - 1)
    w = (rem.double() / (frames_per_group - 1))[:, None]
    mixed = torch.lerp(embed[lo].double(), embed[hi].double(), w).to(embed.dtype)
    # Rows on a trained position are copied, not recomputed (bitwise equal to the trained row).
    return torch.where((rem == 0)[:, None], embed[lo], mixed)


def resize_group_embedding(embed: torch.Tensor, groups: int) -> torch.Tensor:
    """A trained group embedding [G0, D] -> [G, D], G = groups: rows 0..min(G0, G) - 1 keep
    their trained values and every new row (g >= G0) is a copy of the last trained row
    G0 - 1; fewer groups keep the first G rows. G == G0 returns `embed` itself.

    Why the last row and not tiling: the latent queries of group g start as
    `latents + group_embedding[g]`, so a copied row makes the new group start from queries
    the trained perceiver already handles (from the paper's single pretraining group, every
    SFT group computes what the pretrained aggregator computed), and it says "at or after
    the last trained group" -- tiling would give group G0 the embedding of group 0, the
    start of the video. Interpolation would change the trained rows. The new rows are
    their own parameters, so training tells the groups apart."""
    if embed.dim() != 2:
        raise ValueError(f"a group embedding is [groups, dim], got shape {list(embed.shape)}")
    g0, d = embed.shape
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if groups == g0:
        return embed
    if groups < g0:
        return embed[:groups].clone()
    return torch.cat([embed, embed[-1:].expand(groups - g0, d)], dim=0)


class VideoEncoder:
    """The video modality's `encode`: (videos, aspect_ratios[, num_frames]) -> MediaTokens.

    A plain callable holding the model (not a module, so no weights are registered twice);
    `copy.deepcopy(model)` rebinds it to the copy, as it does the image encoder's method.
    """

    def __init__(self, model, cfg: VideoConfig):
        self.model = model
        self.cfg = cfg

    @property
    def aggregator(self) -> TemporalAggregator:
        return getattr(self.model, VIDEO_ENCODER_ATTR)

    def encode_frames(self, videos: torch.Tensor, aspect_ratios: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        """videos [B, V, F, T, 3, S, S], aspect_ratios [B, V, 2], frame_valid [B, V, F]
        -> frame tokens [B, V, F, T, P, D]. Only valid frames are encoded (padding frames
        stay zero: they are masked downstream and cost nothing)."""
        b, v, f, t = videos.shape[:4]
        flat = videos.reshape(b * v * f, *videos.shape[3:])
        ars = aspect_ratios[:, :, None].expand(b, v, f, 2).reshape(b * v * f, 2)
        keep = frame_valid.reshape(-1).to(videos.device)
        images, ars = flat[keep], ars[keep.to(ars.device)]
        step = self.cfg.encoder_batch_frames or max(1, images.shape[0])
        grad = nullcontext() if not self.cfg.freeze_image_encoder else torch.no_grad()
        with grad:
            # The image batch dim is the frames: [1, n_frames, T, 3, S, S].
            feats = [self.model.encode_images(images[None, i : i + step], ars[None, i : i + step])[0]
                     for i in range(0, images.shape[0], step)]
        p, d = self.model.args.vision_tokens_per_tile, self.model.args.dim
        ref = self.model.vision_model.vision_projection.weight
        out = torch.zeros(b * v * f, t, p, d, dtype=ref.dtype, device=ref.device)
        if feats:
            out = out.index_put((keep.nonzero()[:, 0].to(out.device),), torch.cat(feats))
        return out.view(b, v, f, t, p, d)

    def __call__(self, inputs: Sequence[Any]) -> MediaTokens:
        videos, aspect_ratios, num_frames = _unpack(inputs)
        b, v, f, t = videos.shape[:4]
        device = videos.device
        frame_valid = torch.arange(f, device=device)[None, None] < num_frames.to(device)[..., None]  # [B, V, F]
        feats = self.encode_frames(videos, aspect_ratios, frame_valid)  # [B, V, F, T, P, D]
        p, d = feats.shape[-2:]
        n_tiles = (aspect_ratios[..., 0] * aspect_ratios[..., 1]).to(device)  # [B, V]
        tile_valid = torch.arange(t, device=device)[None, None] < n_tiles[..., None]  # [B, V, T]
        valid = (frame_valid[..., None] & tile_valid[:, :, None])[..., None].expand(b, v, f, t, p)
        agg = self.aggregator
        lat, group_valid = agg(feats.reshape(b, v, f, t * p, d).to(agg.latents.dtype), valid.reshape(b, v, f, t * p).to(feats.device))
        g, q_len = lat.shape[2:4]
        tokens_valid = group_valid[..., None].expand(b, v, g, q_len).reshape(b, v, g * q_len)
        return MediaTokens(lat.reshape(b, v, g * q_len, d), tokens_valid)


def _unpack(inputs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(videos, aspect_ratios) or (videos, aspect_ratios, num_frames) with num_frames None
    meaning every frame is real; checks the shapes with messages that say what was given."""
    if not isinstance(inputs, (tuple, list)) or len(inputs) not in (2, 3):
        raise ValueError("video inputs must be (videos, aspect_ratios) or (videos, aspect_ratios, num_frames)")
    videos, aspect_ratios = inputs[0], inputs[1]
    num_frames = inputs[2] if len(inputs) == 3 else None
    if videos.dim() != 7:
        raise ValueError(f"videos must be [B, V, F, T, 3, S, S], got shape {tuple(videos.shape)}")
    b, v, f = videos.shape[:3]
    if tuple(aspect_ratios.shape) != (b, v, 2):
        raise ValueError(f"video aspect_ratios must be [{b}, {v}, 2], got {tuple(aspect_ratios.shape)}")
    if num_frames is None:
        num_frames = torch.full((b, v), f, dtype=torch.long)
    num_frames = torch.as_tensor(num_frames)
    if tuple(num_frames.shape) != (b, v):
        raise ValueError(f"video num_frames must be [{b}, {v}], got {tuple(num_frames.shape)}")
    if num_frames.numel() and (num_frames.min() < 0 or num_frames.max() > f):
        raise ValueError(f"video num_frames must be in [0, {f}], got {num_frames.tolist()}")
    return videos, aspect_ratios, num_frames


def add_video_adapters(model, cfg: VideoConfig | None = None, *, seed: int = 0) -> Modality:
    """Register the "video" modality on `model` (a VisionLanguageModel) and return it.

    Adds `model.video_aggregator` (TemporalAggregator),
    `model.text_model.video_cross_attention_layers` (gated blocks, gates 0: outputs are
    bitwise unchanged until trained) before every `cfg.every_k_image_layers`-th image
    cross-attention layer, running before the image block at that layer, and the
    <|video|> placeholder's own input embedding (`text_model.placeholder_embeddings.video`).
    The new weights are built on the model's device and dtype and initialised
    deterministically from `seed` (the same values at every tensor-parallel degree).
    Trainability group: "video".

    Inputs at forward: `media_inputs={"video": (videos [B, V, F, T, 3, S, S] float,
    aspect_ratios [B, V, 2], num_frames [B, V])}`, one <|video|> placeholder
    (`cfg.token_id`, default vocab_size + 1) per video in the token stream.
    """
    cfg = cfg or VideoConfig()
    args = model.args
    if cfg.tiles_per_frame > args.vision_max_num_chunks:
        raise ValueError(f"tiles_per_frame={cfg.tiles_per_frame} exceeds the image encoder's vision_max_num_chunks={args.vision_max_num_chunks}")
    ref = model.text_model.output.weight
    layers = every_kth(model.modalities["image"].layers, cfg.every_k_image_layers)
    with torch.device(ref.device):
        aggregator = TemporalAggregator.from_config(args, cfg, seed=seed)
        modality = model.add_modality(
            "video",
            token_id=args.vocab_size + 1 if cfg.token_id is None else cfg.token_id,
            encode=VideoEncoder(model, cfg),
            layers=layers,
            adapter_attr=VIDEO_ADAPTER_ATTR,
            encoder=aggregator,
            encoder_attr=VIDEO_ENCODER_ATTR,
            order=-1,  # the paper: video layers run before the image layer at that position
            trainable_modules=[VIDEO_ENCODER_ATTR, f"text_model.{VIDEO_ADAPTER_ATTR}"],
            seed=seed,
        )
    blocks = model.text_model.adapters("video")  # initialised by add_modality (TP-invariant, gates 0)
    model.args.video = dataclasses.asdict(cfg)  # saved in params.json; build_model re-adds it
    for module in (aggregator, blocks):
        module.to(dtype=ref.dtype).train(model.training)
    return modality


def video_inputs_from_paths(
    paths_per_row: Sequence[Sequence[str]],
    cfg: VideoConfig,
    image_tile_size: int,
    max_tiles: int | None = None,
    processor=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Video files per row (in placeholder order) -> the modality's inputs:
    (videos float32 [B, V, F, T, 3, S, S], aspect_ratios long [B, V, 2], num_frames long
    [B, V]) with V = most videos in a row (at least 1), F = cfg.num_frames sampled
    uniformly, T = cfg.tiles_per_frame, S = image_tile_size. Missing slots are zeros with
    num_frames 0. `max_tiles` (the model's vision_max_num_chunks) is checked if given.
    Files that cannot be read raise `llama_vision.data.video.VideoLoadError`.
    """
    from llama_vision.data.video import VideoProcessor

    if max_tiles is not None and cfg.tiles_per_frame > max_tiles:
        raise ValueError(f"tiles_per_frame={cfg.tiles_per_frame} exceeds max_tiles={max_tiles}")
    processor = processor or VideoProcessor(cfg.num_frames, image_tile_size, cfg.tiles_per_frame)
    b, v = len(paths_per_row), max([len(r) for r in paths_per_row] + [1])
    t, s = processor.max_num_tiles, processor.tile_size
    videos = torch.zeros(b, v, cfg.num_frames, t, 3, s, s)
    ratios = torch.ones(b, v, 2, dtype=torch.long)
    frames = torch.zeros(b, v, dtype=torch.long)
    for i, row in enumerate(paths_per_row):
        for j, path in enumerate(row):
            clip, (h, w), info = processor(path)
            videos[i, j], ratios[i, j], frames[i, j] = clip, torch.tensor([h, w]), info.valid
    return videos, ratios, frames


__all__ = [
    "PerceiverBlock",
    "TemporalAggregator",
    "VideoConfig",
    "VideoEncoder",
    "add_video_adapters",
    "resize_group_embedding",
    "resize_temporal_embedding",
    "video_inputs_from_paths",
]
