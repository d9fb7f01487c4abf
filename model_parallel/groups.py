"""Process groups: tensor-parallel (fairscale "model parallel") x data-parallel.

Ranks are laid out like fairscale: consecutive ranks form one tensor-parallel group (keep
them on one node, NVLink), ranks with the same TP rank form a data-parallel group.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


class _DataParallelOnly:
    """The groups of a TP=1 job without fairscale (fairscale's `initialize` functions, as
    this module calls them): the data-parallel group is the whole world. fairscale is only
    imported where TP > 1 needs its layers and groups (a GPU machine may lack it)."""

    def __init__(self):
        self.initialized = False

    def model_parallel_is_initialized(self) -> bool:
        return self.initialized

    def initialize_model_parallel(self, tp: int) -> None:
        assert tp == 1
        self.initialized = True

    def destroy_model_parallel(self) -> None:
        self.initialized = False

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_group(self):
        return None  # nothing is reduced over a TP group of one

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size()

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank()

    def get_data_parallel_group(self):
        return dist.group.WORLD


# fairscale's `initialize` module while TP > 1 groups exist, the TP=1 stand-in otherwise.
fs_init = _DataParallelOnly()


def _fairscale_initialize():
    try:
        from fairscale.nn.model_parallel import initialize
    except ImportError as e:
        raise ImportError("tensor parallelism (tp > 1) needs fairscale: pip install fairscale") from e
    return initialize


def init_model_parallel(tp: int = 1, backend: str | None = None, timeout_s: int = 1800, device: torch.device | str | None = None) -> None:
    """Initialise torch.distributed (from torchrun's env vars) and the TP x DP groups.

    Args:
        tp: tensor-parallel degree; the world size must be a multiple of it.
        backend: "nccl" on GPU, "gloo" on CPU (default: from `device`, else from CUDA
            availability).
        device: this process's device (default: cuda:LOCAL_RANK when CUDA is available);
            a CUDA device is made current BEFORE the process group exists (and given to it
            as `device_id`), so NCCL's communicators bind to it and not to GPU 0.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # single process: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        device = process_device(device)
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"tensor-parallel degree {tp} must divide the world size {world}")
    global fs_init
    if fs_init.model_parallel_is_initialized():
        if fs_init.get_model_parallel_world_size() != tp:
            raise RuntimeError(
                f"model parallel already initialised with TP={fs_init.get_model_parallel_world_size()}, asked for {tp}"
            )
        return
    fs_init = _fairscale_initialize() if tp > 1 else _DataParallelOnly()
    fs_init.initialize_model_parallel(tp)


def process_device(device: torch.device | str | None = None) -> torch.device:
    """This process's device: `device` ("cpu", "cuda" = cuda:LOCAL_RANK, "cuda:N"), or by
    default cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def destroy_model_parallel() -> None:
    """Tear down the fairscale groups and the default process group (tests, notebooks)."""
    global fs_init
    _MESHES.clear()
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    fs_init = _DataParallelOnly()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_model_parallel() -> bool:
    """True when the TP x DP groups exist (also at TP=1 inside a data-parallel job)."""
    return dist.is_available() and dist.is_initialized() and fs_init.model_parallel_is_initialized()


def tp_size() -> int:
    return fs_init.get_model_parallel_world_size() if is_model_parallel() else 1


def tp_rank() -> int:
    return fs_init.get_model_parallel_rank() if is_model_parallel() else 0


def tp_group():
    return fs_init.get_model_parallel_group() if is_model_parallel() else None


def dp_size() -> int:
    return fs_init.get_data_parallel_world_size() if is_model_parallel() else 1


def dp_rank() -> int:
    return fs_init.get_data_parallel_rank() if is_model_parallel() else 0


def dp_group():
    return fs_init.get_data_parallel_group() if is_model_parallel() else None


_MESHES: dict[str, object] = {}


def device_mesh(order: str = "dp,tp"):
    """The 2-D DeviceMesh of the job over fairscale's layout (global rank = dp_rank * tp +
    tp_rank), dimensions named "dp" and "tp", built once per order (creating one is a
    collective: every rank calls it in the same order).

    order "dp,tp" (FSDP's: `device_mesh()["dp"]` is this rank's DP group) or "tp,dp"
    (the same ranks with the TP dimension first: a DTensor on it with placements
    (Shard(d) over tp, Shard(0) over dp) describes an FSDP shard of a fairscale TP shard
    exactly -- the TP split is the outer one -- which is what distributed checkpoints
    need to place every rank's piece in the full tensor)."""
    if order not in ("dp,tp", "tp,dp"):
        raise ValueError(f"order must be 'dp,tp' or 'tp,dp', got {order!r}")
    if order not in _MESHES:
        from torch.distributed.device_mesh import DeviceMesh

        if not is_model_parallel():
            raise RuntimeError("device_mesh() needs init_model_parallel() first")
        ranks = torch.arange(dist.get_world_size()).view(dp_size(), tp_size())
        if order == "tp,dp":
            ranks = ranks.t().contiguous()
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        _MESHES[order] = DeviceMesh(device_type, ranks, mesh_dim_names=tuple(order.split(",")))
    return _MESHES[order]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broadcast_object(obj=None, src: int = 0):
    """Send a picklable object from global rank `src` to all ranks (e.g. the line a user
    typed on rank 0 in an interactive tensor-parallel session). Identity without dist."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def tp_broadcast_object(obj=None):
    """`obj` of tensor-parallel rank 0, on every rank of this TP group (identity at TP=1):
    e.g. a sampling seed, so TP peers draw the same tokens."""
    if tp_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(tp_group(), 0), group=tp_group())
    return box[0]
