"""Model-agnostic training infrastructure: checkpoints, LR schedule, optimizer, metrics.

The training loop composes these pieces::

    opt = build_adamw(model.named_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = build_lr_scheduler(opt, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    ckpt = CheckpointManager(out, keep_last=3, rank=rank, world_size=world, barrier=dist.barrier)
    log = MetricsLogger(out, rank=rank, resume_step=start_step)
    ...
    ckpt.save(step, {"model": ..., "optim": opt.state_dict(), "sched": sched.state_dict(),
                     "rng": capture_rng_state(), "step": step})
"""

from llama_vision.training.checkpointing import CheckpointManager, capture_rng_state, restore_rng_state
from llama_vision.training.metrics import (
    MetricsLogger,
    ThroughputMeter,
    estimate_mfu,
    peak_flops_for_device,
    plot_metrics,
    read_metrics,
)
from llama_vision.training.optim import build_adamw, clip_grad_norm_, count_parameters, split_decay_params
from llama_vision.training.schedule import build_lr_scheduler, warmup_cosine

__all__ = [
    "CheckpointManager",
    "MetricsLogger",
    "ThroughputMeter",
    "build_adamw",
    "build_lr_scheduler",
    "capture_rng_state",
    "clip_grad_norm_",
    "count_parameters",
    "estimate_mfu",
    "peak_flops_for_device",
    "plot_metrics",
    "read_metrics",
    "restore_rng_state",
    "split_decay_params",
    "warmup_cosine",
]
