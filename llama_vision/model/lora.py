"""LoRA (low-rank adaptation) on any linear projection of the model, at any TP degree.

    y = base(x) + (alpha / r) * B A dropout(x)          A [r, in], B [out, r], B starts at 0

`apply_lora(model, targets, rank, alpha, dropout)` gives every linear whose module name
matches one of `targets` an `adaptor` child holding `A` and `B` (`nn.Linear`s without bias,
state-dict keys `<linear>.adaptor.A.weight` / `<linear>.adaptor.B.weight`: the names Meta's
llama-models gives the LoRA adaptors of its QAT+LoRA checkpoints), and puts a small
subclass in front of the linear's own class whose forward adds the adaptor's output
(`is_linear`, fairscale's isinstance checks and every existing key are unchanged). The base
weight is untouched: frozen, in whatever dtype the precision policy stores it (bf16 too).

Targets are module-name patterns (`fnmatch`, `*` matches across dots), e.g.
`text_model.layers.*.attention.wq`, or the shorthands of `SHORTHANDS`: `trunk_attention`
(wq/wk/wv/wo of every decoder layer), `trunk_mlp` (w1/w2/w3 of every decoder layer),
`adapters` (every linear of the image adapters' trainability group: cross-attention blocks
and the vision projection), `vision` (every linear of the ViT). Each entry must match at
least one linear.

Tensor parallelism comes from the base layer's split (its `tp_dims`), never from process
groups here (the collectives are model_parallel's):

* column-parallel base (W split on out, dim 0): A replicated [r, in], B split like W
  [out / tp, r]. The adaptor's h = A x is replicated and each rank's B shard reads it: its
  gradient is a partial sum per rank, all-reduced in backward (`copy_to_tp` on h, r wide,
  instead of on x): A's gradient is then whole and identical on every rank. A
  `gather_output` base gathers the adaptor's output like its own.
* row-parallel base (W split on in, dim 1): A split like W [r, in / tp], B replicated
  [out, r]. Each rank's A_shard x_shard is a partial sum of A x: fairscale's
  RowParallelLinear all-reduces its own output inside its forward, so the adaptor sums h
  over the TP group (`reduce_from_tp`, r wide) before B; B's gradient is then whole.
* K/V replicated across TP > n_kv_heads (`ReplicatedKVHeads`): A and B held whole, each
  rank applies the rows of B its query heads read (B's gradient is partial per rank,
  `tp_partial_grad`, as the base weight's).

A and B are tagged (`tp_dims`, `checkpoint_tp_dims`) with these splits, so shard plans,
distributed checkpoints, the grad norm and `init_weights`-style slicing treat them like the
base weights. A is initialised kaiming-uniform (as nn.Linear, PEFT and torchtune do),
drawn in full shape from a generator seeded by its name (a TP=N model holds the slices of
the TP=1 one), B at zero: a fresh LoRA leaves every output bitwise unchanged.

Dropout (on the adaptor's input only, as PEFT) draws from the torch RNG of each rank: TP
ranks draw alike when seeded alike, but a row-parallel base's masks cover its input shard,
so a TP=N run with dropout > 0 is not the TP=1 run.

Precision (llama_vision.training.precision): A and B are trainable float32 masters; the
adaptor is marked `reads_host_input_only`, so a LoRA'd linear is still "frozen" for the
policy and its base weight may be stored in bf16. Without autocast the frozen base then
computes in bf16 and the adaptor reads that same bf16-rounded input, in float32 (under
GPU autocast every matmul, the adaptor's too, is bf16 anyway).

Merging (`merge_lora` / `unmerge_lora`, in place, per rank: each rank's W shard gets its
own B A product, no communication): W <- W +/- (alpha / r) B A, the product computed in
float32. On a float32 base merged logits equal unmerged ones to float rounding (~1e-6).
On a bf16 base the merged weight is bf16(W + s B A): each element the nearest bf16 to the
exact float32 sum (within half a bf16 ulp); unmerging rounds again, so
bf16(bf16(W + D) - D) is within one bf16 ulp of the larger of |W|, |W + D| of the original
W, not bitwise W (elements where D = 0, e.g. B = 0, come back bitwise). So merge on a bf16
base is for export/inference; keep training unmerged. `merged_state_dict` merges into a
copy of the state dict instead (what `final/` is written from), leaving the model as is.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model_parallel import copy_to_tp, gather_from_tp, is_linear, reduce_from_tp, tp_rank, tp_size
from model_parallel.layers import ReplicatedKVHeads

from .init import kaiming_uniform_value

__all__ = [
    "ADAPTOR",
    "SHORTHANDS",
    "LoraAdapter",
    "apply_lora",
    "has_lora",
    "lora_from_meta_args",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
    "remove_lora",
    "resolve_targets",
    "unmerge_lora",
]

ADAPTOR = "adaptor"  # the child's name: keys <linear>.adaptor.A.weight / .B.weight (Meta's)

_TRUNK_ATTENTION = [f"text_model.layers.*.attention.{w}" for w in ("wq", "wk", "wv", "wo")]
_TRUNK_MLP = [f"text_model.layers.*.feed_forward.{w}" for w in ("w1", "w2", "w3")]
# Shorthand -> module-name patterns ("adapters" is filled from the model: the image
# modality's trainable modules).
SHORTHANDS: dict[str, list[str]] = {
    "trunk_attention": _TRUNK_ATTENTION,
    "trunk_mlp": _TRUNK_MLP,
    "adapters": [],
    "vision": ["vision_model.vision_encoder.*"],
}
# Meta's `lora_args` (llama-models' LoRAArgs {rank, scale}) adapt every projection of the
# decoder layers (its quantized loader swaps each Column/RowParallelLinear of them for a
# LoRA linear; the output head gets none).
META_LORA_TARGETS = ["trunk_attention", "trunk_mlp"]


class _RowsLinear(nn.Linear):
    """B of a LoRA on replicated K/V heads: held whole, applies the rows its rank's query
    heads read (as `ReplicatedKVHeads` applies its weight)."""

    rows: slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[self.rows])


class LoraAdapter(nn.Module):
    """A [r, in_local] and B [out_local, r] of one LoRA'd linear (see the module docstring
    for `split`: "column", "row", "kv_rows" or "none")."""

    # training.precision: reads only its host's input, never the host's parameters, so a
    # frozen host keeps its frozen storage dtype.
    reads_host_input_only = True

    def __init__(self, in_local: int, out_local: int, rank: int, alpha: float, dropout: float, split: str,
                 *, gather_output: bool = False, rows: slice | None = None, device=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / int(rank)
        self.split, self.gather_output = split, gather_output
        self.merged = False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(bias=False, device=device, dtype=torch.float32)
        self.A = nn.Linear(in_local, rank, **kw)
        if split == "kv_rows":
            self.B = _RowsLinear(rank, out_local, **kw)
            self.B.rows = rows
            self.B.weight.tp_partial_grad = True
        else:
            self.B = nn.Linear(rank, out_local, **kw)
        a_dim, b_dim = {"column": (None, 0), "row": (1, None)}.get(split, (None, None))
        for module, dim in ((self.A, a_dim), (self.B, b_dim)):
            module.tp_dims = {"weight": dim}
            module.checkpoint_tp_dims = {"weight": dim}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, split={self.split}" + (", merged" if self.merged else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.A(self.dropout(x))
        if self.split == "row":
            h = reduce_from_tp(h)  # sum of the ranks' A_shard x_shard = A x
        elif self.split in ("column", "kv_rows"):
            h = copy_to_tp(h)  # backward: sum of the ranks' partial gradients of h
        out = self.B(h) * self.scale
        return gather_from_tp(out) if self.gather_output else out

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A in float32, in the host weight's (rank-local) layout."""
        return _delta(self.A.weight, self.B.weight, self.scale)


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return (b.detach().float() @ a.detach().float()) * scale


