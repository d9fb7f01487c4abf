"""Model hyper-parameters, read from Meta's params.json (plus optional vision-size keys)."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path

import yaml


@dataclass
class ModelArgs:
    # Text trunk (Llama 3 / 3.1), names as in Meta's params.json.
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    # Llama 3.1 RoPE frequency scaling (Meta hard-codes these; HF's rope_scaling carries them).
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_batch_size: int = 32
    max_seq_len: int = 2048

    # Vision, Meta's keys.
    vision_chunk_size: int = 560
    vision_max_num_chunks: int = 4
    vision_num_cross_attention_layers: int | None = None  # default: n_layers // 4 (or len(fusion_schedule))
    # The self-attention layers (0-based, Meta's per-layer counting) that a cross-attention
    # block runs before, ascending and unique, one per cross-attention layer. None = Meta's
    # rule (`fusion_schedule(n_layers, n_cross)`); params.json carries the key only when a
    # checkpoint uses another schedule (e.g. an HF Mllama config with other
    # `cross_attention_layers`). Read back as a list.
    fusion_schedule: tuple[int, ...] | None = None
    # How the tile-position embeddings are held (`gated_positional_embedding`,
    # `pre_tile_pos_embed.embedding`, `post_tile_pos_embed.embedding`):
    #   "grid" (Meta's): one value per tile of the [T, T] grid, shared by every aspect
    #     ratio that reaches the tile: [T, T, P, W] and [T, T, 1, W];
    #   "per_aspect_ratio" (transformers' Mllama): one full row per aspect-ratio id,
    #     [n_ratios + 1, T, P, W] and [n_ratios + 1, T, 1, W], row 0 for absent images,
    #     row i for `supported_aspect_ratios(T)[i - 1]`. Chosen when loading an HF checkpoint
    #     whose per-ratio rows no grid can hold (fine-tuned with transformers). A Meta-format
    #     save keeps these per-ratio tables under the same key names; only this library
    #     reads such a checkpoint back (Meta's reference code expects the grid shapes).
    tile_embedding_layout: str = "grid"

    # Vision encoder sizes (ViT-H/14 as released; override for other encoders).
    vision_width: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    vision_global_layers: int = 8
    vision_patch_size: int = 14
    vision_intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    vision_mlp_ratio: float = 4.0
    vision_in_channels: int = 3

    # New special tokens (ids >= vocab_size) get a small learnable table; row 0 = <|image|>.
    n_learnable_embeddings: int = 8
    attn_backend: str = "sdpa"  # "sdpa" | "xformers" | "flash_attn"
    # Added modalities persisted with the checkpoint (e.g. the VideoConfig fields), so
    # build_model/load_model re-create them: {"video": {...}}.
    video: dict | None = None
    # The LLaVA projector image modality (llama_vision.model.llava.LlavaConfig.to_params:
    # its tower, projector and layout), re-added by build_model.
    llava: dict | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.vision_num_cross_attention_layers is None:
            self.vision_num_cross_attention_layers = (
                len(self.fusion_schedule) if isinstance(self.fusion_schedule, (list, tuple)) else max(1, self.n_layers // 4)
            )
        self.vision_intermediate_layers = tuple(int(i) for i in self.vision_intermediate_layers)
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.vision_width % self.vision_heads:
            problems.append(f"vision_width {self.vision_width} is not divisible by vision_heads {self.vision_heads}")
        if self.vision_chunk_size % self.vision_patch_size:
            problems.append(f"vision_chunk_size {self.vision_chunk_size} is not a multiple of vision_patch_size {self.vision_patch_size}")
        bad = [i for i in self.vision_intermediate_layers if not 0 <= i < self.vision_layers]
        if bad:
            problems.append(f"vision_intermediate_layers {bad} outside 0..{self.vision_layers - 1}")
        if not 0 <= self.vision_num_cross_attention_layers <= self.n_layers:
            problems.append(f"vision_num_cross_attention_layers must be in 0..{self.n_layers} (0: no Meta image encoder "
                            f"and adapters, for a projector image modality)")
        elif self.vision_num_cross_attention_layers == 0:
            if self.fusion_schedule:
                problems.append(f"fusion_schedule {self.fusion_schedule} given with vision_num_cross_attention_layers 0")
            self.fusion_schedule = []
        elif self.fusion_schedule is None:
            self.fusion_schedule = fusion_schedule(self.n_layers, self.vision_num_cross_attention_layers)
        else:
            bad_schedule = _schedule_problems(self.fusion_schedule, self.n_layers, self.vision_num_cross_attention_layers)
            problems += bad_schedule
            if not bad_schedule:
                self.fusion_schedule = [int(i) for i in self.fusion_schedule]
        if self.tile_embedding_layout not in TILE_EMBEDDING_LAYOUTS:
            problems.append(f"tile_embedding_layout must be one of {list(TILE_EMBEDDING_LAYOUTS)}, got {self.tile_embedding_layout!r}")
        if problems:
            raise ValueError("invalid model params: " + "; ".join(problems))

    # Aliases used by the issue/config vocabulary.
    @property
    def vision_max_num_tiles(self) -> int:
        return self.vision_max_num_chunks

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Llama's SwiGLU width: 2/3 * 4 * dim, scaled, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def vision_grid(self) -> int:
        return self.vision_chunk_size // self.vision_patch_size

    @property
    def vision_tokens_per_tile(self) -> int:
        return self.vision_grid**2 + 1  # + class token

    @property
    def vision_output_dim(self) -> int:
        """Final features concatenated with each intermediate tap: (1 + n_taps) * width."""
        return (1 + len(self.vision_intermediate_layers)) * self.vision_width

    @property
    def image_token_id(self) -> int:
        return self.vocab_size

    @property
    def has_meta_fusion_schedule(self) -> bool:
        """Whether the adapters sit where Meta's rule puts them (params.json then omits
        `fusion_schedule`)."""
        return self.fusion_schedule == fusion_schedule(self.n_layers, self.vision_num_cross_attention_layers)

    @classmethod
    def from_params(cls, params: dict | str | Path, **overrides) -> "ModelArgs":
        """Build from a params.json dict or path (JSON or YAML); `overrides` replace keys.
        Unknown keys, an unresolved `vocab_size: auto` and values of the wrong type are
        ValueErrors naming the key (and the file); `vision_max_num_tiles` is accepted as an
        alias of Meta's `vision_max_num_chunks`."""
        where = ""
        if not isinstance(params, dict):
            path = Path(params)
            if path.is_dir():
                path = path / "params.json"
            if not path.is_file():
                raise FileNotFoundError(f"params file not found: {path}")
            text = path.read_text()
            params = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            if not isinstance(params, dict):
                raise ValueError(f"{path} must hold a mapping of model params, got {type(params).__name__}")
            where = f" (in {path})"
        params = {**params, **overrides}
        for f in fields(cls):
            if f.type in ("float", "float | None") and isinstance(params.get(f.name), str):
                # YAML 1.1 reads "1e-05" as a string.
                try:
                    params[f.name] = float(params[f.name])
                except ValueError:
                    raise ValueError(f"model param {f.name}={params[f.name]!r}{where} is not a number") from None
        if "vision_max_num_tiles" in params:
            params["vision_max_num_chunks"] = params.pop("vision_max_num_tiles")
        # Keys Meta writes that do not change the architecture.
        for ignored in ("quantization_args", "lora_args", "model_type"):
            params.pop(ignored, None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown model params {unknown}; known: {sorted(known)}")
        if "vocab_size" in params and params["vocab_size"] in (None, "auto"):
            # Training configs say `vocab_size: auto`: the trainer fills in the tokenizer's
            # n_words. Built directly, nothing can.
            raise ValueError(
                f"model param vocab_size={params['vocab_size']!r}{where} must be resolved to a number: pass it "
                "(e.g. build_model(path, vocab_size=N), N = the tokenizer's n_words), or build through the "
                "trainer with a tokenizer, which sets it"
            )
        # Wrong types otherwise surface far away (a str dim fails as "not all arguments
        # converted during string formatting" in a `%`).
        for f in fields(cls):
            if f.name in params and not _has_type(params[f.name], f.type):
                value = params[f.name]
                raise ValueError(f"model param {f.name}{where}: expected {f.type}, got {value!r} ({type(value).__name__})")
        return cls(**params)


def _has_type(value, annotation: str) -> bool:
    """Whether a params value fits a ModelArgs field annotation (a string under `from
    __future__ import annotations`: "int", "float | None", "tuple[int, ...]", ...). Numpy
    numbers count; a bool is no int or float here (`dim: true` is a mistake). An annotation
    this does not know (a field added later) accepts anything: the dataclass then decides."""
    kinds = [a.strip() for a in annotation.split("|")]
    if not set(kinds) <= {"None", "bool", "int", "float", "str", "dict", "tuple[int, ...]"}:
        return True
    for kind in kinds:
        if kind == "None" and value is None:
            return True
        if isinstance(value, bool):
            if kind == "bool":
                return True
            continue
        if kind == "int" and isinstance(value, numbers.Integral):
            return True
        if kind == "float" and isinstance(value, numbers.Real):
            return True
        if kind == "str" and isinstance(value, str):
            return True
        if kind == "dict" and isinstance(value, dict):
            return True
        if kind == "tuple[int, ...]" and isinstance(value, (list, tuple)):
            return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    return False


TILE_EMBEDDING_LAYOUTS = ("grid", "per_aspect_ratio")


def _schedule_problems(schedule, n_layers: int, n_cross: int) -> list[str]:
    """What is wrong with an explicit `fusion_schedule` (empty: nothing)."""
    if not isinstance(schedule, (list, tuple)) or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in schedule
    ):
        return [f"fusion_schedule must be a list of layer indices, got {schedule!r}"]
    schedule = [int(i) for i in schedule]
    problems = []
    if len(schedule) != n_cross:
        problems.append(
            f"fusion_schedule {schedule} has {len(schedule)} entries but vision_num_cross_attention_layers is {n_cross}"
        )
    bad = [i for i in schedule if not 0 <= i < n_layers]
    if bad:
        problems.append(f"fusion_schedule {schedule}: layers {bad} outside 0..{n_layers - 1}")
    if schedule != sorted(set(schedule)):
        problems.append(f"fusion_schedule {schedule} must be ascending without repeats (one cross-attention block before a layer)")
    return problems


def fusion_schedule(n_layers: int, n_cross_attention_layers: int) -> list[int]:
    """Self-attention layers before which a cross-attention block runs (Meta's rule).

    k = ceil(L / n); count every k-th layer from the top, keep the first n, ascending:
    L=32, n=8 -> [3, 7, ..., 31]; L=80, n=20 -> [3, 7, ..., 79].
    """
    if n_cross_attention_layers == 0:
        return []
    k = math.ceil(n_layers / n_cross_attention_layers)
    return list(range(n_layers))[::-1][::k][:n_cross_attention_layers][::-1]
