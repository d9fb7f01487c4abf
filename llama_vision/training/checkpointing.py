"""Crash-safe, multi-rank checkpoint directories and RNG-state capture.

The trainer's checkpoints are distributed checkpoints (dcp_checkpoint.py) committed through
this directory protocol (`staging_dir` / `commit`: meta.json lists the files a complete
checkpoint has); `save()` below is the protocol's own per-rank torch.save layout.

Layout under ``output_dir``::

    checkpoints/
      step_1000/           <- complete: renamed into place by rank 0 after every rank wrote
        rank_00000.pt      <- one file per rank: whatever dict that rank passed to save()
        rank_00001.pt
        meta.json          <- {"step", "world_size", "time", "time_iso", "files", "metadata"}
      step_1500.tmp/       <- a save in progress (or killed): never considered by latest()

Atomicity protocol (why a SIGKILL at any moment is safe). We use *both* a staging directory
and a meta-last marker:

1. Every rank writes its ``rank_XXXXX.pt`` into the shared staging dir ``step_N.tmp/`` (each
   file itself written atomically: temp file + fsync + rename).
2. ``barrier()``: after it, all rank files are on disk.
3. Rank 0 checks that every rank file exists, writes ``meta.json`` (atomically), fsyncs the tree
   and renames ``step_N.tmp`` -> ``step_N``. The rename is the commit point: before it
   ``latest()`` cannot see the step (it only looks at ``step_<int>`` names), after it the
   directory is complete.
4. ``barrier()`` again, so ``save()`` returns on every rank only once the checkpoint is
   committed (a rank may call ``latest()`` right after).

``latest()`` additionally requires ``meta.json`` plus all ``world_size`` rank files, so even a
directory produced some other way (a partial copy, a filesystem without atomic renames) is not
picked unless complete. Pruning renames a doomed checkpoint to a hidden ``.trash-*`` name before
deleting it, so a kill mid-delete cannot leave a half-deleted ``step_K`` that looks complete.

All ranks must see the same ``output_dir`` (a shared filesystem, or one node).
"""

from __future__ import annotations

import collections
import json
import random
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from llama_vision.utils.io import (
    atomic_save_torch,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    load_torch,
    replace_dir,
)

__all__ = ["CheckpointManager", "capture_rng_state", "restore_rng_state"]

_STEP_RE = re.compile(r"^step_(\d+)$")
META_FILE = "meta.json"


def rank_file_name(rank: int) -> str:
    """File name of ``rank``'s shard inside a step directory."""
    return f"rank_{rank:05d}.pt"


