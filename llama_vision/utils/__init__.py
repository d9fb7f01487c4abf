"""Small model-agnostic utilities (crash-safe I/O)."""

from llama_vision.utils.io import (
    CheckpointFormatError,
    atomic_dir,
    atomic_open,
    atomic_save_safetensors,
    atomic_save_torch,
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    load_torch,
    replace_dir,
)

__all__ = [
    "CheckpointFormatError",
    "atomic_dir",
    "atomic_open",
    "atomic_save_safetensors",
    "atomic_save_torch",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "fsync_tree",
    "load_torch",
    "replace_dir",
]