class LoraHost:
    """Put in front of a LoRA'd linear's class: its own forward plus the adaptor's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        adaptor = self.adaptor
        return out if adaptor.merged else out + adaptor(x)


_HOST_CLASSES: dict[type, type] = {}


def _host_class(cls: type) -> type:
    """LoraHost + cls, one per base class, importable from this module (pickling)."""
    if cls not in _HOST_CLASSES:
        name = f"Lora{cls.__name__}"
        _HOST_CLASSES[cls] = type(name, (LoraHost, cls), {"__module__": __name__, "__qualname__": name})
        globals().setdefault(name, _HOST_CLASSES[cls])
    return _HOST_CLASSES[cls]


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> every linear LoRA can adapt (not LoRA's own A / B)."""
    inside = {id(m) for a in model.modules() if isinstance(a, LoraAdapter) for m in a.modules()}
    return {n: m for n, m in model.named_modules()
            if id(m) not in inside and (is_linear(m) or isinstance(m, ReplicatedKVHeads))}


def _shorthand(model: nn.Module, name: str) -> list[str]:
    if name == "adapters":
        image = getattr(model, "modalities", {}).get("image")
        prefixes = image.trainable_modules if image is not None else []
        return [p for prefix in prefixes for p in (prefix, prefix.rstrip(".") + ".*")]
    return SHORTHANDS[name]