class CheckpointManager:
    """Save, find, load and prune checkpoints under ``output_dir/checkpoints``.

    Args:
        output_dir: run directory; checkpoints go to ``output_dir/checkpoints/step_{step}/``.
        keep_last: number of most recent complete checkpoints to keep (``None`` keeps all).
        rank, world_size: this process's rank and the number of ranks that save together.
        barrier: called by every rank to synchronise (pass ``torch.distributed.barrier``). When
            ``world_size > 1`` and no barrier is given, ``torch.distributed.barrier`` is used if a
            process group is initialised.

    Every rank calls :meth:`save` with its own state dict (model shard, optimizer shard, RNG,
    ...). State must be tensors, Python scalars/strings/None, and lists/tuples/dicts of those,
    so it loads with ``torch.load(weights_only=True)``; use :func:`capture_rng_state` for RNG.
    """

    def __init__(
        self,
        output_dir: str | Path,
        keep_last: int | None = 3,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier

    # ------------------------------------------------------------------ saving

    def barrier(self) -> None:
        """Synchronise all ranks (no-op for a single rank)."""
        if self.world_size == 1:
            return
        if self._barrier is not None:
            self._barrier()
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            return
        raise RuntimeError(
            "CheckpointManager with world_size > 1 needs a barrier: pass barrier=torch.distributed.barrier "
            "or initialise torch.distributed"
        )

    def step_dir(self, step: int) -> Path:
        """Final directory of checkpoint ``step`` (it may not exist)."""
        return self.root / f"step_{step}"

    def save(self, step: int, state: dict[str, Any], metadata: dict[str, Any] | None = None) -> Path:
        """Save this rank's ``state`` as part of checkpoint ``step``; collective over all ranks.

        ``metadata`` (JSON-serialisable, rank 0's is used) is stored in ``meta.json``.
        Returns the committed step directory. Every rank must call this with the same ``step``;
        if rank 0 fails to commit, the other ranks wait in the final barrier until its timeout.
        """
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        json.dumps(metadata)  # fail early (on every rank) rather than after all shards are written
        state = _prepare_state(state, "state")
        staging = self.staging_dir(step)
        staging.mkdir(parents=True, exist_ok=True)
        atomic_save_torch(state, staging / rank_file_name(self.rank))

        self.barrier()
        final = self.step_dir(step)
        if self.rank == 0:
            self.commit(step, staging, final, metadata, files=[rank_file_name(r) for r in range(self.world_size)])
        self.barrier()
        return final

    def staging_dir(self, step: int) -> Path:
        """Where checkpoint ``step`` is written before its commit (never seen by latest())."""
        return self.root / f"step_{step}.tmp"

    def commit(
        self, step: int, staging: Path, final: Path, metadata: dict[str, Any] | None, files: list[str], *, drop_others: bool = True
    ) -> None:
        """Rank 0, after every rank wrote its part into ``staging``: verify that ``files``
        are there, write meta.json (listing them: what ``is_complete`` checks), rename the
        directory into place (the commit point), prune. ``drop_others``: delete every other
        entry of the staging dir first (the name is reused across attempts: leftovers of a
        killed earlier save -- a stale meta.json, shards of a larger world, temp files)."""
        missing = sorted(name for name in files if not (staging / name).is_file())
        if missing:
            raise RuntimeError(
                f"checkpoint step {step}: files {missing} missing in {staging} after the barrier "
                "(did every rank call save()? is the directory on a shared filesystem?)"
            )
        for entry in staging.iterdir() if drop_others else ():
            if entry.name in files:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        now = time.time()
        meta = {
            "step": step,
            "world_size": self.world_size,
            "time": now,
            "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
            "files": sorted(files),
            "metadata": metadata or {},
        }
        atomic_write_text(staging / META_FILE, json.dumps(meta, indent=2) + "\n")
        fsync_tree(staging)
        replace_dir(staging, final)
        self._prune(keep=final)
        self._remove_stale_staging()

    def _prune(self, keep: Path) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints (never ``keep`` itself)."""
        if self.keep_last is None:
            return
        complete = self.list_checkpoints()
        doomed = [path for _, path in complete[: max(0, len(complete) - self.keep_last)] if path != keep]
        for path in doomed:
            _delete_dir(path)

    def _remove_stale_staging(self) -> None:
        """Remove staging dirs of killed saves and interrupted deletions.

        Only rank 0 calls this, between the two barriers of a save, when no rank is writing.
        """
        for entry in self.root.iterdir():
            if entry.is_dir() and (
                (entry.name.startswith("step_") and entry.name.endswith(".tmp")) or entry.name.startswith(".trash-")
            ):
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------ finding / loading

    @staticmethod
    def read_meta(step_dir: str | Path) -> dict[str, Any]:
        """Parsed ``meta.json`` of a checkpoint directory."""
        path = Path(step_dir) / META_FILE
        return json.loads(path.read_text(encoding="utf-8"))

    @classmethod
    def is_complete(cls, step_dir: str | Path) -> bool:
        """True if ``step_dir`` has a valid ``meta.json`` and every file it promises (its
        ``files``; a meta.json without that list promises every rank file of its world)."""
        step_dir = Path(step_dir)
        try:
            meta = cls.read_meta(step_dir)
            files = meta.get("files") or [rank_file_name(r) for r in range(int(meta["world_size"]))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all(isinstance(f, str) and (step_dir / f).is_file() for f in files)

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as ``(step, path)``, oldest step first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _STEP_RE.match(entry.name)
            if match and entry.is_dir() and self.is_complete(entry):
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest(self) -> Path | None:
        """Directory of the highest-step complete checkpoint, or ``None`` if there is none."""
        found = self.list_checkpoints()
        return found[-1][1] if found else None

    def load(self, step_dir: str | Path | None = None, rank: int | None = None) -> dict[str, Any]:
        """Load ``rank``'s state (default: this manager's rank) from ``step_dir`` (default: latest).

        Tensors are loaded onto the CPU with ``weights_only=True``. Raises ``FileNotFoundError``
        if there is no (complete) checkpoint and ``ValueError`` if it was written by a different
        world size (re-sharding is not supported).
        """
        if step_dir is None:
            step_dir = self.latest()
            if step_dir is None:
                raise FileNotFoundError(f"no complete checkpoint under {self.root}")
        step_dir = Path(step_dir)
        if not self.is_complete(step_dir):
            raise FileNotFoundError(f"{step_dir} is not a complete checkpoint (missing meta.json or rank files)")
        saved_world = int(self.read_meta(step_dir)["world_size"])
        if saved_world != self.world_size:
            raise ValueError(
                f"checkpoint {step_dir} was saved by {saved_world} ranks but this run has {self.world_size}; "
                "re-sharding is not supported"
            )
        rank = self.rank if rank is None else rank
        return load_torch(step_dir / rank_file_name(rank))


def _delete_dir(path: Path) -> None:
    """Delete a checkpoint dir so that no partially deleted ``step_K`` is ever visible."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    path.rename(trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


