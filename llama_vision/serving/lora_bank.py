"""Several LoRA adaptors on one base model at once, chosen per batch row (multi-LoRA serving).

    y[row] = base(x)[row] + (alpha_k / r_k) B_k A_k x[row]     k = the row's adaptor (or none)

`LoraBank.attach(model, {"name": lora_dir, ...})` reads each adaptor (our lora dir or a
PEFT adapter dir) onto the base model with the single-adaptor code (`load_lora` /
`import_peft`: the same TP slices, column / row / replicated-K/V splits), takes the
tensors off again (`remove_lora`) and keeps them in a `LoraBankEntry` child of every
adapted linear, whose class gains `LoraBankHost` in front (as `LoraHost` for one adaptor).
Before each forward the caller says which adaptor each row uses: `bank.select(["a", None,
"b"])` (None: the base model). A forward then adds, for each adaptor present in the batch,
its output on its rows only (index_select / index_add_: the rows of one adaptor run the
very matmuls a model with only that adaptor runs).

Only adaptors on the text side of the decoder can share a batch: the self-attention
layers, the MLPs, the output head and the cross-attention layers' query / output / MLP
projections (they read the text rows). LoRA on the ViT or on the cross-attention K/V
changes an image's K/V, which the server caches per image, not per adaptor; an adaptor
that also trained whole modules (modules_to_save, also_trained) changes base weights.
Both are refused by name: serve such a run's merged checkpoint as its own model.
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model_parallel import copy_to_tp, gather_from_tp, reduce_from_tp

from llama_vision.model.lora import LoraAdapter, remove_lora

__all__ = ["LoraBank", "LoraBankEntry", "TEXT_SIDE"]

# Linears that read only the text rows of a batch (module-name patterns).
TEXT_SIDE = (
    "text_model.layers.*",
    "text_model.output",
    "text_model.cross_attention_layers.*.attention.wq",
    "text_model.cross_attention_layers.*.attention.wo",
    "text_model.cross_attention_layers.*.feed_forward.*",
)


class LoraBankEntry(nn.Module):
    """The adaptors of one linear: per adaptor index, A [r, in_local], B [out_local, r]
    and its scale (held as plain tensors: inference only), split as its LoraAdapter was."""

    def __init__(self, split: str, gather_output: bool, rows: slice | None):
        super().__init__()
        self.split, self.gather_output, self.rows = split, gather_output, rows
        self.adaptors: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.selection: _Selection | None = None

    def add(self, index: int, adaptor: LoraAdapter, dtype: torch.dtype) -> None:
        a, b = adaptor.A.weight.detach().to(dtype), adaptor.B.weight.detach().to(dtype)
        if self.rows is not None:
            b = b[self.rows]  # replicated K/V: the rows this rank's query heads read
        self.adaptors[index] = (a, b, adaptor.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [B, ..., in_local] -> the adaptors' output [B, ..., out_local] (None: no row of
        the batch uses an adaptor of this linear)."""
        groups = self.selection.groups if self.selection is not None else {}
        out = None
        for index, rows in groups.items():
            if index not in self.adaptors:
                continue
            a, b, scale = self.adaptors[index]
            xs = x if rows is None else x.index_select(0, rows)
            h = F.linear(xs, a)
            if self.split == "row":
                h = reduce_from_tp(h)  # sum of the ranks' A_shard x_shard = A x
            elif self.split in ("column", "kv_rows"):
                h = copy_to_tp(h)
            y = F.linear(h, b) * scale
            if self.gather_output:
                y = gather_from_tp(y)
            if rows is None:
                return y
            if out is None:
                out = torch.zeros(*x.shape[:-1], y.shape[-1], dtype=y.dtype, device=y.device)
            out.index_add_(0, rows, y)
        return out


class LoraBankHost:
    """Put in front of a linear's class: its own forward plus its bank's rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        extra = self.lora_bank(x)
        return out if extra is None else out + extra


_HOST_CLASSES: dict[type, type] = {}


def _host_class(cls: type) -> type:
    if cls not in _HOST_CLASSES:
        name = f"LoraBank{cls.__name__}"
        _HOST_CLASSES[cls] = type(name, (LoraBankHost, cls), {"__module__": __name__, "__qualname__": name})
    return _HOST_CLASSES[cls]


class _Selection:
    """The current batch's rows per adaptor index: {index: row indices, or None = every row}."""

    def __init__(self):
        self.groups: dict[int, torch.Tensor | None] = {}


