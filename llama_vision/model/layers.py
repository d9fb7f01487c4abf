"""Small building blocks shared by the text and vision towers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_parallel import column_parallel_linear, kv_parallel_linear, row_parallel_linear, tp_size


class RMSNorm(nn.Module):
    """Root-mean-square norm. Computed in float32 and cast back, as Meta's reference does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """Llama SwiGLU: w2(silu(w1 x) * w3 x). w1/w3 column-parallel, w2 row-parallel."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = column_parallel_linear(dim, hidden_dim)
        self.w3 = column_parallel_linear(dim, hidden_dim)
        self.w2 = row_parallel_linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GQAProjections(nn.Module):
    """wq/wk/wv/wo of grouped-query attention, sharded by heads across TP ranks (K/V
    replicated when TP > n_kv_heads). Shared by self- and cross-attention."""

    def __init__(self, args):
        super().__init__()
        world = tp_size()
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // world
        self.n_local_kv_heads = max(1, args.n_kv_heads // world)
        self.backend = args.attn_backend
        self.wq = column_parallel_linear(args.dim, args.n_heads * self.head_dim)
        self.wk = kv_parallel_linear(args.dim, args.n_kv_heads, self.head_dim)
        self.wv = kv_parallel_linear(args.dim, args.n_kv_heads, self.head_dim)
        self.wo = row_parallel_linear(args.n_heads * self.head_dim, args.dim)
