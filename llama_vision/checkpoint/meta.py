"""Meta's checkpoint layout: `params.json` + `consolidated.NN.pth` (one file per
model-parallel rank, split as fairscale splits the weights) + `tokenizer.model`.

Loading works at ANY tensor-parallel degree M whatever the number of files N:

- N == M: every rank memory-maps only its own file and passes its tensors through;
- N != M: each rank memory-maps the files it overlaps and slices out exactly its part
  (a rank at TP=2 reading 4 files touches 2 of them). Keys stored split on disk but held
  whole in memory (K/V replicated when TP > n_kv_heads) are concatenated from every file.

The split dim of every key comes from the model (`shard_plan(model, "checkpoint")` for the
files, `"runtime"` for this rank), never from key-name patterns. Files are read with
`torch.load(weights_only=True, mmap=True)`: a pickled object that is not a tensor is refused
(no code from a checkpoint ever runs). Keys are strict: missing, unexpected and wrongly
shaped keys are errors that name them.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

import model_parallel as mp
from llama_vision.model.args import ModelArgs
from llama_vision.utils.io import CheckpointFormatError, atomic_save_torch, atomic_write_text

Tensor = torch.Tensor

PARAMS_FILE = "params.json"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
# ModelArgs fields that choose how to run, not what the weights are: never written.
RUNTIME_ONLY_PARAMS = ("attn_backend", "max_batch_size")
# Older Meta files carry the RoPE table as a tensor; it is recomputed from params.json.
IGNORED_KEY_SUFFIXES = ("rope.freqs",)

_VE = "vision_model.vision_encoder."
# Rewritten BY VALUE by VisionEncoder's load hook (resized from another tile size, or
# synthesised from the local embedding for checkpoints without a tile-aware one), so their
# on-disk shapes may legitimately differ from the model's.
RESIZED_ON_LOAD = tuple(
    _VE + k
    for k in ("positional_embedding", "gated_positional_embedding", "pre_tile_pos_embed.embedding", "post_tile_pos_embed.embedding")
)
_SYNTHESISED_ON_LOAD = (_VE + "gated_positional_embedding", _VE + "gated_positional_embedding_gate")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: missing / unexpected keys or wrong shapes."""


# --- params.json ----------------------------------------------------------------------------
def params_to_dict(params: ModelArgs | Mapping | str | Path) -> dict:
    """ModelArgs, a params dict or a params.json path -> a JSON-ready params dict (validated)."""
    if isinstance(params, ModelArgs):
        out = dataclasses.asdict(params)
        for key in RUNTIME_ONLY_PARAMS:
            out.pop(key, None)
        out["vision_intermediate_layers"] = list(out["vision_intermediate_layers"])
        # Keys written only when they differ from Meta's architecture, so a Meta model's
        # params.json stays exactly Meta's: an explicit adapter schedule, and the
        # per-aspect-ratio tile tables (a checkpoint Meta's own code cannot load).
        if params.has_meta_fusion_schedule:
            out.pop("fusion_schedule")
        else:
            out["fusion_schedule"] = list(out["fusion_schedule"])
        if params.tile_embedding_layout == "grid":
            out.pop("tile_embedding_layout")
        if out.get("llava") is None:
            out.pop("llava", None)
        return out
    if isinstance(params, (str, Path)):
        return read_params(params)
    out = dict(params)
    ModelArgs.from_params(dict(out))  # raises a ValueError naming bad keys/values
    return out


def read_params(ckpt_dir: str | Path) -> dict:
    """params.json of a checkpoint dir (or the file itself), with errors naming the file."""
    path = Path(ckpt_dir)
    path = path / PARAMS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a Meta checkpoint dir holds params.json + consolidated.NN.pth)")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(params).__name__}")
    # Some releases nest the architecture under "model".
    return dict(params.get("model", params)) if isinstance(params.get("model"), dict) else params


