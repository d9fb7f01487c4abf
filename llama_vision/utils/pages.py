"""Handing the pages of a memory-mapped tensor back to the kernel once it has been copied.

A CPU model loaded by `llama_vision.checkpoint.load_model` keeps its weights in the
checkpoint's memory mapping. When a weight is re-laid out (see
`llama_vision.generation.use_streaming_layout`) the original's file pages, once read, stay
resident -- counted in the process's RSS -- for as long as the mapping lives, which is as
long as any other weight of the file does. `release_pages` asks the kernel to reclaim them
(`madvise(MADV_PAGEOUT)`): clean file pages are dropped and read back from the file if the
range is ever touched again; anonymous or modified pages are only written to swap, or left
where they are when there is none. The data is never changed, so a stale reference to the
original tensor stays correct. Linux >= 5.4; elsewhere (or on failure) a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import torch

MADV_PAGEOUT = 21  # linux/mman.h (5.4+)
_PAGE = mmap.PAGESIZE
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def release_pages(tensor: torch.Tensor) -> int:
    """Ask the kernel to reclaim the whole pages inside a contiguous CPU tensor's bytes
    (the partial pages at either end are left: they may hold a neighbour's data).
    Returns the number of bytes advised (0 when nothing was done)."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    lo = -(-start // _PAGE) * _PAGE
    hi = end // _PAGE * _PAGE
    if hi <= lo:
        return 0
    try:
        if _madvise()(lo, hi - lo, MADV_PAGEOUT) != 0:
            return 0
    except (OSError, AttributeError):
        return 0
    return hi - lo


def copy_releasing(dst: torch.Tensor, src: torch.Tensor, block_bytes: int = 16 << 20) -> torch.Tensor:
    """dst.copy_(src) in blocks of rows (dim 0), releasing each block of `src` once copied,
    so a memory-mapped source is never resident as a whole next to its copy. Returns dst."""
    if dst.shape != src.shape:
        raise ValueError(f"copy_releasing: shapes differ, dst {tuple(dst.shape)} vs src {tuple(src.shape)}")
    row_bytes = max(1, src[0].numel() * src.element_size()) if src.dim() and src.shape[0] else 1
    step = max(1, block_bytes // row_bytes)
    for r in range(0, src.shape[0], step):
        dst[r : r + step].copy_(src[r : r + step])
        release_pages(src[r : r + step])
    return dst
