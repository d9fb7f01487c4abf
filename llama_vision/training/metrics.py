"""Training metrics: JSONL log, TensorBoard scalars, a loss plot, throughput and MFU.

``metrics.jsonl`` holds one JSON object per :meth:`MetricsLogger.log` call::

    {"step": 10, "loss": 2.31, "lr": 0.0003, "wall_time": 1718000000.123}

JSON has no NaN/Infinity, so non-finite floats are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (strict-JSON valid, and unlike ``null`` they keep which value
it was); :func:`read_metrics` turns them back into floats. Each line is flushed as it is written,
so a killed run loses at most a partial last line, which readers skip.
"""

from __future__ import annotations

import io
import json
import math
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Iterable

import torch

from llama_vision.utils.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "PEAK_BF16_FLOPS",
    "MetricsLogger",
    "ThroughputMeter",
    "estimate_mfu",
    "global_batch_line",
    "peak_flops_for_device",
    "plot_metrics",
    "read_metrics",
]

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _to_json_value(value: Any) -> Any:
    """Python/torch/numpy scalar -> JSON-safe value (non-finite floats -> strings)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric tensors must have one element, got shape {tuple(value.shape)}")
        value = value.item()
    elif type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"metric values must be numbers, strings or None, got {type(value).__name__}")


def _from_json_value(value: Any) -> Any:
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def _parse_lines(text: str) -> list[dict[str, Any]]:
    """Parse JSONL text; skip blank lines and a torn line from a killed writer."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append({k: _from_json_value(v) for k, v in record.items()})
    return records


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in order (non-finite strings -> floats)."""
    return _parse_lines(Path(path).read_text(encoding="utf-8"))


class MetricsLogger:
    """Rank-0 metrics sink: ``metrics.jsonl`` + TensorBoard + ``loss.png`` on close.

    Args:
        output_dir: run directory (created if needed).
        rank: only rank 0 writes anything; on other ranks every method is a no-op.
        tensorboard: also write scalars to ``output_dir/tensorboard/``. If TensorBoard is not
            installed a warning is issued and only the JSONL is written.
        resume_step: the step training resumes from. Records with ``step > resume_step`` (logged
            after that checkpoint by the interrupted run) are dropped from ``metrics.jsonl``
            (atomic rewrite) and purged from TensorBoard, so each step appears once. ``None``
            means a fresh run: an existing ``metrics.jsonl`` is truncated.

    Usage::

        with MetricsLogger(out, rank=rank, resume_step=start_step) as log:
            log.log(step, loss=loss.item(), lr=sched.get_last_lr()[0])
    """

    def __init__(
        self, output_dir: str | Path, rank: int = 0, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self.png_path = self.output_dir / "loss.png"
        self._file = None
        self._tb = None
        if rank != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = self._open_tensorboard(resume_step)

    def _truncate(self, resume_step: int | None) -> None:
        """Keep only records with ``step <= resume_step`` (none for a fresh run)."""
        if not self.jsonl_path.exists():
            return
        records = [] if resume_step is None else read_metrics(self.jsonl_path)
        kept = [r for r in records if r.get("step", 0) <= resume_step]
        atomic_write_text(self.jsonl_path, "".join(json.dumps(_encode(r)) + "\n" for r in kept))

    def _open_tensorboard(self, resume_step: int | None) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an optional dependency of torch
            warnings.warn(f"TensorBoard unavailable ({e}); logging metrics to JSONL only", stacklevel=3)
            return None
        # purge_step drops events at steps >= purge_step that an interrupted run had written.
        # A fresh run (purge_step=0) hides everything an earlier run left in the directory.
        purge = 0 if resume_step is None else resume_step + 1
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, **metrics: Any) -> None:
        """Append ``{"step": step, **metrics, "wall_time": now}`` as one JSONL line.

        Values may be Python/numpy scalars, one-element tensors, strings or None. Numeric values
        also go to TensorBoard as scalars named by their key (use ``"train/loss"`` style keys
        to group them).
        """
        if self.rank != 0:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger is closed")
        record = {"step": int(step), **{k: _to_json_value(v) for k, v in metrics.items()}}
        record.setdefault("wall_time", round(time.time(), 3))
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                value = _from_json_value(_to_json_value(value))
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        """Flush and close the sinks and write ``loss.png`` (loss and val_loss, plus lr if logged)."""
        if self.rank != 0 or self._file is None:
            return
        self._file.close()
        self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        plot_metrics(self.jsonl_path, self.png_path, keys=("loss", "val_loss"))

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _encode(record: dict[str, Any]) -> dict[str, Any]:
    return {k: _to_json_value(v) for k, v in record.items()}


def plot_metrics(
    jsonl_path: str | Path, png_path: str | Path, keys: Iterable[str] = ("loss",), secondary: str | None = "lr"
) -> None:
    """Plot ``keys`` against step from a metrics JSONL into a PNG (written atomically).

    If ``secondary`` (default ``"lr"``) was logged and is not among ``keys``, it is drawn on a
    twin y axis. Records lacking a key or holding a non-finite value are skipped for that key.
    Uses the Agg renderer directly (no pyplot), so it is safe on headless machines and threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(jsonl_path) if Path(jsonl_path).exists() else []
    keys = tuple(keys)

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [
            (r["step"], float(r[key]))
            for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
        ]
        return [s for s, _ in points], [v for _, v in points]

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key in keys:
        steps, values = series(key)
        if steps:  # a key nothing logged (val_loss without validation) draws no line
            ax.plot(steps, values, label=key, linewidth=1.2, marker="o" if len(steps) < 30 and key != "loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel(", ".join(keys))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if secondary and secondary not in keys:
        steps, values = series(secondary)
        if steps:
            ax2 = ax.twinx()
            ax2.plot(steps, values, color="tab:orange", linestyle="--", linewidth=1.0, label=secondary)
            ax2.set_ylabel(secondary)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
    if not any(series(k)[0] for k in keys):
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    if handles:
        ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(png_path, buf.getvalue())


class ThroughputMeter:
    """Tokens/s, images/s, step time (and model FLOP/s, when steps report their FLOPs)
    averaged over the last ``window`` steps.

    The caller times each step (call ``torch.cuda.synchronize()`` first on GPU, else the time
    only covers kernel launches) and reports it::

        t0 = time.perf_counter(); train_step(); meter.update(n_tokens, n_images, time.perf_counter() - t0)
        logger.log(step, **meter.summary())
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._steps: deque[tuple[int, int, float, float]] = deque(maxlen=window)
        self._has_flops = False

    def update(self, tokens: int, images: int, seconds: float, flops: float | None = None) -> None:
        """Record one step that processed ``tokens`` and ``images`` in ``seconds`` (and did
        ``flops`` model FLOPs on this device, see ``llama_vision.training.flops``)."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self._has_flops = self._has_flops or flops is not None
        self._steps.append((int(tokens), int(images), float(seconds), float(flops or 0.0)))

    def _total(self, index: int) -> float:
        return sum(s[index] for s in self._steps)

    @property
    def step_time_s(self) -> float:
        """Mean step time over the window (0.0 before the first update)."""
        return self._total(2) / len(self._steps) if self._steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        seconds = self._total(2)
        return self._total(0) / seconds if seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        seconds = self._total(2)
        return self._total(1) / seconds if seconds > 0 else 0.0

    @property
    def flops_per_s(self) -> float:
        """Model FLOPs per second of this device over the window (MFU = this / peak)."""
        seconds = self._total(2)
        return self._total(3) / seconds if seconds > 0 else 0.0

    def summary(self) -> dict[str, float]:
        """``{"tokens_per_s", "images_per_s", "step_time_s"}`` (+ ``"flops_per_s"`` once a
        step reported its FLOPs) for :meth:`MetricsLogger.log`."""
        out = {"tokens_per_s": self.tokens_per_s, "images_per_s": self.images_per_s, "step_time_s": self.step_time_s}
        if self._has_flops:
            out["flops_per_s"] = self.flops_per_s
        return out


#: Dense bf16 tensor-core peak FLOP/s per GPU, matched by substring of the device name (first
#: match wins, so the more specific names come first).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops_for_device(device: torch.device | int | None = None) -> float | None:
    """bf16 peak FLOP/s of a CUDA device from :data:`PEAK_BF16_FLOPS`; ``None`` on CPU or unknown GPUs."""
    if not torch.cuda.is_available():
        return None
    if isinstance(device, torch.device) and device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, flops in PEAK_BF16_FLOPS.items():
        if pattern in name:
            return flops
    return None


def estimate_mfu(flops_per_step: float, step_time_s: float, peak_flops: float | None = None) -> float | None:
    """Model FLOPs utilisation: ``flops_per_step / step_time_s / peak_flops``.

    ``flops_per_step`` is the model FLOPs this GPU performs per optimizer step. For a dense
    transformer that is about ``2 * N * tokens`` for the forward pass, plus ``2 * N * tokens``
    for activation gradients and ``2 * N_trainable * tokens`` for weight gradients wherever
    backward runs (so ``6 * N * tokens`` when everything is trained). For the
    vision-language model use :func:`llama_vision.training.flops.step_flops` (a whole
    replica's work) and :func:`llama_vision.training.flops.mfu` (divides by the TP degree).
    ``peak_flops=None`` looks up the current CUDA device in :data:`PEAK_BF16_FLOPS`. Returns
    ``None`` when the peak is unknown (CPU, unlisted GPU) or the step time is not positive.
    """
    if peak_flops is None:
        peak_flops = peak_flops_for_device()
    if peak_flops is None or peak_flops <= 0 or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / peak_flops


def global_batch_line(cfg, world: int, tp: int, dp: int) -> str:
    """What one optimizer step of `cfg` (a TrainConfig) consumes on `world` ranks at TP
    `tp` (DP = world / tp): samples (pairs for DPO) and at most how many tokens."""
    data = cfg.data
    if getattr(data, "max_tokens_per_batch", 0):
        rows = "packed rows" if data.packing else "samples"
        return (
            f"global batch: micro-batches of <= {data.max_tokens_per_batch:,} padded tokens ({rows} x longest row) x "
            f"{cfg.grad_accum_steps} accumulation x {dp} data-parallel (world {world} / TP {tp}) = up to "
            f"{data.max_tokens_per_batch * cfg.grad_accum_steps * dp:,} tokens (max_seq_len {data.max_seq_len})"
        )
    samples = cfg.micro_batch_size * cfg.grad_accum_steps * dp
    unit = "preference pairs" if cfg.stage == "dpo" else ("packed rows" if getattr(data, "packing", False) else "samples")
    return (
        f"global batch: {cfg.micro_batch_size} micro-batch x {cfg.grad_accum_steps} accumulation x {dp} data-parallel "
        f"(world {world} / TP {tp}) = {samples:,} {unit}, up to {samples * cfg.data.max_seq_len:,} tokens "
        f"(max_seq_len {cfg.data.max_seq_len})"
    )
