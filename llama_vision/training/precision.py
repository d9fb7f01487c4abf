"""The mixed-precision policy of training, in one place.

Three dtypes (`PrecisionPolicy`, resolved from the config by `resolve_precision`):

* frozen_param_dtype -- storage of FROZEN parameters (config `frozen_param_dtype`; null
  follows `dtype`: bfloat16 on a GPU under `dtype: bf16`, float32 otherwise). The 11B
  model's frozen trunk is ~42 GB in float32 and half that in bf16 on every rank; a frozen
  weight gets no gradient and no optimizer update, so nothing is lost by keeping only its
  rounded value (under bf16 autocast every op rounds it to bf16 anyway).
* master_dtype -- float32, always: TRAINABLE parameters are float32 master copies, so their
  gradients, their accumulation over micro-batches (autograd accumulates into `p.grad` in
  the parameter's dtype) and AdamW's state are float32.
* reduce_dtype -- the dtype of the data-parallel gradient all-reduce (config
  `reduce_dtype`, default fp32: the paper found bf16 gradient accumulation unstable
  through the cross-attention layers); bf16 halves the traffic, the sum is cast back into
  the float32 gradients.

`apply_precision(model, policy)` (called by the Trainer after `parallelize`, before the
optimizer is built) casts the parameters and, only when some parameter is not float32,
installs forward hooks that keep dtypes consistent. Design: the model code stays
single-dtype and policy-free; the dtype bookkeeping sits on the modules that OWN
parameters:

* every module with parameters of its own gets a forward pre-hook that casts its floating
  inputs to its parameters' dtype (a frozen bf16 Linear / Embedding / LayerNorm / RMSNorm
  computes in bf16; a trainable fp32 module -- the vision encoder fed by a frozen
  projection's dtype, an adapter reading the trunk -- computes in fp32), and a forward hook
  that casts its floating outputs to float32. So the activations BETWEEN modules (the
  decoder's residual stream, the media tokens, the cross-attention K/V, the logits) stay
  float32 exactly as in the all-float32 model, and only the frozen modules' own arithmetic
  is bf16 -- the smallest deviation from the float32 run that stores the trunk in bf16.
  (The alternative, running whole frozen blocks in bf16, rounds the residual stream at
  every layer; hooks on leaves also survive activation checkpointing's recomputation and
  DPO's reference forward (its weights swapped in place), which see the same modules.)
* A module whose own parameters are frozen but that holds trainable submodules keeps its
  parameters in float32 (its forward may feed them to trainable code); none exist in
  today's trainability groups (each group is whole subtrees) -- except a LoRA'd linear
  (llama_vision.model.lora), whose trainable adaptor child reads only the linear's input:
  its base weight counts as frozen (stored in frozen_param_dtype, computing in it), the
  adaptor's A and B are float32 masters with hooks of their own (they read the
  bf16-rounded input the base reads, in float32, and add a float32 delta).
* Under autocast (GPU, `dtype: bf16`) autocast already chooses each op's dtype, so the
  hooks step aside -- except that an embedding lookup (a module fed no floating input)
  still returns float32, as the float32 embedding table did: autocast leaves embeddings in
  the weight's dtype, and the residual stream would otherwise become bf16. Linear layers
  then compute bitwise what they computed before (autocast rounded the float32 weight to
  bf16 at every call; the stored weight is that same rounding).
* RMSNorm computes in float32 whatever its input (llama_vision.model.layers.RMSNorm), the
  attention softmax runs inside SDPA on its inputs' dtype, and the LM loss takes float32
  logits. The RoPE table is a plain float32 attribute, not a buffer: no cast reaches it.
  The model has no buffers; any a module had would be cast with its parameters.

With every parameter float32 (the default on the CPU) nothing is cast and no hook is
installed: the run is bitwise the one before this policy existed.

Checkpoints: resumable checkpoints hold the trainable (float32) tensors only. `final/`
(Meta format) is written AS STORED: frozen tensors in frozen_param_dtype, trained ones in
float32 -- exactly the model that was trained (its adapters learned against the rounded
trunk). `load_model` casts every tensor to the dtype it is asked for, and the next stage's
`init_from` copies them into its own (float32) model before its policy is applied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["DTYPES", "PrecisionPolicy", "apply_precision", "resolve_precision"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """Storage of frozen parameters, of trainable ones (their grads and optimizer state),
    and the dtype of the data-parallel gradient all-reduce."""

    frozen_param_dtype: torch.dtype = torch.float32
    master_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32


def resolve_precision(cfg, device: torch.device | str) -> PrecisionPolicy:
    """The run's policy: `frozen_param_dtype` null -> bf16 when the forward runs under bf16
    autocast (GPU and `dtype: bf16`), float32 otherwise (the CPU runs float32)."""
    device = torch.device(device)
    frozen = cfg.frozen_param_dtype
    if frozen is None:
        frozen = "bf16" if cfg.dtype == "bf16" and device.type == "cuda" else "fp32"
    return PrecisionPolicy(frozen_param_dtype=DTYPES[frozen], reduce_dtype=DTYPES[cfg.reduce_dtype])


@torch.no_grad()
def apply_precision(model: nn.Module, policy: PrecisionPolicy) -> nn.Module:
    """Cast `model`'s parameters to `policy` in place (frozen -> frozen_param_dtype,
    trainable -> master_dtype; see the module docstring) and, when any parameter is then
    not float32, install the dtype hooks on every module owning parameters. Parameters
    stay the same `nn.Parameter` objects (attributes such as `tp_partial_grad` kept).
    Returns the model. Call before building the optimizer."""
    done: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False)]
        if not own:
            continue
        whole_subtree_frozen = not any(p.requires_grad for p in _subtree_params(module))
        for p in own:
            if id(p) in done or not p.is_floating_point():
                continue
            done.add(id(p))
            if p.requires_grad:
                dtype = policy.master_dtype
            else:
                dtype = policy.frozen_param_dtype if whole_subtree_frozen else policy.master_dtype
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
        if whole_subtree_frozen:
            for name, b in module.named_buffers(recurse=False):
                if b is not None and b.is_floating_point() and b.dtype != policy.frozen_param_dtype:
                    setattr(module, name, b.to(policy.frozen_param_dtype))
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        install_dtype_hooks(model)
    return model


def _subtree_params(module: nn.Module):
    """The parameters `module`'s forward may feed to trainable code: its subtree's, except
    those of direct children that read only the module's input (LoRA adaptors,
    `reads_host_input_only`): a frozen LoRA'd linear stays frozen for the policy."""
    skip = {id(p) for c in module.children() if getattr(c, "reads_host_input_only", False) for p in c.parameters()}
    return [p for p in module.parameters() if id(p) not in skip]


