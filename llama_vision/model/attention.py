"""Attention kernels behind one call: PyTorch SDPA (default, the only one on CPU),
xformers' memory-efficient attention, or flash-attn, chosen by `ModelArgs.attn_backend`.

All take q [B, Hq, S, D] and k, v [B, Hkv, T, D] at GQA width (Hq a multiple of Hkv) and
return [B, Hq, S, D]. `mask` is a boolean [B, 1|Hq, S, T] (True = may attend) or None.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "xformers", "flash_attn")


def _expand_kv(k: torch.Tensor, n_rep: int) -> torch.Tensor:
    return k if n_rep == 1 else k.repeat_interleave(n_rep, dim=1)


# SDPA broadcasts K/V heads itself from torch 2.5 (`enable_gqa`); setup.py allows 2.4.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa(q, k, v, mask=None, causal=False):
    n_rep = q.shape[1] // k.shape[1]
    # CPU: the fused kernel reads the shared K/V heads in place (with or without a mask),
    # bit-identical to expanding them and 2-3x faster for a decode step, which otherwise
    # copies the whole cache n_rep times per layer. CUDA: the kernels that take a mask
    # (memory-efficient) do not do GQA, so masked calls expand to keep off the math path.
    if n_rep > 1 and (not _SDPA_GQA or (mask is not None and q.device.type != "cpu")):
        k, v, n_rep = _expand_kv(k, n_rep), _expand_kv(v, n_rep), 1
    gqa = {"enable_gqa": True} if n_rep > 1 else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, **gqa)


def xformers_attention(q, k, v, mask=None, causal=False):
    xops = _import("xformers.ops", "xformers")
    n_rep = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    elif causal:
        bias = xops.LowerTriangularFromBottomRightMask() if q.shape[2] != k.shape[2] else xops.LowerTriangularMask()
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def flash_attention(q, k, v, mask=None, causal=False):
    if mask is not None:  # flash-attn takes no arbitrary mask: fall back, exactly.
        return sdpa(q, k, v, mask=mask, causal=causal)
    fa = _import("flash_attn", "flash-attn")
    # flash-attn handles GQA natively and aligns the causal mask bottom-right (decode with cache).
    out = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


_IMPLS = {"sdpa": sdpa, "xformers": xformers_attention, "flash_attn": flash_attention}


def attention(q, k, v, mask=None, causal=False, backend: str = "sdpa"):
    """Dispatch to `backend`; GPU-only kernels fall back to SDPA for CPU tensors."""
    if backend not in _IMPLS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "sdpa" and q.device.type == "cpu":
        backend = "sdpa"
    return _IMPLS[backend](q, k, v, mask=mask, causal=causal)


def check_backend(backend: str) -> None:
    """Fail early, with the install hint, when a selected backend is not installed."""
    if backend not in _IMPLS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "xformers":
        _import("xformers.ops", "xformers")
    elif backend == "flash_attn":
        _import("flash_attn", "flash-attn")


def _import(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"attention backend needs {pip_name}, which is not installed: pip install 'llama_vision[gpu]' "
            f"or set attn_backend='sdpa'"
        ) from e
