"""Crash-safe file and directory writes.

Every writer here follows the same recipe: write to a temporary name in the *same directory*
as the target (so the final ``os.replace`` is a same-filesystem rename, which POSIX makes
atomic), ``fsync`` the data, rename it over the target, then ``fsync`` the parent directory so
the rename itself survives a power loss. A reader therefore sees either the complete old
content or the complete new content, never a torn file, whatever moment the writer is killed.
Temporary names start with ``.`` and contain ``.tmp-`` so they are easy to recognise (and are
cleaned up on any Python exception; only a SIGKILL can leave one behind).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import torch

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

PathLike = str | os.PathLike


class CheckpointFormatError(ValueError):
    """A file could not be loaded as a plain-tensor (``weights_only=True``) torch file."""


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entry table to disk (makes a preceding rename durable).

    Silently does nothing on platforms that cannot open directories (Windows).
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears at ``path`` only if the block succeeds.

    The data goes to a temporary file next to ``path``; on normal exit it is flushed, fsynced
    and renamed over ``path``. On an exception the temporary file is deleted and any existing
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text`` encoded as ``encoding``."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically.

    Keep ``obj`` to tensors, Python scalars/strings, lists, tuples and dicts so that
    :func:`load_torch` (``weights_only=True``) can read it back.
    """
    with atomic_open(path) as f:
        torch.save(obj, f)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a ``.safetensors`` file atomically.

    Tensors are moved to CPU and made contiguous first. As with ``safetensors`` itself, tensors
    sharing storage (tied weights) are rejected: save one name per storage.
    """
    from safetensors.torch import save

    flat = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=dict(metadata) if metadata is not None else None))


def load_torch(path: PathLike) -> Any:
    """Load a torch file with ``weights_only=True`` onto the CPU.

    ``weights_only`` refuses arbitrary pickled objects (no code execution from a checkpoint).
    Raises :class:`FileNotFoundError` or :class:`CheckpointFormatError`, both naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"torch file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointFormatError(
            f"{path} is not a plain-tensor torch file loadable with weights_only=True "
            f"(it must hold only tensors, Python scalars/strings, lists, tuples and dicts; "
            f"it may also be truncated or not a torch file at all): {e}"
        ) from e


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (files first, then their directories)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def replace_dir(src: PathLike, dst: PathLike) -> None:
    """Rename directory ``src`` to ``dst``, replacing an existing ``dst``.

    POSIX ``rename`` cannot replace a non-empty directory, so an existing ``dst`` is first
    renamed aside to ``.{name}.old-*``, then ``src`` is renamed into place, then the old copy is
    deleted. If the second rename fails the old directory is moved back. A SIGKILL between the
    two renames leaves no ``dst`` but a complete ``.{name}.old-*`` copy next to it — never a
    half-written ``dst``.
    """
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_path: PathLike) -> Iterator[Path]:
    """Build a directory that appears at ``final_path`` only once it is complete.

    Yields a fresh temporary directory next to ``final_path``; write into it. On normal exit
    everything in it is fsynced and it is renamed to ``final_path`` (replacing an existing
    directory via :func:`replace_dir`). On an exception the temporary directory is removed and
    an existing ``final_path`` is left as it was.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final_path.parent, prefix=f".{final_path.name}.tmp-"))
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