def _served_side(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in TEXT_SIDE)


def _check_servable(name: str, source: Path) -> None:
    """Refuse what a shared batch cannot hold (module docstring), naming it."""
    config_path = source / "lora_config.json"
    if config_path.is_file():
        also = json.loads(config_path.read_text()).get("also_trained") or []
        if also:
            raise ValueError(f"adaptor {name!r} ({source}): its run also trained {also} whole; serve that run's "
                             f"final/ checkpoint as a model of its own")
    peft_config = source / "adapter_config.json"
    if peft_config.is_file():
        config = json.loads(peft_config.read_text())
        if config.get("modules_to_save") or config.get("trainable_token_indices"):
            raise ValueError(f"adaptor {name!r} ({source}): a PEFT adapter with modules_to_save / trainable tokens "
                             f"changes base weights; merge it and serve it as a model of its own")


class LoraBank:
    """The adaptors a model serves, by name (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names: list[str] = []  # adaptor index i + 1 <-> names[i]; 0 = the base model
        self.modules: dict[str, list[str]] = {}
        self._selection = _Selection()

    @classmethod
    def attach(cls, model: nn.Module, adaptors: Mapping[str, str | Path], dtype: torch.dtype | None = None) -> "LoraBank":
        """Load every adaptor dir of `adaptors` (name -> our LoRA dir or a PEFT adapter dir)
        onto `model` (a base model without LoRA, any TP degree). dtype: the adaptors'
        compute dtype (default: the model's)."""
        bank = cls(model)
        for name, source in adaptors.items():
            bank.add(name, source, dtype)
        return bank

    @torch.no_grad()
    def add(self, name: str, source: str | Path, dtype: torch.dtype | None = None) -> list[str]:
        from llama_vision.checkpoint.peft import load_adaptors

        source = Path(source)
        if not name or name in self.names:
            raise ValueError(f"adaptor name {name!r} is empty or already taken ({self.names})")
        _check_servable(name, source)
        modules = load_adaptors(self.model, source)
        adaptors = remove_lora(self.model)
        outside = [m for m in modules if not _served_side(m)]
        if outside:
            raise ValueError(f"adaptor {name!r} ({source}) adapts {outside[:3]}{'...' if len(outside) > 3 else ''}, which "
                             f"act on images (their K/V are cached per image): multi-adaptor serving takes LoRA on "
                             f"{list(TEXT_SIDE)}; serve this one merged, as a model of its own")
        self.names.append(name)
        index = len(self.names)
        for module_name, adaptor in adaptors.items():
            host = self.model.get_submodule(module_name)
            if not isinstance(host, LoraBankHost):
                entry = LoraBankEntry(adaptor.split, adaptor.gather_output, getattr(adaptor.B, "rows", None))
                entry.selection = self._selection
                host.add_module("lora_bank", entry)
                host.__class__ = _host_class(type(host))
            host.lora_bank.add(index, adaptor, dtype or host.weight.dtype)
        self.modules[name] = modules
        return modules

    def index(self, name: str | None) -> int:
        """The adaptor index of `name` (None: 0, the base model)."""
        if name is None:
            return 0
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise KeyError(f"no adaptor named {name!r}; this model serves {self.names}") from None

    def select(self, names: Sequence[str | None]) -> None:
        """The adaptor of each row of the next forward(s) (None: none)."""
        indices = [self.index(n) for n in names]
        device = next(self.model.parameters()).device
        if len(set(indices)) == 1:
            self._selection.groups = {} if indices[0] == 0 else {indices[0]: None}
            return
        groups: dict[int, list[int]] = {}
        for row, i in enumerate(indices):
            if i:
                groups.setdefault(i, []).append(row)
        self._selection.groups = {i: torch.tensor(rows, device=device) for i, rows in groups.items()}
