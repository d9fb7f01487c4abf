"""Rotary position embeddings as in Meta's Llama 3.1 reference.

Meta rotates ADJACENT pairs (2i, 2i+1) of each head (complex multiplication); HF stores
q/k weights permuted so its rotate-half form computes the same thing (the HF converter
undoes that permutation).
"""
from __future__ import annotations

import math

import torch


def scale_frequencies(freqs: torch.Tensor, scale_factor: float, low_freq_factor: float, high_freq_factor: float, old_context_len: int) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `scale_factor`, short ones
    kept, a smooth ramp in between."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype, device="cpu")


def precompute_freqs_cis(head_dim: int, end: int, theta: float, use_scaled: bool, **scaling) -> torch.Tensor:
    """Complex rotations [end, head_dim // 2] (float32 real/imag)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    if use_scaled:
        freqs = scale_frequencies(freqs, **scaling)
    t = torch.arange(end, dtype=torch.float32, device="cpu")
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] by freqs_cis [B, S, D/2] (per-row positions), in float32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs_cis[:, :, None, :]).flatten(3)
    return out.type_as(x)
