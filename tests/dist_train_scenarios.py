"""torchrun worker: several training runs in ONE launch (one process group), in order.

argv[1]: JSON list of runs, each
    {"config": yaml path, "overrides": ["key=value", ...],
     "resume": bool,                 # fit(resume=True)
     "stop_after": int | null,       # stop right after the checkpoint of this step is committed
     "hide_checkpoints_on_rank": int | null,   # this rank's CheckpointManager sees none
     "drop_first_batch_on_rank": int | null,   # this rank's loader skips its first batch
     "expect_error": str | null,     # the run must raise an error containing this text
     "dump": path | null}            # write <dump>.rank<R>.pt: trainable params + AdamW state by name,
                                     # per-parameter local/whole element counts, and (resumed runs)
                                     # the bytes this rank loaded vs the checkpoint's whole bytes
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama_vision.config import load_config  # noqa: E402
from llama_vision.training.train_config import TrainConfig  # noqa: E402
from llama_vision.training.trainer import Trainer  # noqa: E402


class Stop(Exception):
    """An interruption right after a committed checkpoint (a lost node, a preemption)."""


class DropFirstBatch:
    """A loader whose first batch is lost on this rank (a transient read error)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        it = iter(self.loader)
        next(it)
        yield from it

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _whole(t):
    """A DTensor (FSDP shard) gathered whole (collective: every rank dumps in the same
    order); plain tensors as they are."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def dump(trainer: Trainer, path: str, rank: int, loaded: dict | None = None) -> None:
    """Trainable params and AdamW state by name (FSDP shards gathered whole), and per
    parameter the elements this rank holds (`local_numel`) next to the whole count."""
    from model_parallel import local_tensor

    names = {id(p): n for n, p in trainer.model.named_parameters()}
    optim = trainer.optimizer.optim if hasattr(trainer.optimizer, "optim") else trainer.optimizer
    state = {names[id(p)]: {k: (_whole(v) if torch.is_tensor(v) else torch.tensor(v)) for k, v in sorted(s.items())}
             for p, s in sorted(optim.state.items(), key=lambda kv: names[id(kv[0])])}
    params = {n: _whole(p) for n, p in trainer.model.named_parameters() if p.requires_grad}
    numel = {n: (local_tensor(p).numel(), p.numel(), p.requires_grad) for n, p in trainer.model.named_parameters()}
    moments = [v for s in optim.state.values() for k, v in s.items() if k != "step"]
    optim_numel = (sum(local_tensor(v).numel() for v in moments), sum(v.numel() for v in moments))  # held, whole
    torch.save({"params": params, "optim": state, "step": trainer.step, "numel": numel, "optim_numel": optim_numel,
                "loaded": loaded or {}}, f"{path}.rank{rank}.pt")


def run(spec: dict, rank: int) -> None:
    cfg = load_config(TrainConfig, spec["config"], spec["overrides"])
    trainer = Trainer(cfg)
    if spec.get("hide_checkpoints_on_rank") == rank:
        trainer.ckpt.latest = lambda: None
    if spec.get("drop_first_batch_on_rank") == rank:
        trainer.loader = DropFirstBatch(trainer.loader)
    loaded = {}
    load_tensors = trainer.ckpt.load_tensors

    def measured_load(step_dir, tensors):  # what this rank asks DCP for: its own pieces
        from model_parallel import local_tensor

        loaded["local"] = sum(local_tensor(t).numel() * t.element_size() for t in tensors.values())
        loaded["whole"] = sum(t.numel() * t.element_size() for t in tensors.values())
        return load_tensors(step_dir, tensors)

    trainer.ckpt.load_tensors = measured_load
    stop_after = spec.get("stop_after")
    if stop_after is not None:
        save = trainer.ckpt.save

        def save_then_stop(step, state, *args, **kwargs):
            out = save(step, state, *args, **kwargs)
            if step == stop_after:
                raise Stop
            return out

        trainer.ckpt.save = save_then_stop
    try:
        trainer.fit(resume=spec.get("resume", False))
    except Stop:
        return
    except Exception as e:  # noqa: BLE001 - the expected failure is checked by the test
        if spec.get("expect_error") and spec["expect_error"] in str(e):
            Path(f"{spec['dump']}.rank{rank}.error").write_text(str(e))
            return
        raise
    if spec.get("expect_error"):
        raise AssertionError(f"run {spec['overrides']} should have failed with {spec['expect_error']!r}")
    if spec.get("dump"):
        dump(trainer, spec["dump"], rank, loaded)


if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    for spec in json.loads(sys.argv[1]):
        run(spec, rank)
