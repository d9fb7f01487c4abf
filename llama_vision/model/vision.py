"""The image encoder: ViT-H/14 with tile-aware position embeddings and 8 gated global
layers, as released in Llama 3.2 Vision (Meta's `VisionEncoder`), then the projection to
the text width. Module and parameter names are Meta's, so checkpoints load key-for-key.

Shapes: images [B, N, T, 3, S, S] (N images per row, T = max tiles), aspect ratios
[B, N, 2] = (tiles_h, tiles_w); output [B, N, T, P, D_text] with P = (S/patch)^2 + 1.

Tile-position embeddings come in two layouts (`ModelArgs.tile_embedding_layout`):
"grid" (Meta's) holds one value per tile of a [T, T] grid and gives an (h, w) image the
row-major tiles of its [:h, :w] sub-grid (zeros in empty tile slots); "per_aspect_ratio"
(transformers' Mllama) holds one full row of T tile slots per aspect-ratio id -- row 0 for
absent images, row i for `supported_aspect_ratios(T)[i - 1]` -- and adds the image's row
to every tile slot, empty ones included, exactly as `MllamaPrecomputedAspectRatioEmbedding`
/ `MllamaPrecomputedPositionEmbedding` do. Every grid has an exact per-ratio form
(`per_ratio_from_grid`); the converse holds only when the rows agree on shared tiles and
are zero elsewhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama_vision.data.tiling import supported_aspect_ratios  # (tiles_h, tiles_w), transformers' order
from model_parallel import column_parallel_linear, row_parallel_linear, tp_size

from .args import ModelArgs
from .attention import attention


class PatchEmbedding(nn.Module):
    """Non-overlapping patches via unfold + one linear map (no bias); equals a stride-p conv
    whose weight is reshaped [out, C*p*p] (channel slowest, as conv weights flatten)."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        self._unfold = nn.Unfold(kernel_size=patch_size, stride=patch_size)
        self._linear = column_parallel_linear(in_channels * patch_size * patch_size, width, gather_output=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, C, S, S] -> [n, (S/p)^2, width]."""
        return self._linear(self._unfold(x).transpose(1, 2))


class TilePositionEmbedding(nn.Module):
    """A learned vector per tile, picked by the image's aspect ratio, gated. `embedding` is
    [T, T, 1, W] in the "grid" layout, [n_ratios + 1, T, 1, W] in "per_aspect_ratio"."""

    def __init__(self, num_tiles: int, width: int, layout: str = "grid"):
        super().__init__()
        self.num_tiles = num_tiles
        self.layout = layout
        rows = tile_table_rows(num_tiles, layout)
        self.embedding = nn.Parameter(torch.randn(rows, num_tiles, 1, width) / math.sqrt(width))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
        """x [n, T, P, W], ar [n, 2] -> x + tanh(gate) * the image's tile embeddings
        (grid: embedding[:h, :w] on the first h*w tiles; per ratio: its row on every tile)."""
        return x + tile_embedding(self.embedding, ar, x.shape[1], self.layout).to(x.dtype) * self.gate.tanh()


def tile_table_rows(num_tiles: int, layout: str) -> int:
    """First dim of a tile table: T (grid) or n_ratios + 1 (per aspect ratio)."""
    if layout == "grid":
        return num_tiles
    if layout == "per_aspect_ratio":
        return len(supported_aspect_ratios(num_tiles)) + 1
    raise ValueError(f"unknown tile_embedding_layout {layout!r}")


def tile_embedding(table: torch.Tensor, ar: torch.Tensor, num_tiles: int, layout: str) -> torch.Tensor:
    """The tile embeddings of each image [n, num_tiles, P, W] from a table of either layout."""
    if layout == "grid":
        return tile_grid_embedding(table, ar, num_tiles)
    return tile_ratio_embedding(table, ar, num_tiles)


def tile_grid_embedding(table: torch.Tensor, ar: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """table [G, G, P, W] -> per image [n, num_tiles, P, W]: row-major tiles of the (h, w)
    sub-grid, zeros for empty tile slots."""
    out = table.new_zeros(ar.shape[0], num_tiles, *table.shape[2:])
    for i, (h, w) in enumerate(ar.tolist()):
        out[i, : h * w] = table[:h, :w].reshape(h * w, *table.shape[2:])
    return out


def tile_ratio_embedding(table: torch.Tensor, ar: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """table [n_ratios + 1, T, P, W] -> per image [n, num_tiles, P, W]: the first num_tiles
    slots of the image's aspect-ratio row (transformers: `embedding(aspect_ratio_ids)`
    reshaped to [n, T, P, W] and added to every tile slot)."""
    ids = aspect_ratio_ids(ar, table.shape[1]).to(table.device)
    return table[ids, :num_tiles]


def aspect_ratio_ids(ar: torch.Tensor, max_num_tiles: int) -> torch.Tensor:
    """(tiles_h, tiles_w) [n, 2] -> transformers' aspect_ratio_ids [n] (long, on the CPU):
    1 + the index in `supported_aspect_ratios(max_num_tiles)`, 0 for an absent image
    (h * w == 0). Any other grid is an error."""
    table = {r: i for i, r in enumerate(supported_aspect_ratios(max_num_tiles), 1)}
    ids = []
    for h, w in ar.reshape(-1, 2).tolist():
        if h * w == 0:
            ids.append(0)
        elif (h, w) in table:
            ids.append(table[(h, w)])
        else:
            raise ValueError(f"aspect ratio {h}x{w} is not one of the {len(table)} supported for max_num_tiles={max_num_tiles}")
    return torch.tensor(ids, dtype=torch.long)


def per_ratio_from_grid(table: torch.Tensor) -> torch.Tensor:
    """Grid [T, T, P, W] -> per-aspect-ratio [n_ratios + 1, T, P, W] (exact): row i holds
    the row-major tiles of ratio i's sub-grid and zeros in its empty slots; row 0 zeros.
    (transformers' converter precomputes its tables from Meta's this way.)"""
    t, _, p, w = table.shape
    ratios = supported_aspect_ratios(t)
    out = table.new_zeros(len(ratios) + 1, t, p, w)
    for i, (h, wt) in enumerate(ratios, 1):
        out[i, : h * wt] = table[:h, :wt].reshape(h * wt, p, w)
    return out


def grid_from_per_ratio(table: torch.Tensor) -> torch.Tensor:
    """Per-aspect-ratio [n_ratios + 1, T, P, W] -> grid [T, T, P, W], the inverse of
    `per_ratio_from_grid` on its image. Each cell takes the LAST ratio's value (ratios that
    share a cell may disagree in a table trained per ratio; see `grid_holds_exactly`); row
    0 and empty slots are dropped; cells no supported ratio reaches (e.g. [3, 3] of a 4x4
    grid) come back as zeros -- a forward never reads them."""
    _, t, p, w = table.shape
    grid = table.new_zeros(t, t, p, w)
    for i, (h, wt) in enumerate(supported_aspect_ratios(t), 1):
        grid[:h, :wt] = table[i, : h * wt].reshape(h, wt, p, w)
    return grid


def grid_holds_exactly(table: torch.Tensor) -> bool:
    """Whether a per-aspect-ratio table is the per-ratio form of some grid (bitwise)."""
    return torch.equal(per_ratio_from_grid(grid_from_per_ratio(table)), table)


def _is_grid_table(t: torch.Tensor) -> bool:
    """Grid tables are [T, T, ...]; per-ratio ones [n_ratios + 1, T, ...] (n_ratios >= T)."""
    return t.dim() == 4 and t.shape[0] == t.shape[1]


class ImageAttention(nn.Module):
    def __init__(self, width: int, n_heads: int, backend: str):
        super().__init__()
        self.n_local_heads = n_heads // tp_size()
        self.head_dim = width // n_heads
        self.backend = backend
        self.wq = column_parallel_linear(width, width)
        self.wk = column_parallel_linear(width, width)
        self.wv = column_parallel_linear(width, width)
        self.wo = row_parallel_linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, self.n_local_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = attention(q, k, v, mask=mask, backend=self.backend)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class ImageFeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = column_parallel_linear(width, hidden, bias=True)
        self.c_proj = row_parallel_linear(hidden, width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, as released


class ImageTransformerBlock(nn.Module):
    """Pre-LayerNorm block; the global layers add tanh gates on both branches."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: float, gated: bool, backend: str):
        super().__init__()
        self.attn = ImageAttention(width, n_heads, backend)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = ImageFeedForward(width, int(mlp_ratio * width))
        self.ln_2 = nn.LayerNorm(width)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        gate_attn = self.gate_attn.tanh() if self.gated else 1
        gate_ffn = self.gate_ffn.tanh() if self.gated else 1
        x = x + gate_attn * self.attn(self.ln_1(x), mask)
        return x + gate_ffn * self.mlp(self.ln_2(x))


class ImageTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, gated: bool, backend: str):
        super().__init__()
        self.resblocks = nn.ModuleList(ImageTransformerBlock(width, heads, mlp_ratio, gated, backend) for _ in range(layers))
        self.checkpoint_activations = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, taps: tuple[int, ...] = ()):
        """Returns (x, taps stacked on a new last dim or None). Tap i is the input OF block i
        (= output of block i-1), as in Meta's reference and HF's hidden_states[i]."""
        tapped = []
        for i, block in enumerate(self.resblocks):
            if i in taps:
                tapped.append(x)
            if self.checkpoint_activations and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x, (torch.stack(tapped, dim=-1) if tapped else None)


class VisionEncoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        w, self.width = args.vision_width, args.vision_width
        self.max_num_tiles = args.vision_max_num_chunks
        self.grid = args.vision_grid
        self.taps = args.vision_intermediate_layers
        scale = w**-0.5
        self.conv1 = PatchEmbedding(args.vision_in_channels, w, args.vision_patch_size)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, w))
        self.tile_embedding_layout = args.tile_embedding_layout
        rows = tile_table_rows(self.max_num_tiles, self.tile_embedding_layout)
        self.gated_positional_embedding = nn.Parameter(scale * torch.randn(rows, self.max_num_tiles, self.grid**2 + 1, w))
        self.gated_positional_embedding_gate = nn.Parameter(torch.zeros(1))
        self.ln_pre = nn.LayerNorm(w)
        self.ln_post = nn.LayerNorm(w)
        self.transformer = ImageTransformer(w, args.vision_layers, args.vision_heads, args.vision_mlp_ratio, False, args.attn_backend)
        self.global_transformer = ImageTransformer(
            w, args.vision_global_layers, args.vision_heads, args.vision_mlp_ratio, True, args.attn_backend
        )
        self.pre_tile_pos_embed = TilePositionEmbedding(self.max_num_tiles, w, self.tile_embedding_layout)
        self.post_tile_pos_embed = TilePositionEmbedding(self.max_num_tiles, w, self.tile_embedding_layout)
        self._register_load_state_dict_pre_hook(self._resize_position_embeddings_on_load)

    def forward(self, images: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
        """images [B, N, T, 3, S, S], ar [B, N, 2] -> features [B, N, T, P, (1 + taps) * W]."""
        b, n, t = images.shape[:3]
        if t > self.max_num_tiles:
            raise ValueError(f"images have {t} tile slots, the encoder supports at most {self.max_num_tiles}")
        ar = ar.reshape(b * n, 2)
        x = self.conv1(images.reshape(b * n * t, *images.shape[3:]))  # [bnt, grid^2, W]
        x = self.pre_tile_pos_embed(x.reshape(b * n, t, -1, self.width), ar)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(b * n, t, 1, self.width), x], dim=2)
        ntok = x.shape[2]
        x = self._add_positional_embedding(x, ar)
        x = self.ln_pre(x)
        # Quirk kept from the released encoder (the checkpoints were trained with it): tokens
        # are padded to a multiple of 8 per tile, and the mask blocks only pairs where BOTH
        # tokens are padding (pad tokens or empty tile slots) -- real tokens still attend to
        # padding and to empty tiles.
        npad = (8 - ntok % 8) % 8
        x = F.pad(x, (0, 0, 0, npad))
        mask = self._padding_mask(ar, t, ntok, ntok + npad, x.device)
        x = x.reshape(b * n, t * (ntok + npad), self.width)
        x, tapped = self.transformer(x, mask, self.taps)
        x = self.ln_post(x)
        x = self.post_tile_pos_embed(x.reshape(b * n, t, ntok + npad, self.width), ar)
        x, _ = self.global_transformer(x.reshape(b * n, t * (ntok + npad), self.width), mask)
        x = x.reshape(b, n, t, ntok + npad, self.width)[:, :, :, :ntok]
        # Taps stacked on the last dim then flattened: feature index = d * n_taps + j.
        tapped = tapped.reshape(b, n, t, ntok + npad, -1)[:, :, :, :ntok]
        return torch.cat([x, tapped], dim=-1)

    def _add_positional_embedding(self, x: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
        """Per-patch embedding scaled by (1 - tanh g) plus the tile-aware one scaled by tanh g."""
        gate = self.gated_positional_embedding_gate.tanh()
        x = x + self.positional_embedding.to(x.dtype) * (1 - gate)
        table = tile_embedding(self.gated_positional_embedding, ar, x.shape[1], self.tile_embedding_layout)
        return x + table.to(x.dtype) * gate

    @staticmethod
    def _padding_mask(ar: torch.Tensor, num_tiles: int, ntok: int, ntok_padded: int, device) -> torch.Tensor:
        """Boolean [n, 1, L, L] (True = attend), L = num_tiles * ntok_padded."""
        real = torch.zeros(ar.shape[0], num_tiles, ntok_padded, dtype=torch.bool, device=device)
        tiles = (ar[:, 0] * ar[:, 1]).tolist()
        for i, nt in enumerate(tiles):
            real[i, :nt, :ntok] = True
        real = real.flatten(1)
        return (real[:, :, None] | real[:, None, :])[:, None]

    # --- loading checkpoints trained at another tile size (Meta's load hooks) -----------
    def _resize_position_embeddings_on_load(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "positional_embedding"
        if key in state_dict and state_dict[key].shape != self.positional_embedding.shape:
            state_dict[key] = resize_local_position_embedding(state_dict[key], self.grid)
        key = prefix + "gated_positional_embedding"
        if key in state_dict:
            state_dict[key] = self._tile_table_on_load(state_dict[key], key, self.gated_positional_embedding)
        elif prefix + "positional_embedding" in state_dict:
            # Older checkpoints had no tile-aware embedding: start it from the local one, gate 0.
            grid = state_dict[prefix + "positional_embedding"][None, None].repeat(self.max_num_tiles, self.max_num_tiles, 1, 1)
            state_dict[key] = self._tile_table_on_load(grid, key, self.gated_positional_embedding)
            state_dict[key + "_gate"] = torch.zeros(1, dtype=state_dict[key].dtype)
        for name, param in (("pre_tile_pos_embed.embedding", self.pre_tile_pos_embed.embedding),
                            ("post_tile_pos_embed.embedding", self.post_tile_pos_embed.embedding)):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = self._tile_table_on_load(state_dict[key], key, param)

    def _tile_table_on_load(self, t: torch.Tensor, key: str, param: torch.Tensor) -> torch.Tensor:
        """A checkpoint's tile table in this encoder's layout and size. A grid table is
        resized to this tile size / count (Meta's hooks) and, for a per-aspect-ratio
        encoder, expanded exactly to its per-ratio form. A per-ratio table is taken as is
        (a per-ratio encoder of another size then fails with a size mismatch); a grid
        encoder refuses it: the rows may not fit one value per tile."""
        if t.shape == param.shape:
            return t
        if not _is_grid_table(t):
            if self.tile_embedding_layout == "grid":
                raise RuntimeError(
                    f"{key}: the checkpoint holds per-aspect-ratio tile embeddings {list(t.shape)} (a model saved "
                    f"with tile_embedding_layout='per_aspect_ratio', which Meta's own code cannot load either); this "
                    f"model uses Meta's 'grid' layout {list(param.shape)}: build it with "
                    f"tile_embedding_layout='per_aspect_ratio'"
                )
            return t
        if t.shape[2] == 1:  # pre/post tile embedding [T0, T0, 1, W]
            if t.shape[0] != self.max_num_tiles:
                t = resize_tile_embedding(t, self.max_num_tiles)
        elif t.shape[:3] != (self.max_num_tiles, self.max_num_tiles, self.grid**2 + 1):
            t = resize_global_position_embedding(t, self.grid, self.max_num_tiles)
        if self.tile_embedding_layout == "per_aspect_ratio":
            t = per_ratio_from_grid(t)
        return t


def _interp(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    dtype = x.dtype
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=True).to(dtype)


def resize_local_position_embedding(embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g^2, W] -> [1 + grid^2, W]: class row kept, patch grid resized bilinearly
    (align_corners=True, as Meta's load hook)."""
    old = int(math.sqrt(embed.shape[0] - 1))
    patches = embed[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = _interp(patches, (grid, grid)).permute(0, 2, 3, 1).reshape(grid * grid, -1)
    return torch.cat([embed[:1], patches], dim=0)


def resize_global_position_embedding(embed: torch.Tensor, grid: int, num_tiles: int) -> torch.Tensor:
    """[T0, T0, 1 + g^2, W] -> [T, T, 1 + grid^2, W]: the patch embeddings of all tiles are
    laid out as one (T0*g) x (T0*g) image and resized to (T*grid) x (T*grid); class rows
    are resized over the tile grid."""
    cls, pos = embed[:, :, :1], embed[:, :, 1:]
    t0, _, n, w = pos.shape
    g0 = int(math.sqrt(n))
    pos = pos.reshape(t0, t0, g0, g0, w).permute(0, 2, 1, 3, 4).reshape(1, t0 * g0, t0 * g0, w)
    pos = _interp(pos.permute(0, 3, 1, 2), (num_tiles * grid, num_tiles * grid)).permute(0, 2, 3, 1)[0]
    pos = pos.reshape(num_tiles, grid, num_tiles, grid, w).permute(0, 2, 1, 3, 4).reshape(num_tiles, num_tiles, grid * grid, w)
    cls = _interp(cls.permute(2, 3, 0, 1), (num_tiles, num_tiles)).permute(2, 3, 0, 1)
    return torch.cat([cls, pos], dim=2)


def resize_tile_embedding(embed: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """[T0, T0, 1, W] -> [T, T, 1, W] bilinearly over the tile grid."""
    return _interp(embed.permute(2, 3, 0, 1), (num_tiles, num_tiles)).permute(2, 3, 0, 1)


class VisionModel(nn.Module):
    """Encoder + projection of the concatenated features to the text width."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.vision_encoder = VisionEncoder(args)
        self.vision_projection = column_parallel_linear(args.vision_output_dim, args.dim, bias=True, gather_output=True)

    def block_modules(self) -> list[nn.Module]:
        """The ViT's local then global transformer layers, then the vision projection (run
        on the concatenated features): the pieces a wrapper may treat one at a time
        (training.parallelize: one FSDP unit each). Describes the structure only."""
        vit = self.vision_encoder
        return [*vit.transformer.resblocks, *vit.global_transformer.resblocks, self.vision_projection]

    def forward(self, images: torch.Tensor, aspect_ratios: torch.Tensor) -> torch.Tensor:
        """images [B, N, T, 3, S, S], aspect_ratios [B, N, 2] -> [B, N, T, P, D_text]."""
        if images.dtype == torch.uint8:  # a cast would feed raw 0..255 pixels to the ViT
            raise TypeError("uint8 tiles must be normalised first (Batch.normalized / llama_vision.data.tiling.normalize_tiles)")
        dtype = self.vision_projection.weight.dtype
        return self.vision_projection(self.vision_encoder(images.to(dtype), aspect_ratios))