def install_dtype_hooks(model: nn.Module) -> list[RemovableHandle]:
    """The cast-in / float32-out hooks on every module owning parameters (idempotent)."""
    handles = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        if not own or getattr(module, "_precision_hooked", False):
            continue
        dtypes = {p.dtype for p in own}
        if len(dtypes) != 1:
            continue  # mixed own dtypes (frozen parent kept fp32 with trainable ones): no single compute dtype
        module._precision_dtype = dtypes.pop()
        module._precision_hooked = True
        handles.append(module.register_forward_pre_hook(_cast_inputs, with_kwargs=True))
        handles.append(module.register_forward_hook(_cast_outputs, with_kwargs=True))
    return handles


def _autocast_on(args, kwargs) -> bool:
    for t in _tensors(args, kwargs):
        return torch.is_autocast_enabled(t.device.type)
    return torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _cast(obj, dtype: torch.dtype):
    """Floating tensors (not complex: the RoPE rotations) in obj, one level of
    tuple / list / dict deep, cast to dtype."""
    if _is_float(obj):
        return obj if obj.dtype == dtype else obj.to(dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _cast_inputs(module: nn.Module, args, kwargs):
    if _autocast_on(args, kwargs):
        return None
    dtype = module._precision_dtype
    return _cast(args, dtype), _cast(kwargs, dtype)


def _cast_outputs(module: nn.Module, args, kwargs, output):
    if _autocast_on(args, kwargs) and any(_is_float(t) for t in _tensors(args, kwargs)):
        return None  # autocast decides; only embedding lookups (no float input) come back fp32
    return _cast(output, torch.float32)
