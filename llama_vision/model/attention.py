"""Attention kernels behind one call: PyTorch SDPA (default, the only one on CPU),
xformers' memory-efficient attention, or flash-attn, chosen by `ModelArgs.attn_backend`.

All take q [B, Hq, S, D] and k, v [B, Hkv, T, D] at GQA width (Hq a multiple of Hkv) and
return [B, Hq, S, D]. `mask` is a boolean [B, 1|Hq, S, T] (True = may attend) or None.
"""
from __future__ import annotations

import importlib
import warnings

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
    # (memory-efficient) do not do GQA, so masked calls fold the query groups into the query
    # length instead of copying K/V to every query head (cross-attention K/V over 6404 media
    # tokens: ~1.9 GB of copies per row per decode step at 11B).
    if n_rep > 1 and (not _SDPA_GQA or (mask is not None and q.device.type != "cpu")):
        if mask is not None or not causal:
            return grouped_query_sdpa(q, k, v, mask)
        k, v, n_rep = _expand_kv(k, n_rep), _expand_kv(v, n_rep), 1  # causal without a mask (torch < 2.5)
    gqa = {"enable_gqa": True} if n_rep > 1 else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, **gqa)


def grouped_query_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """GQA attention without copying K/V: the n_rep query heads that share a K/V head are
    folded into the query length, q [B, Hkv * n_rep, S, D] -> [B, Hkv, n_rep * S, D] (query
    head h = g * n_rep + r reads K/V head g, as `repeat_interleave` pairs them), the mask
    repeated along S. Exactly the expanded computation: every (query, key) score is the
    same dot product. Not for `is_causal` (a folded row's index is not its position)."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    n_rep = hq // hkv
    folded = q.reshape(b, hkv, n_rep * s, d)  # (g, r, s) -> (g, r * s + s)
    if mask is not None:
        if mask.shape[1] == 1:  # one mask for every head: the same rows for each group member
            mask = mask.expand(b, 1, s, mask.shape[-1]).repeat(1, 1, n_rep, 1)
        else:  # a mask per query head [B, Hq, S, T]
            mask = mask.expand(b, hq, s, mask.shape[-1]).reshape(b, hkv, n_rep * s, mask.shape[-1])
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
    return out.reshape(b, hq, s, d)


def xformers_attention(q, k, v, mask=None, causal=False):
    xops = _import("xformers.ops", "xformers")
    n_rep = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    bias = None
    if mask is not None:
        # xformers wants the bias's last dimension 8-aligned in memory (T is 6404 for a 560 px
        # cross-attention, anything in ragged decode): allocate it padded, hand over a slice.
        t = k.shape[2]
        padded = torch.zeros(*mask.shape[:-1], -(-t // 8) * 8, dtype=q.dtype, device=q.device)
        bias = padded[..., :t].masked_fill_(~mask, float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], t)
    elif causal:
        bias = xops.LowerTriangularFromBottomRightMask() if q.shape[2] != k.shape[2] else xops.LowerTriangularMask()
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def flash_attention(q, k, v, mask=None, causal=False):
    if mask is not None:  # flash-attn takes no arbitrary mask: fall back, exactly.
        return sdpa(q, k, v, mask=mask, causal=causal)
    if q.dtype not in (torch.float16, torch.bfloat16):  # flash-attn refuses float32
        _warn_once("flash_attn", f"flash-attn needs fp16/bf16 tensors, got {q.dtype}: using SDPA for these calls")
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


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def _import(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"attention backend needs {pip_name}, which is not installed: pip install 'llama_vision[gpu]' "
            f"or set attn_backend='sdpa'"
        ) from e
