"""Contrastive (CLIP) pretraining of a LLaVA model's vision tower on image-caption pairs.

LLaVA never trains its tower from scratch: it starts from CLIP, whose features already
separate what captions tell apart, and the projector only has to map them into the LLM's
input. A tower trained from random weights through a frozen decoder gets a weak gradient
(docs/llava.md, "The demo"). This module trains a tower the way CLIP trained its own
(Radford et al. 2021): a small text transformer beside it, both embedded into one space
and trained with the symmetric InfoNCE loss over the batch at a learned temperature. Only
the tower is kept: ``tower.safetensors`` in our layout, which ``init_vision_from`` loads
into a LLaVA model (``tools/pretrain_tower.py`` is the CLI).

Pooling: CLIP's class token after ``ln_post``; SigLIP towers (no class token) the mean of
their patch tokens after ``ln_post``; or (``image_embedding: cells``) the patch grid
averaged to a few cells, concatenated. The tower is trained whole (every block, ``ln_post``),
whatever layer the LLaVA model later reads its features from.

Single process (CPU or one GPU): the demo-sized towers this is for train in minutes.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama_vision.model.clip_vision import ClipVisionConfig, ClipVisionTower
from llama_vision.model.llava import check_pool_side, pool_feature_grid

__all__ = [
    "ContrastiveConfig",
    "ContrastiveData",
    "ContrastiveModel",
    "TextEncoder",
    "TextEncoderConfig",
    "clip_loss",
    "pretrain_tower",
    "retrieval_accuracy",
    "tower_config_of",
]


@dataclass
class TextEncoderConfig:
    """The text side, used only during pretraining: token embedding + learned positions,
    pre-norm transformer layers, a final LayerNorm, the mean over the caption's tokens."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    max_len: int = 64
    """Captions are cut to this many tokens."""


@dataclass
class ContrastiveData:
    kind: str = "caption_wds"
    """`caption_wds` (WebDataset shards: key.jpg + key.txt) or `caption_jsonl`
    ({"image": ..., "caption": ...} lines)."""
    paths: list[str] = field(default_factory=list)
    image_root: Optional[str] = None
    """caption_jsonl: the folder image paths are relative to (default: the JSONL's)."""
    shuffle_buffer: int = 1024
    square: str = "pad"
    """How a non-square image becomes the tower's S x S input: `pad` (LLaVA's expand2square),
    `crop` or `resize` (llama_vision.data.llava_images.LlavaImageProcessor)."""
    cache: bool = False
    """Keep every decoded pair in memory after the first pass, so later epochs only reshuffle
    (the same order as re-reading). For small data sets: the demo's 4096 images at 112 px
    take 0.6 GB."""


@dataclass
class ContrastiveConfig:
    """tools/pretrain_tower.py's configuration (configs/train/*clip*.yaml)."""

    model: Optional[str] = None
    """A model YAML (configs/model/*.yaml) whose `llava.tower` is the tower to train."""
    tower: dict[str, Any] = field(default_factory=dict)
    """Or the tower's ClipVisionConfig fields themselves (overriding the model's)."""
    tokenizer: str = ""
    output_dir: str = "runs/tower"
    """metrics.jsonl, loss.png, tensorboard/ and tower.safetensors (written last, atomically)."""
    data: ContrastiveData = field(default_factory=ContrastiveData)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 64
    """The joint embedding's width."""
    image_embedding: str = "pooled"
    """`pooled`: CLIP's own -- the class token (SigLIP: the mean of the patch tokens).
    `cells`: the patch grid averaged to cells x cells tokens (llava.pool_feature_grid),
    concatenated, then projected, so that every region has to carry what the caption says
    about it (the demo, whose captions name each cell: a linear probe of the pooled cell
    features 0.928 instead of 0.907, caption accuracy downstream 0.85 instead of 0.82)."""
    cells: int = 2
    """image_embedding `cells`: the grid's side after pooling (it must divide the tower's)."""
    batch_size: int = 128
    """Pairs per step: each image's caption is told apart from the batch's other captions."""
    max_steps: int = 1000
    lr: float = 1.0e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    min_lr_ratio: float = 0.0
    init_logit_scale: float = 10.0
    """exp(logit_scale) at init (CLIP: 1 / 0.07); learned, capped at 100 as in CLIP."""
    log_every: int = 10
    tensorboard: bool = True
    """Also write the metrics to output_dir/tensorboard/."""
    seed: int = 0
    device: str = "cpu"


class TextEncoder(nn.Module):
    """tokens [B, L] (+ mask [B, L] bool, True = a caption token) -> [B, width]."""

    def __init__(self, vocab_size: int, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(vocab_size, config.width)
        self.position = nn.Parameter(torch.randn(config.max_len, config.width) * 0.02)
        layer = nn.TransformerEncoderLayer(config.width, config.heads, 4 * config.width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=~mask))
        m = mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


