"""The mixed-precision policy (llama_vision.training.precision): frozen parameters stored
in bf16 next to float32 trainable ones train on the CPU without autocast, close to the
float32 run; the default changes nothing; final/ of such a run loads for inference and as
the next stage's init_from."""
from __future__ import annotations

import pytest
import torch

from _helpers import ROOT, tiny_train_overrides
from llama_vision.config import load_config
from llama_vision.training.metrics import read_metrics
from llama_vision.training.precision import PrecisionPolicy, apply_precision, resolve_precision
from llama_vision.training.train_config import TrainConfig
from llama_vision.training.trainer import Trainer

PRETRAIN = str(ROOT / "configs/train/tiny_image_pretrain.yaml")
COMMON = dict(checkpoint_every=100, micro_batch_size=4, **{"data.shuffle": "false", "optim.warmup_steps": 2})


def _cfg(corpus, out, **extra):
    return load_config(TrainConfig, PRETRAIN, tiny_train_overrides(corpus, out, **{**COMMON, **extra}))


def _losses(out) -> list[float]:
    return [m["loss"] for m in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(shapes_corpus, tmp_path_factory):
    """20 steps each: bf16-frozen (with final/), fp32 explicitly, the default config."""
    root = tmp_path_factory.mktemp("precision")
    out = {}
    bf16 = Trainer(_cfg(shapes_corpus, root / "bf16", max_steps=20, frozen_param_dtype="bf16"))
    grads = {}
    apply_update = bf16._apply_update

    def spy(grad_norm):  # the gradients of the first step, between backward and zero_grad
        if not grads:
            grads.update({n: None if p.grad is None else p.grad.dtype for n, p in bf16.model.named_parameters()})
        return apply_update(grad_norm)

    bf16._apply_update = spy
    bf16.fit()
    out["bf16"] = (bf16, grads)
    for name, extra in (("fp32", dict(frozen_param_dtype="fp32")), ("default", {})):
        t = Trainer(_cfg(shapes_corpus, root / name, max_steps=20, save_final="false", **extra))
        t.fit()
        out[name] = (t, None)
    return root, out


def test_bf16_frozen_storage_and_fp32_master_weights_and_grads(runs):
    _, out = runs
    trainer, grads = out["bf16"]
    assert trainer.precision.frozen_param_dtype == torch.bfloat16
    named = list(trainer.model.named_parameters())
    frozen = [n for n, p in named if not p.requires_grad]
    assert frozen and any(n.startswith("text_model.layers.") for n in frozen)
    for n, p in named:
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), (n, p.dtype)
        assert p.requires_grad or p.grad is None, n
    # Every trainable parameter got a float32 gradient; no frozen one got any.
    for n, p in named:
        if p.requires_grad:
            assert grads[n] == torch.float32, (n, grads[n])
        else:
            assert grads[n] is None, n
    assert all(p.dtype == torch.float32 for p in trainer.params)
    for state in trainer.optimizer.state.values():
        assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step"), state.keys()


def test_bf16_frozen_loss_curve_tracks_fp32(runs):
    root, _ = runs
    bf16, fp32 = _losses(root / "bf16"), _losses(root / "fp32")
    assert len(bf16) == len(fp32) == 20
    for step, (a, b) in enumerate(zip(bf16, fp32), 1):
        assert a == pytest.approx(b, rel=2e-2), f"step {step}: bf16-frozen {a} vs fp32 {b}"
    assert sum(bf16[-5:]) < sum(bf16[:5]) and sum(fp32[-5:]) < sum(fp32[:5])
    assert bf16 != fp32  # the policy did something


def test_default_is_fp32_on_cpu_and_bitwise_unchanged(runs):
    root, out = runs
    default, _ = out["default"]
    assert TrainConfig().frozen_param_dtype is None and TrainConfig().reduce_dtype == "fp32"
    assert default.precision == PrecisionPolicy()  # everything float32 on the CPU
    assert all(p.dtype == torch.float32 for p in default.model.parameters())
    assert not any(getattr(m, "_precision_hooked", False) for m in default.model.modules())
    assert _losses(root / "default") == _losses(root / "fp32")  # bitwise


def test_default_follows_dtype_on_gpu():
    cfg = TrainConfig()
    assert resolve_precision(cfg, "cuda").frozen_param_dtype == torch.bfloat16  # dtype: bf16 (default)
    assert resolve_precision(cfg, "cpu").frozen_param_dtype == torch.float32
    cfg.dtype = "fp32"
    assert resolve_precision(cfg, "cuda").frozen_param_dtype == torch.float32
    cfg.frozen_param_dtype, cfg.reduce_dtype = "bf16", "bf16"
    policy = resolve_precision(cfg, "cpu")
    assert policy.frozen_param_dtype == policy.reduce_dtype == torch.bfloat16 and policy.master_dtype == torch.float32


def test_bf16_frozen_final_loads_for_inference_and_as_init_from(runs, shapes_corpus, tmp_path):
    import llama_vision

    root, out = runs
    trainer, _ = out["bf16"]
    final = root / "bf16" / "final"
    stored = torch.load(final / "consolidated.00.pth", weights_only=True)
    named = dict(trainer.model.named_parameters())
    for k, t in stored.items():  # written as stored: frozen bf16, trained fp32
        if k in named:
            assert t.dtype == named[k].dtype, k
    model = llama_vision.load_model(final)
    for k, p in model.state_dict().items():
        if k in named:
            torch.testing.assert_close(p, named[k].detach().float(), rtol=0, atol=0, msg=k)
    # The next stage starts from it (bf16-frozen again) and trains.
    nxt = Trainer(_cfg(shapes_corpus, tmp_path / "next", max_steps=2, save_final="false", frozen_param_dtype="bf16",
                       init_from=str(final), stage="anneal"))
    for n, p in nxt.model.named_parameters():
        torch.testing.assert_close(p.detach().float(), named[n].detach().float(), rtol=0, atol=0, msg=n)
    nxt.fit()
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path / "next"))))


def test_apply_precision_mixed_module_keeps_fp32():
    """A frozen module with a trainable child keeps its own parameters float32 (its forward
    may feed them to trainable code); a wholly frozen child is cast and computes in bf16."""

    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4), requires_grad=False)
            self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
            self.train_me = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.train_me(self.frozen(x) * self.scale)

    m = apply_precision(Parent(), PrecisionPolicy(frozen_param_dtype=torch.bfloat16))
    assert m.scale.dtype == torch.float32 and m.frozen.weight.dtype == torch.bfloat16
    assert m.train_me.weight.dtype == torch.float32
    y = m(torch.randn(2, 4))
    assert y.dtype == torch.float32
    y.sum().backward()
    assert m.train_me.weight.grad.dtype == torch.float32 and m.frozen.weight.grad is None