def args_from_params(params: Mapping, source: str | Path = "params", **overrides) -> ModelArgs:
    try:
        return ModelArgs.from_params(dict(params), **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid model params in {source}: {e}") from e


# --- shard files ----------------------------------------------------------------------------
def meta_shard_paths(ckpt_dir: str | Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth in rank order (a lone `consolidated.pth`
    counts as one shard). Gaps in the numbering are an error."""
    ckpt_dir = Path(ckpt_dir)
    numbered = {}
    for p in ckpt_dir.glob("consolidated.*pth"):
        m = _SHARD_RE.match(p.name)
        if m:
            numbered[int(m.group(1))] = p
    if not numbered:
        single = ckpt_dir / "consolidated.pth"
        if single.is_file():
            return [single]
        raise FileNotFoundError(f"no consolidated.NN.pth files in {ckpt_dir}")
    if sorted(numbered) != list(range(len(numbered))):
        raise CheckpointFormatError(
            f"{ckpt_dir}: shard files must be numbered 00..{len(numbered) - 1:02d}, found {sorted(numbered)}"
        )
    return [numbered[i] for i in range(len(numbered))]


def is_meta_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / PARAMS_FILE).is_file() and any(path.glob("consolidated*.pth"))


def load_tensor_file(path: str | Path, mmap: bool = True) -> dict[str, Tensor]:
    """A flat {name: tensor} torch file, read with weights_only=True (never unpickles
    code) and memory-mapped when the file format allows it (pages are read on access)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # legacy (pre-zipfile) serialisation cannot be mapped
            return load_tensor_file(path, mmap=False)
        raise CheckpointFormatError(f"{path} could not be read as a torch file: {e}") from e
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError) as e:
        raise CheckpointFormatError(
            f"{path} is not a plain-tensor checkpoint loadable with weights_only=True (it holds pickled "
            f"objects other than tensors, which are never executed, or it is truncated/corrupt): {e}"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointFormatError(f"{path}: entries that are not tensors: {bad[:10]}")
    return obj


class ShardSet:
    """The N files of a checkpoint, opened lazily (memory-mapped) and only when needed.

    `select(key)` maps a file key to a model key, or None to skip it (used to pick the text
    trunk out of a vision checkpoint). All files must hold the same keys.
    """

    def __init__(self, paths: list[Path], select: Callable[[str], str | None] | None = None):
        self.paths = paths
        self.select = select or (lambda k: k)
        self._open: dict[int, dict[str, Tensor]] = {}
        self._keys: set[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if i not in self._open:
            raw = load_tensor_file(self.paths[i])
            sd = {}
            for key, t in raw.items():
                if key.endswith(IGNORED_KEY_SUFFIXES):
                    continue
                new = self.select(key)
                if new is not None:
                    sd[new] = t
            if self._keys is None:
                self._keys = set(sd)
            elif set(sd) != self._keys:
                diff = sorted(set(sd) ^ self._keys)
                raise CheckpointMismatchError(f"{self.paths[i]} holds different keys than the other shards, e.g. {diff[:10]}")
            self._open[i] = sd
        return self._open[i]

    @property
    def opened(self) -> list[int]:
        return sorted(self._open)


# --- validation -----------------------------------------------------------------------------
def check_keys(got: Iterable[str], expected: Iterable[str], source, allow_missing_prefixes: tuple[str, ...] = ()) -> None:
    """Strict key match, naming every offending key. Keys the vision load hook synthesises
    (a tile-aware position embedding absent from older checkpoints) may be missing, as may
    keys under `allow_missing_prefixes` (modules the checkpoint predates)."""
    got, expected = set(got), set(expected)
    missing = expected - got
    if _VE + "positional_embedding" in got:
        missing -= set(_SYNTHESISED_ON_LOAD)
    missing = sorted(k for k in missing if not k.startswith(tuple(allow_missing_prefixes)))
    unexpected = sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {missing[:20]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {unexpected[:20]}")
        raise CheckpointMismatchError(f"checkpoint {source} does not match the model: " + "; ".join(parts))


def check_shapes(full_shapes: Mapping[str, tuple], model: nn.Module, world: int, source) -> None:
    """Full (unsharded) checkpoint shapes against the model's, whose parameters are this
    rank's slices at TP=`world`. Position/tile embeddings are skipped: the load hook
    resizes them by value when the tile size differs. So are the shape differences a
    module's own load hook declares it resizes (`resizes_on_load`, e.g. the video
    aggregator's per-frame / per-group tables)."""
    runtime = mp.shard_plan(model, "runtime")
    local = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = []
    for key, shape in full_shapes.items():
        if key not in local or key in RESIZED_ON_LOAD:
            continue
        want = list(local[key])
        if runtime.get(key) is not None:
            want[runtime[key]] *= world
        if list(shape) != want and not resized_by_load_hook(model, key, shape):
            bad.append(f"{key}: checkpoint {list(shape)} vs model {want}")
    if bad:
        raise CheckpointMismatchError(f"checkpoint {source} has {len(bad)} tensor(s) of the wrong shape: " + "; ".join(bad[:20]))


def resized_by_load_hook(model: nn.Module, key: str, shape) -> bool:
    """Whether the module owning `key` resizes a checkpoint tensor of `shape` in its load
    pre-hook: modules opt in with `resizes_on_load(name, shape) -> bool` (`name` relative to
    the module). Only whole (replicated) tensors may opt in: the shape given is the full
    checkpoint one."""
    owner, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return False
    resizes = getattr(module, "resizes_on_load", None)
    return callable(resizes) and bool(resizes(name, tuple(shape)))


def load_strict(
    module: nn.Module, state: Mapping[str, Tensor], source, allow_missing_prefixes: tuple[str, ...] = (), *, assign: bool = False
) -> None:
    """module.load_state_dict, letting the load hooks run, with errors that name the keys.
    assign=True: the tensors replace the module's (no copy; see `load.assign_strict`)."""
    try:
        result = module.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as e:  # size mismatches after the hooks ran
        raise CheckpointMismatchError(f"loading {source}: {e}") from e
    missing = [k for k in result.missing_keys if not k.startswith(tuple(allow_missing_prefixes))]
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"loading {source}: missing keys {missing[:20]}, unexpected keys {list(result.unexpected_keys)[:20]}"
        )


def build_skeleton(params: Mapping, dtype: torch.dtype | None = None) -> nn.Module:
    """The model without weights, on the meta device (no memory), at any TP degree (the
    factories in model_parallel.layers build fairscale's parallel layers there too)."""
    from llama_vision.model import build_model

    return build_model(dict(params), device="meta", dtype=dtype, init=False)


# --- loading --------------------------------------------------------------------------------
def load_meta_state_dict(
    ckpt_dir: str | Path,
    tp_rank: int = 0,
    tp_world: int = 1,
    plan_model: nn.Module | None = None,
    *,
    allow_missing_prefixes: tuple[str, ...] = (),
    place: Callable[[str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """This rank's state dict at TP=`tp_world`, from a checkpoint saved with any number of
    files. `plan_model` is the target model (any device, "meta" included) built at
    TP=`tp_world`; by default one is built from params.json on the meta device. `place`:
    see `reshard`."""
    ckpt_dir = Path(ckpt_dir)
    if plan_model is None:
        if tp_world != mp.tp_size():
            raise ValueError(f"pass plan_model built at TP={tp_world} (the current TP degree is {mp.tp_size()})")
        params = read_params(ckpt_dir)
        args_from_params(params, ckpt_dir / PARAMS_FILE)  # clear error before building
        plan_model = build_skeleton(params)
    shards = ShardSet(meta_shard_paths(ckpt_dir))
    return reshard(shards, plan_model, tp_rank, tp_world, source=ckpt_dir, allow_missing_prefixes=allow_missing_prefixes, place=place)


def reshard(
    shards: ShardSet,
    model: nn.Module,
    tp_rank: int,
    tp_world: int,
    *,
    source,
    allow_missing_prefixes: tuple[str, ...] = (),
    keys: Iterable[str] | None = None,
    place: Callable[[str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """N files -> the tensors rank `tp_rank` of `model` (built at TP=`tp_world`) holds.
    `keys`: the model keys the checkpoint must provide (default: all of the model's).
    Replicated keys are taken from one file (Meta's files repeat them identically;
    comparing every copy would read every file). `place(key, tensor)`, when given, is
    applied to each tensor as soon as it is sliced / concatenated (e.g. moving it to its
    device: a resharded tensor's host copy is then freed before the next is built)."""
    n = len(shards)
    home = tp_rank * n // tp_world  # the file holding this rank's first rows
    ckpt_plan, run_plan = mp.shard_plan(model, "checkpoint"), mp.shard_plan(model, "runtime")
    expected = list(model.state_dict()) if keys is None else list(keys)
    check_keys(shards[home], expected, source, allow_missing_prefixes)
    full_shapes = {}
    for key, t in shards[home].items():
        shape = list(t.shape)
        if ckpt_plan.get(key) is not None:
            shape[ckpt_plan[key]] *= n
        full_shapes[key] = shape
    check_shapes(full_shapes, model, tp_world, source)
    place = place or (lambda key, t: t)
    return {key: place(key, _local_tensor(shards, key, home, ckpt_plan.get(key), run_plan.get(key), tp_rank, tp_world)) for key in shards[home]}


def _local_tensor(shards: ShardSet, key: str, home: int, c: int | None, r: int | None, rank: int, world: int) -> Tensor:
    """This rank's part of `key`: stored split on dim `c` over the files, held split on
    dim `r` across `world` ranks (None = whole)."""
    n = len(shards)
    if c is None:  # replicated in every file: take the one already open
        return shards[home][key]
    size = shards[home][key].shape[c]
    if r == c:
        total = size * n
        if total % world:
            raise CheckpointMismatchError(f"{key}: dim {c} of size {total} does not split across TP={world}")
        step = total // world
        lo, hi = rank * step, (rank + 1) * step
        pieces = []
        for i in range(lo // size, (hi - 1) // size + 1):
            t = shards[i][key]
            if t.shape[c] != size:
                raise CheckpointMismatchError(f"{key}: shard {i} has {t.shape[c]} rows on dim {c}, shard {home} has {size}")
            start = max(lo, i * size) - i * size
            pieces.append(t.narrow(c, start, min(hi, (i + 1) * size) - i * size - start))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=c)
    full = torch.cat([shards[i][key] for i in range(n)], dim=c) if n > 1 else shards[0][key]
    return full if r is None or world == 1 else full.chunk(world, dim=r)[rank]


# --- saving ---------------------------------------------------------------------------------
def save_meta_checkpoint(
    source: nn.Module | Mapping[str, Tensor],
    params_or_out_dir,
    out_dir: str | Path | None = None,
    num_shards: int | None = None,
    dtype: torch.dtype | None = None,
    *,
    tp_rank: int = 0,
    tp_world: int = 1,
    write: bool = True,
    state_dict: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write `source` (a model or a full state dict) as params.json + consolidated.NN.pth.

    Call forms: `save_meta_checkpoint(model_or_state_dict, params, out_dir, num_shards=N)`
    or `save_meta_checkpoint(model, out_dir)` (params from `model.args`).

    Single process: the full weights are split into `num_shards` files (default 1) along
    the checkpoint plan. Under tensor parallelism (`tp_world` > 1, every rank calling, the
    model holding this rank's slices) each TP rank writes its own file; `write=False` ranks
    (other data-parallel replicas) only join the barriers.

    Crash safety: an existing params.json is removed first, every file is written
    atomically (temp + rename), stale shard files of an earlier save are removed, and
    params.json is written LAST -- a directory with params.json is always complete.
    `dtype` casts floating-point tensors (e.g. torch.bfloat16 as Meta ships).
    state_dict: the model's tensors when `source.state_dict()` does not hold them whole
    (an FSDP-sharded model: its gathered TP-local tensors, `model_parallel.full_state_dict`).
    """
    if out_dir is None:
        if not isinstance(params_or_out_dir, (str, Path)):
            raise TypeError("save_meta_checkpoint(source, params, out_dir) or save_meta_checkpoint(model, out_dir)")
        out_dir, params = params_or_out_dir, None
    else:
        params = params_or_out_dir
    out = Path(out_dir)
    model = source if isinstance(source, nn.Module) else None
    if params is None:
        if model is None or not hasattr(model, "args"):
            raise ValueError("params are required when saving a state dict")
        params = model.args
    params_json = json.dumps(params_to_dict(params), indent=2, sort_keys=True) + "\n"

    if tp_world > 1:
        if model is None:
            raise ValueError("saving under tensor parallelism needs the model (its runtime plan)")
        if num_shards not in (None, tp_world):
            raise ValueError(f"a TP={tp_world} model saves {tp_world} shards; re-shard afterwards with tools/convert_checkpoint.py")
        shard = _checkpoint_shard_of_rank(model, tp_rank, tp_world, state_dict if write else {})
        if write and tp_rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / PARAMS_FILE).unlink(missing_ok=True)
        mp.barrier()
        if write:
            atomic_save_torch(tensors_for_saving(shard, dtype), out / f"consolidated.{tp_rank:02d}.pth")
        mp.barrier()
        if write and tp_rank == 0:
            _finish(out, tp_world, params_json)
        return out

    if not write:
        return out
    if model is not None and mp.tp_size() > 1:
        raise ValueError(f"the model is tensor-parallel (TP={mp.tp_size()}): pass tp_rank= and tp_world= so each rank saves its shard")
    state = dict(state_dict if state_dict is not None else source.state_dict() if model is not None else source)
    if model is None:
        model = build_skeleton(params_to_dict(params))
    plan = mp.shard_plan(model, "checkpoint")
    check_keys(state, plan, "state dict to save")
    n = num_shards or 1
    shards = mp.split_state_dict(state, plan, n)
    out.mkdir(parents=True, exist_ok=True)
    (out / PARAMS_FILE).unlink(missing_ok=True)
    for i, shard in enumerate(shards):
        atomic_save_torch(tensors_for_saving(shard, dtype), out / f"consolidated.{i:02d}.pth")
    _finish(out, n, params_json)
    return out


def _checkpoint_shard_of_rank(model: nn.Module, rank: int, world: int, tensors: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """This rank's tensors (default: the model's state dict) in the checkpoint layout
    (differs from the runtime one only where a weight is held whole but stored split:
    replicated K/V heads)."""
    ckpt, run = mp.shard_plan(model, "checkpoint"), mp.shard_plan(model, "runtime")
    out = {}
    for key, t in (model.state_dict() if tensors is None else tensors).items():
        c, r = ckpt.get(key), run.get(key)
        if c == r:
            out[key] = t
        elif r is None:
            out[key] = t.chunk(world, dim=c)[rank]
        else:
            raise ValueError(f"{key}: held split on dim {r} but stored split on dim {c}; cannot save per rank")
    return out


def tensors_for_saving(shard: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors that own their storage, floats cast to `dtype`."""
    out = {}
    for key, t in shard.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        # torch.save writes a view's WHOLE storage: copy views of larger tensors.
        if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        out[key] = t
    return out


def _finish(out: Path, n: int, params_json: str) -> None:
    for p in out.glob("consolidated.*pth"):
        m = _SHARD_RE.match(p.name)
        if (m and int(m.group(1)) >= n) or p.name == "consolidated.pth":
            p.unlink()
    atomic_write_text(out / PARAMS_FILE, params_json)