_PLAIN_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _prepare_state(obj: Any, where: str) -> Any:
    """Validate that ``obj`` loads with ``weights_only=True``; detach and compact tensors.

    Tensors are detached (no autograd graph or ``Parameter`` wrapper) and views are cloned,
    because ``torch.save`` writes a view's *whole* underlying storage.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout == torch.strided and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            t = t.clone()
        return t
    if type(obj) in _PLAIN_LEAVES:
        return obj
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:
        return obj.item()  # numpy scalar (e.g. np.float64 from a metric) -> Python scalar
    if type(obj) in (dict, collections.OrderedDict):
        items = {k: _prepare_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return items if type(obj) is dict else collections.OrderedDict(items)
    if type(obj) in (list, tuple):
        return type(obj)(_prepare_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    hint = " (convert numpy arrays with torch.from_numpy)" if type(obj).__module__.startswith("numpy") else ""
    raise TypeError(
        f"{where} has type {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) "
        f"cannot load; use tensors, Python scalars/strings and lists/dicts{hint}"
    )


# ---------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, torch.Tensor]:
    """Snapshot every RNG that training uses, as tensors (so it saves with ``weights_only``).

    Keys: ``python`` (int64: version, 625 Mersenne-Twister words), ``python_gauss`` (float64,
    empty or the cached Gaussian), ``numpy_keys``/``numpy_meta``/``numpy_gauss`` (numpy's legacy
    global MT19937, if numpy is installed), ``torch_cpu`` (uint8), and ``torch_cuda`` (uint8,
    one row per visible device, only if CUDA is available).
    """
    version, words, gauss = random.getstate()
    state = {
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        if kind != "MT19937":
            raise RuntimeError(f"unsupported numpy RNG kind {kind}")
        state["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
        state["numpy_meta"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
        state["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore RNGs from :func:`capture_rng_state` output; keys that are absent are skipped."""
    if "python" in state:
        values = state["python"].tolist()
        gauss = state.get("python_gauss")
        gauss_next = float(gauss[0]) if gauss is not None and gauss.numel() else None
        random.setstate((values[0], tuple(values[1:]), gauss_next))
    if "numpy_keys" in state:
        import numpy as np

        pos, has_gauss = state["numpy_meta"].tolist()
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        saved = list(state["torch_cuda"].to(torch.uint8))
        n = torch.cuda.device_count()
        if len(saved) != n:
            warnings.warn(
                f"RNG state has {len(saved)} CUDA devices, this process sees {n}; "
                f"restoring the first {min(n, len(saved))}",
                stacklevel=2,
            )
        for device, s in enumerate(saved[:n]):
            torch.cuda.set_rng_state(s, device)