def resolve_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names of the linears `targets` (patterns / shorthands) select, in model order. An
    entry that selects nothing is an error (a typo would silently train nothing)."""
    targets = list(targets)
    candidates = _adaptable(model)
    chosen: set[str] = set()
    for entry in targets:
        patterns = _shorthand(model, entry) if entry in SHORTHANDS else [entry]
        hit = {n for n in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        if not hit:
            examples = ", ".join(list(candidates)[:6])
            raise ValueError(f"lora target {entry!r} matches no linear layer (patterns {patterns}); shorthands: "
                             f"{sorted(SHORTHANDS)}; linears look like: {examples}, ...")
        chosen |= hit
    return [n for n in candidates if n in chosen]


def _split_of(host: nn.Module) -> str:
    if isinstance(host, ReplicatedKVHeads):
        return "kv_rows"
    dim = getattr(host, "tp_dims", {}).get("weight")
    return {0: "column", 1: "row"}.get(dim, "none")


@torch.no_grad()
def apply_lora(model: nn.Module, targets: Iterable[str], rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               seed: int = 0) -> list[str]:
    """Give every linear selected by `targets` a LoRA adaptor (float32, on the base
    weight's device; A kaiming-uniform seeded by (seed, its name), B zero). Returns the
    adapted modules' names. A model holding LoRA already is refused."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adaptors (merge_lora / a fresh model first)")
    names = resolve_targets(model, targets)
    world = tp_size()
    for name in names:
        host = model.get_submodule(name)
        split = _split_of(host)
        w = host.weight
        out_local, in_local = w.shape  # (replicated K/V: the whole weight, B held whole too)
        rows = host.rows if split == "kv_rows" else None
        adaptor = LoraAdapter(in_local, out_local, rank, alpha, dropout, split,
                              gather_output=bool(getattr(host, "gather_output", False)) and world > 1, rows=rows,
                              device=w.device)
        if w.device.type != "meta":
            init_lora_weights(adaptor, f"{name}.{ADAPTOR}.", seed)
        host.add_module(ADAPTOR, adaptor)
        host.__class__ = _host_class(type(host))
    return names


@torch.no_grad()
def init_lora_weights(adaptor: LoraAdapter, prefix: str, seed: int = 0) -> None:
    """A = this rank's slice of the full kaiming-uniform draw for `prefix + "A.weight"`,
    B = 0."""
    a = adaptor.A.weight
    dim = adaptor.A.tp_dims["weight"]
    shape = list(a.shape)
    world = tp_size()
    if dim is not None:
        shape[dim] *= world
    full = kaiming_uniform_value(prefix + "A.weight", shape, seed)
    if dim is not None and world > 1:
        full = full.chunk(world, dim=dim)[tp_rank()]
    a.copy_(full.to(a.dtype))
    adaptor.B.weight.zero_()


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> every LoRA'd linear of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraHost)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraHost) for m in model.modules())


def _lora_keys(name: str) -> tuple[str, str]:
    return f"{name}.{ADAPTOR}.A.weight", f"{name}.{ADAPTOR}.B.weight"


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        raise ValueError("merge_lora / unmerge_lora need whole (TP-local) tensors; an FSDP-sharded model merges "
                         "through merged_state_dict(model, model_parallel.full_state_dict(model))")
    return t


@torch.no_grad()
def _shift(model: nn.Module, sign: float, merged: bool) -> int:
    changed = 0
    for host in lora_modules(model).values():
        adaptor = host.adaptor
        if adaptor.merged == merged:
            continue
        w = _local(host.weight)
        _local(adaptor.A.weight)
        w.copy_((w.float() + sign * adaptor.delta().to(w.device)).to(w.dtype))
        adaptor.merged = merged
        changed += 1
    return changed


def merge_lora(model: nn.Module) -> int:
    """W <- W + (alpha / r) B A in place on every LoRA'd linear (its forward then skips
    the adaptor). Returns the number merged (already merged ones are skipped). Exactness:
    see the module docstring (float32: rounding only; bf16: one rounding of the sum)."""
    return _shift(model, 1.0, True)


def unmerge_lora(model: nn.Module) -> int:
    """Undo `merge_lora` in place: W <- W - (alpha / r) B A (with the adaptor's current
    A, B). On a bf16 base not bitwise the original W (module docstring)."""
    return _shift(model, -1.0, False)


def remove_lora(model: nn.Module) -> dict[str, LoraAdapter]:
    """Take every adaptor off `model` (unmerged ones simply stop applying; a merged one is
    unmerged first), restoring each linear's own class: the base model again. Returns the
    adaptors by their linear's name."""
    unmerge_lora(model)
    removed = {}
    for name, host in lora_modules(model).items():
        removed[name] = host.adaptor
        del host.adaptor
        host.__class__ = type(host).__bases__[1]  # _host_class built it as (LoraHost, the linear's class)
    return removed


def lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA tensors (`<linear>.adaptor.A.weight` / `.B.weight`) of `state` (default:
    the model's state dict), rank-local."""
    state = model.state_dict() if state is None else state
    keys = {k for name in lora_modules(model) for k in _lora_keys(name)}
    return {k: v for k, v in state.items() if k in keys}


def merged_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`state` (default: the model's state dict; rank-local tensors, e.g. FSDP's gathered
    `full_state_dict`) with every LoRA merged into its base weight (float32 product, cast
    to the stored weight's dtype) and the LoRA keys dropped: the state dict of the plain
    model. The model itself is not changed. A state missing a layer's tensors (a rank that
    keeps none) stays without them."""
    out = dict(model.state_dict() if state is None else state)
    for name, host in lora_modules(model).items():
        ka, kb = _lora_keys(name)
        a, b = out.pop(ka, None), out.pop(kb, None)
        kw = f"{name}.weight"
        if a is None or b is None or kw not in out or host.adaptor.merged:
            continue
        w = out[kw]
        out[kw] = (w.detach().float() + _delta(a, b, host.adaptor.scale).to(w.device)).to(w.dtype)
    return out


def lora_from_meta_args(lora_args: Mapping) -> dict:
    """Meta's params.json `lora_args` ({"rank": r, "scale": s}, llama-models' LoRAArgs:
    y = base(x) + s * B A x) as a `lora:` block: the decoder layers' projections (where
    Meta's loader puts its adaptors), rank r, alpha = s * r, no dropout."""
    missing = [k for k in ("rank", "scale") if k not in lora_args]
    if missing:
        raise ValueError(f"params.json lora_args {dict(lora_args)} lacks {missing} (Meta's LoRAArgs: rank, scale)")
    rank, scale = int(lora_args["rank"]), float(lora_args["scale"])
    return {"targets": list(META_LORA_TARGETS), "rank": rank, "alpha": scale * rank, "dropout": 0.0}
