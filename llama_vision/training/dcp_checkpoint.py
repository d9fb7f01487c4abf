"""Training checkpoints written with torch.distributed.checkpoint (DCP), committed atomically.

A checkpoint directory ``output_dir/checkpoints/step_N/`` holds

    .metadata, __<rank>_<i>.distcp   DCP: every rank's tensors, each a piece of its global
                                     tensor (see model_parallel.dcp.global_view), written by
                                     all ranks in parallel, each piece once
    train_state.json                 the small JSON state (progress, schedule, data position,
                                     layout), written by rank 0
    meta.json                        the commit marker of CheckpointManager (lists the two
                                     files above: a directory without them is not complete)

The directory protocol is CheckpointManager's: everything is written into ``step_N.tmp/``,
and rank 0 renames it to ``step_N`` only after every rank's write finished, so a save killed
at any moment is never picked by ``latest()``. With ``async_save`` the tensors are first
copied off the training state (DCP's staging), training goes on while a background thread
writes them, and the commit happens at the next save or at ``wait()``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

import model_parallel as mp
from llama_vision.utils.io import atomic_write_text

from .checkpointing import CheckpointManager

__all__ = ["DistributedCheckpointer", "STATE_FILE", "TENSORS_FILE", "read_tensors"]

TENSORS_FILE = ".metadata"  # DCP writes it last (rank 0), after every rank's data files
STATE_FILE = "train_state.json"


class DistributedCheckpointer:
    """Save / find / load DCP training checkpoints under a CheckpointManager's root.

    Args:
        manager: the directory protocol (rank, world size, barrier, keep_last).
        async_save: write in the background (`dcp.async_save`); commit deferred to the next
            save or `wait()`.
    """

    def __init__(self, manager: CheckpointManager, async_save: bool = False):
        self.manager = manager
        self.async_save = async_save
        self._pending: tuple[int, Path, Any, dict, dict | None] | None = None
        self._group = None

    def _process_group(self):
        """The background writer's own gloo group (created once, by every rank)."""
        if self._group is None:
            self._group = mp.checkpoint_process_group()
        return self._group

    # --- saving -----------------------------------------------------------------------
    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict, metadata: dict | None = None) -> None:
        """Write checkpoint `step` (collective over all ranks): `tensors` through DCP,
        `state` (JSON-serialisable, rank 0's) as train_state.json. Synchronous: returns
        once committed. Async: returns once the tensors are staged; committed later."""
        json.dumps(state), json.dumps(metadata)  # fail early, on every rank
        self.wait()
        m = self.manager
        staging = m.staging_dir(step)
        if m.rank == 0:  # leftovers of a killed attempt would mix with this one's files
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        m.barrier()
        if self.async_save:
            future = mp.save_tensors(tensors, str(staging), background=True, process_group=self._process_group())
            self._pending = (step, staging, future, state, metadata)
            return
        mp.save_tensors(tensors, str(staging))
        self._commit(step, staging, state, metadata)

    def wait(self) -> None:
        """Finish and commit a pending async save (collective; no-op when none)."""
        if self._pending is None:
            return
        step, staging, future, state, metadata = self._pending
        self._pending = None
        future.result()
        self._commit(step, staging, state, metadata)

    def _commit(self, step: int, staging: Path, state: dict, metadata: dict | None) -> None:
        m = self.manager
        m.barrier()  # every rank's data is on disk (DCP's own finish wrote .metadata on rank 0)
        if m.rank == 0:
            atomic_write_text(staging / STATE_FILE, json.dumps(state, indent=1) + "\n")
            m.commit(step, staging, m.step_dir(step), metadata, files=[TENSORS_FILE, STATE_FILE], drop_others=False)
        m.barrier()

    # --- finding / loading --------------------------------------------------------------
    def latest(self) -> Path | None:
        """The newest complete DCP checkpoint; a clear error when the newest complete one
        is of the older per-rank torch.save layout (it cannot be resumed by this version)."""
        found = self.manager.list_checkpoints()
        if not found:
            return None
        step, path = found[-1]
        if TENSORS_FILE not in CheckpointManager.read_meta(path).get("files", []):
            raise ValueError(
                f"{path} is a checkpoint of the older per-rank layout (rank_XXXXX.pt files), which this version "
                "cannot resume: resume it with the llama_vision version that wrote it, or start a new output_dir "
                "(init_from can point at that run's final/ Meta-format checkpoint)"
            )
        return path

    @staticmethod
    def checked(step_dir: str | Path) -> Path:
        """`step_dir` if it is a complete checkpoint of this layout, else a clear error."""
        path = Path(step_dir)
        if not CheckpointManager.is_complete(path):
            raise ValueError(f"resume_from: {path} is not a complete checkpoint (no meta.json, or files it lists are missing)")
        if TENSORS_FILE not in CheckpointManager.read_meta(path).get("files", []):
            raise ValueError(f"resume_from: {path} is a checkpoint of the older per-rank layout, which this version cannot resume")
        return path

    @staticmethod
    def read_state(step_dir: str | Path) -> dict:
        return json.loads((Path(step_dir) / STATE_FILE).read_text(encoding="utf-8"))

    @staticmethod
    def saved_keys(step_dir: str | Path) -> dict[str, tuple[int, ...]]:
        """Tensor key -> global shape of everything the checkpoint holds."""
        return mp.saved_tensor_shapes(str(step_dir))

    @staticmethod
    def load_tensors(step_dir: str | Path, tensors: dict[str, torch.Tensor]) -> None:
        """Fill `tensors` (views of this rank's state: DTensor pieces or whole tensors) in
        place from the checkpoint, reading only the saved pieces that overlap them
        (collective)."""
        mp.load_tensors(tensors, str(step_dir))


def read_tensors(step_dir: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every saved tensor whose key starts with `prefix`, WHOLE (the global tensor: TP and
    DP pieces put together), read in this one process -- for inspection, tests and
    converters; keys without the prefix."""
    return mp.read_whole_tensors(str(step_dir), prefix)
