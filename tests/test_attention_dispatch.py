"""Attention backends: SDPA against reference math; xformers / flash-attn dispatch with
stand-in modules (the real kernels are GPU-only; the layouts and GQA handling are ours)."""
from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from llama_vision.model import attention as A


def _reference(q, k, v, mask=None, causal=False):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        s, t = scores.shape[-2:]
        mask = torch.ones(s, t, dtype=torch.bool).tril(t - s)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def _qkv(s=5, t=7):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, s, 8, generator=g), torch.randn(2, 2, t, 8, generator=g), torch.randn(2, 2, t, 8, generator=g))


def test_sdpa_matches_reference_with_gqa_and_mask():
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(A.attention(q, k, v, mask=mask), _reference(q, k, v, mask), atol=1e-5, rtol=0)
    q, k, v = _qkv(6, 6)
    torch.testing.assert_close(A.attention(q, k, v, causal=True), _reference(q, k, v, causal=True), atol=1e-5, rtol=0)


def test_unknown_backend_and_missing_packages_are_clear(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        A.attention(q, k, v, backend="fast")
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(ImportError, match="needs xformers"):
        A.check_backend("xformers")


def test_xformers_path_layout_and_mask(monkeypatch):
    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None):  # [B, S, H, D] layout
        calls.append(q.shape)
        if attn_bias is not None:  # xformers' alignment rule: rows of the bias 8-aligned
            assert attn_bias.stride(-2) % 8 == 0, attn_bias.stride()
        scores = torch.einsum("bshd,bthd->bhst", q, k) / q.shape[-1] ** 0.5
        if attn_bias is not None:
            scores = scores + attn_bias
        return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)

    fake = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[:, :, :, 5:] = False
    out = A.xformers_attention(q, k, v, mask=mask)
    assert calls == [torch.Size([2, 5, 4, 8])]
    torch.testing.assert_close(out, _reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_flash_attn_path_and_mask_fallback(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, causal=False):  # [B, S, H, D], GQA native; fp16/bf16 only
        assert q.dtype in (torch.float16, torch.bfloat16), "flash-attn refuses float32"
        calls.append(q.dtype)
        out = _reference(q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), causal=causal)
        return out.transpose(1, 2).to(q.dtype)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    q, k, v = _qkv(6, 6)
    half = [t.bfloat16() for t in (q, k, v)]
    torch.testing.assert_close(A.flash_attention(*half, causal=True).float(), _reference(q, k, v, causal=True), atol=3e-2, rtol=0)
    assert calls == [torch.bfloat16]
    # float32: SDPA instead (one warning), exactly as SDPA computes it
    monkeypatch.setattr(A, "_WARNED", set())
    with pytest.warns(UserWarning, match="flash-attn needs fp16/bf16"):
        torch.testing.assert_close(A.flash_attention(q, k, v, causal=True), _reference(q, k, v, causal=True), atol=1e-5, rtol=0)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        A.flash_attention(q, k, v, causal=True)
    assert not again and calls == [torch.bfloat16]  # warned once; the fake kernel never saw float32
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(A.flash_attention(q, k, v, mask=mask), _reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_grouped_query_sdpa_folds_query_groups_exactly():
    """GQA without copying K/V (the CUDA masked path): every mask layout equals the
    expanded reference."""
    q, k, v = _qkv(5, 7)
    g = torch.Generator().manual_seed(2)
    shared = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    per_head = torch.rand(2, 4, 5, 7, generator=g) > 0.3
    for mask in (shared, per_head):
        mask[..., 0] = True
        torch.testing.assert_close(A.grouped_query_sdpa(q, k, v, mask), _reference(q, k, v, mask), atol=1e-6, rtol=0)
    torch.testing.assert_close(A.grouped_query_sdpa(q, k, v), _reference(q, k, v), atol=1e-6, rtol=0)
    # Query head h reads K/V head h // n_rep: a per-head mask that hides everything but one
    # key for head 1 (group 0) gives exactly that key's value there.
    only = torch.zeros(2, 4, 5, 7, dtype=torch.bool)
    only[:, :, :, 3] = True
    out = A.grouped_query_sdpa(q, k, v, only)
    torch.testing.assert_close(out[:, 1], v[:, 0, 3:4].expand(2, 5, 8), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 3], v[:, 1, 3:4].expand(2, 5, 8), atol=1e-6, rtol=0)


def test_gpu_backends_fall_back_to_sdpa_on_cpu_tensors():
    q, k, v = _qkv()
    torch.testing.assert_close(A.attention(q, k, v, backend="flash_attn"), _reference(q, k, v), atol=1e-5, rtol=0)