class ContrastiveModel(nn.Module):
    """The tower and the text encoder, each with a bias-free projection into the joint space."""

    def __init__(self, tower_config: ClipVisionConfig, vocab_size: int, text: TextEncoderConfig,
                 embed_dim: int, init_logit_scale: float = 10.0, image_embedding: str = "pooled", cells: int = 2):
        super().__init__()
        if image_embedding not in ("pooled", "cells"):
            raise ValueError(f"image_embedding must be 'pooled' or 'cells', got {image_embedding!r}")
        if image_embedding == "cells":
            check_pool_side(tower_config.num_tokens, cells, "cells")
        self.cells = cells if image_embedding == "cells" else None
        # Every token after ln_post, whatever the LLaVA model reads later: the pooled token is
        # the last layer's (class token, or the mean for SigLIP).
        self.tower = ClipVisionTower(dataclasses.replace(tower_config, feature_layer=-1, feature_select="full",
                                                         post_layernorm=True))
        self.text = TextEncoder(vocab_size, text)
        image_dim = tower_config.width * (cells * cells if self.cells else 1)
        self.image_projection = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> unit-norm [B, embed_dim]."""
        tokens = self.tower(pixels)  # [B, (1 +) g*g, W]
        patches = tokens[:, 1:] if self.tower.config.has_class_token else tokens
        if self.cells:
            pooled = pool_feature_grid(patches, self.cells).flatten(1)  # [B, cells^2 * W]
        else:
            pooled = tokens[:, 0] if self.tower.config.has_class_token else patches.mean(1)
        return F.normalize(self.image_projection(pooled), dim=-1)

    def encode_texts(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask [B, L] -> unit-norm [B, embed_dim]."""
        return F.normalize(self.text_projection(self.text(tokens, mask)), dim=-1)

    def forward(self, pixels, tokens, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (image embeddings, text embeddings, the temperature exp(logit_scale) <= 100)."""
        return self.encode_images(pixels), self.encode_texts(tokens, mask), self.logit_scale.exp().clamp(max=100.0)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: the mean of the image->text and text->image cross entropies
    of logit_scale * image_emb @ text_emb.T, pair i's match being column / row i.
    image_emb, text_emb [B, E] (unit norm)."""
    logits = logit_scale * image_emb @ text_emb.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def retrieval_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[float, float]:
    """(image->text, text->image) top-1 accuracy among the given pairs."""
    sim = image_emb @ text_emb.T
    target = torch.arange(len(sim), device=sim.device)
    return (sim.argmax(1) == target).float().mean().item(), (sim.argmax(0) == target).float().mean().item()


# ---- data -----------------------------------------------------------------------------------


def _source(data: ContrastiveData):
    from llama_vision.data.sources import JsonlCaptionSource, WebDatasetSource

    if not data.paths:
        raise ValueError("data.paths is empty: name the caption shards (caption_wds) or JSONL files (caption_jsonl)")
    if data.kind == "caption_wds":
        return WebDatasetSource(data.paths)
    if data.kind == "caption_jsonl":
        return JsonlCaptionSource(data.paths, data.image_root)
    raise ValueError(f"data.kind must be caption_wds or caption_jsonl, got {data.kind!r}")


def iter_pairs(data: ContrastiveData, processor, tokenizer, max_len: int, skipped: Counter,
               seed: int = 0) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """(pixels [3, S, S], caption tokens) forever, epoch after epoch through a shuffle
    buffer; a sample that cannot be used is skipped and counted in ``skipped`` by reason
    (the source's error, ``no_image`` / ``several_images``, ``empty_text``, ``bad_image``;
    each pass, or once with ``data.cache``)."""
    from llama_vision.data.image_io import load_image

    source, rng = _source(data), random.Random(seed)

    def decoded() -> Iterator[tuple[torch.Tensor, list[int]]]:
        for record in source:
            if record.error:
                skipped[record.error] += 1
                continue
            images, text = record.fields.get("images") or [], record.fields.get("text")
            if len(images) != 1:
                skipped["no_image" if not images else "several_images"] += 1
                continue
            if not isinstance(text, str) or not text.strip():
                skipped["empty_text"] += 1
                continue
            try:
                pixels, _ = processor(load_image(images[0]))
            except (ValueError, OSError) as exc:  # ImageLoadError is a ValueError
                skipped["bad_image"] += 1
                if skipped["bad_image"] <= 3:
                    print(f"[pretrain_tower] skipped {record.key}: {exc}")
                continue
            yield pixels.reshape(pixels.shape[-3:]), tokenizer.encode(text.strip(), bos=False, eos=False)[:max_len]

    cached: list | None = None
    buffer: list = []
    while True:
        yielded = False
        if cached is not None:
            epoch = iter(cached)
        elif data.cache:
            cached = list(decoded())  # counted once: later epochs skip nothing new
            epoch = iter(cached)
        else:
            epoch = decoded()
        for pair in epoch:
            buffer.append(pair)
            if len(buffer) >= data.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
                yielded = True
        rng.shuffle(buffer)
        while buffer:
            yield buffer.pop()
            yielded = True
        if not yielded:
            raise ValueError(f"no usable image-caption pair in {data.paths} (skipped: {dict(skipped)})")


def _collate(pairs: Sequence[tuple[torch.Tensor, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(1, max(len(t) for _, t in pairs))
    tokens = torch.zeros(len(pairs), length, dtype=torch.long)
    mask = torch.zeros(len(pairs), length, dtype=torch.bool)
    for i, (_, t) in enumerate(pairs):
        tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(t)] = True
    return torch.stack([p for p, _ in pairs]), tokens, mask


# ---- the loop -------------------------------------------------------------------------------


def tower_config_of(cfg: ContrastiveConfig) -> ClipVisionConfig:
    """The ClipVisionConfig to train: cfg.model's `llava.tower`, updated by cfg.tower."""
    fields: dict[str, Any] = {}
    if cfg.model:
        from llama_vision.config import load_yaml

        llava = load_yaml(cfg.model).get("llava")
        if not isinstance(llava, dict) or "tower" not in llava:
            raise ValueError(f"model {cfg.model}: no `llava.tower` (a LLaVA model YAML names its CLIP / SigLIP tower there)")
        fields.update(llava["tower"])
    fields.update(cfg.tower)
    if not fields:
        raise ValueError("no tower to train: set `model` (a LLaVA model YAML) or `tower` (ClipVisionConfig fields)")
    return ClipVisionConfig(**fields)


def pretrain_tower(cfg: ContrastiveConfig, log=print) -> tuple[ContrastiveModel, dict[str, Any]]:
    """Train cfg.tower contrastively on cfg.data; writes output_dir/tower.safetensors (our
    tower layout: ``init_vision_from`` reads it), metrics.jsonl, loss.png. -> (the trained
    ContrastiveModel, a summary: last loss, in-batch retrieval accuracy, skipped samples by
    reason, wall seconds)."""
    import time

    from tqdm.auto import tqdm

    from llama_vision.data.llava_images import LlavaImageProcessor, _tower_normalisation
    from llama_vision.tokenizer import load_tokenizer
    from llama_vision.training.metrics import MetricsLogger
    from llama_vision.training.schedule import warmup_cosine
    from llama_vision.utils.io import atomic_save_safetensors

    if cfg.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (a caption is told apart from the batch's others), got {cfg.batch_size}")
    if not cfg.tokenizer:
        raise ValueError("tokenizer is empty: name the tokenizer.model the captions are encoded with")
    tower_config = tower_config_of(cfg)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = ContrastiveModel(tower_config, tokenizer.n_words, cfg.text, cfg.embed_dim, cfg.init_logit_scale,
                             cfg.image_embedding, cfg.cells).to(cfg.device)
    mean, std = _tower_normalisation(tower_config)
    processor = LlavaImageProcessor(tower_config.image_size, tower_config.num_tokens, square=cfg.data.square,
                                    image_mean=mean, image_std=std)
    decay, no_decay = [], []  # no decay on norms, biases, the text position table, the temperature
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and n != "text.position" else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    skipped: Counter = Counter()
    pairs = iter_pairs(cfg.data, processor, tokenizer, cfg.text.max_len, skipped, cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start, summary = time.time(), {}
    with MetricsLogger(out, tensorboard=cfg.tensorboard) as metrics:
        for step in tqdm(range(1, cfg.max_steps + 1), desc="pretrain_tower", mininterval=2.0):
            lr = warmup_cosine(step - 1, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, lr=cfg.lr,
                               min_lr=cfg.lr * cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pixels, tokens, mask = (t.to(cfg.device) for t in _collate([next(pairs) for _ in range(cfg.batch_size)]))
            image_emb, text_emb, scale = model(pixels, tokens, mask)
            loss = clip_loss(image_emb, text_emb, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                i2t, t2i = retrieval_accuracy(image_emb.detach(), text_emb.detach())
                summary = {"loss": loss.item(), "i2t_acc": i2t, "t2i_acc": t2i, "logit_scale": scale.item(), "lr": lr,
                           "skipped": sum(skipped.values())}
                metrics.log(step, **summary)
    tower_sd = {k: v.detach().cpu().contiguous() for k, v in model.tower.state_dict().items()}
    atomic_save_safetensors(tower_sd, out / "tower.safetensors", metadata={"layout": "llama_vision_clip_tower"})
    summary.update(wall_s=round(time.time() - start, 1), skipped_by_reason=dict(skipped), tower=str(out / "tower.safetensors"))
    log(f"[pretrain_tower] {cfg.max_steps} steps in {summary['wall_s']} s: loss {summary.get('loss', float('nan')):.3f}, "
        f"in-batch i2t {summary.get('i2t_acc', 0):.2f}; skipped {dict(skipped)} -> {out / 'tower.safetensors'}")
    return model, summary
