"""Profiling a few training steps, and peak memory per process.

`StepProfiler(output_dir, steps, rank)` wraps `torch.profiler.profile`: the first step
it sees is the profiler's warm-up (traced and discarded: the profiler's own start-up cost
lands there), the next `steps` steps are recorded. Call `step()` once after every
optimizer step and `close()` at the end (or use it as a context manager). When the
recording ends (or at `close()` if the run stops earlier) it writes

* ``output_dir/profile/rank_{rank}.json``: a Chrome trace (chrome://tracing, Perfetto),
* ``output_dir/profile/rank_{rank}.txt``: the top ops by self time (CUDA time on a GPU,
  CPU time otherwise),

each written to a temporary name and renamed into place, so a reader never sees half a
file. ``steps == 0`` makes every method a no-op (no profiler is created).

`peak_memory_bytes(device)`: the process's peak memory since the last
`reset_peak_memory(device)`: on CUDA the caching allocator's peak of allocated tensor
bytes (`torch.cuda.max_memory_allocated`), on the CPU the peak resident set size
(Linux: VmHWM of /proc/self/status, which the reset restarts; elsewhere `getrusage`'s
ru_maxrss, bytes on macOS).
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

from llama_vision.utils.io import atomic_write_text

__all__ = ["StepProfiler", "peak_memory_bytes", "reset_peak_memory"]


class StepProfiler:
    """Record `steps` training steps after one warm-up step (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike, steps: int, rank: int = 0, *, row_limit: int = 30):
        if steps < 0:
            raise ValueError(f"profile steps must be >= 0, got {steps}")
        self.steps = steps
        self.rank = rank
        self.row_limit = row_limit
        self.dir = Path(output_dir) / "profile"
        self.trace_path = self.dir / f"rank_{rank}.json"
        self.summary_path = self.dir / f"rank_{rank}.txt"
        self.written = False
        self._prof = None
        if steps == 0:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._cuda = torch.cuda.is_available()
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
            profile_memory=True,
        )
        self._prof.start()

    @property
    def enabled(self) -> bool:
        return self._prof is not None

    def step(self) -> None:
        """Mark the end of one optimizer step."""
        if self._prof is not None:
            self._prof.step()

    def close(self) -> None:
        """Stop profiling; writes what was recorded if the recording had not finished."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, prof) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.trace_path.with_name(f".{self.trace_path.name}.tmp-{os.getpid()}")
        try:
            prof.export_chrome_trace(str(tmp))
            os.replace(tmp, self.trace_path)
        finally:
            tmp.unlink(missing_ok=True)
        sort = "self_cuda_time_total" if self._cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=self.row_limit)
        head = f"rank {self.rank}: {self.steps} step(s) recorded after 1 warm-up step; top ops by {sort}\n\n"
        atomic_write_text(self.summary_path, head + table + "\n")
        self.written = True


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory of this process on `device` since the last `reset_peak_memory` (CUDA:
    allocated tensor bytes; CPU: resident set size)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "cpu":
        # Linux: the high-water mark of this process's memory map, which clear_refs resets.
        # (getrusage's ru_maxrss also keeps the peak a thread saw when it exited, so a
        # thread ending after a reset would bring an older peak back.)
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024  # kB
        except OSError:
            pass
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB
    raise ValueError(f"peak memory is known for cuda and cpu devices, not {device.type!r}")


def reset_peak_memory(device: torch.device | str) -> bool:
    """Restart the peak `peak_memory_bytes` reports; False where the platform cannot (the
    CPU peak resets only on Linux, through /proc/self/clear_refs)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if device.type == "cpu":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
        except OSError:
            return False
        return True
    raise ValueError(f"peak memory is known for cuda and cpu devices, not {device.type!r}")
