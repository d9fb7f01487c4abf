"""The memory planner (llama_vision.training.memory_plan, tools/plan_memory.py), its
activation estimate, the step profiler and peak-memory helpers (training.profiling).

Exact where the planner claims exactness: weights, gradients and AdamW state equal a real
model's tensor storage after a real optimizer step; the DP / TP division rules equal
hand-computed numbers. Estimates are checked against the real thing: the saved-tensor
bytes of real forwards, and the RSS increase of a real training run."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from _helpers import ROOT, tiny_params
from llama_vision.config import load_config
from llama_vision.training.memory_plan import (
    ParamSpec,
    build_meta_model,
    format_plan,
    param_specs,
    per_rank_state,
    plan_memory,
    simulated_tp,
    zero1_partition,
)
from llama_vision.training.train_config import TrainConfig

PRETRAIN = ROOT / "configs/train/tiny_image_pretrain.yaml"
LLAVA_PRETRAIN = ROOT / "configs/train/tiny_llava_pretrain.yaml"
# Peak RSS is reset through /proc/self/clear_refs and read from /proc/self/status: Linux.
linux_only = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
TINY = [f"model={ROOT / 'configs/model/tiny.yaml'}", "model_overrides={vocab_size: 512}"]
TINY_LLAVA = [f"model={ROOT / 'configs/model/tiny_llava.yaml'}", "model_overrides={vocab_size: 512}"]


def _tiny_cfg(*extra: str) -> TrainConfig:
    return load_config(TrainConfig, PRETRAIN, [*TINY, *extra])


def _one_real_step(cfg: TrainConfig):
    """The trainer's model (build, precision policy, AdamW param groups) after one real
    forward / backward / optimizer step on the CPU -> (model, optimizer)."""
    from _helpers import tiny_inputs
    from llama_vision.training.build import build_training_model
    from llama_vision.training.losses import lm_loss_sum
    from llama_vision.training.optim import stage_param_groups
    from llama_vision.training.precision import apply_precision, resolve_precision

    model = apply_precision(build_training_model(cfg, SimpleNamespace(n_words=512)), resolve_precision(cfg, "cpu"))
    model.train()
    o = cfg.optim
    optimizer = torch.optim.AdamW(stage_param_groups(model.named_parameters(), o.lr, o.weight_decay, o.gate_lr_multiplier), lr=o.lr)
    if model.modalities["image"].fusion == "projector":  # a LLaVA model: one image, its tokens' placeholders
        tokens, media = _llava_inputs(model)
        logits = model(tokens, media_inputs=media)
    else:
        tokens, images, ratios = tiny_inputs()
        logits = model(tokens, images, ratios)
    lm_loss_sum(logits, torch.randint(0, 512, tokens.shape)).backward()
    optimizer.step()
    return model, optimizer


def _llava_inputs(model, rows: int = 1, seq: int = 24, images_per_row: int = 1, seed: int = 0):
    """(tokens [rows, seq] holding each image's placeholders, media_inputs) for a LLaVA
    model: `images_per_row` square images of the tower's size per row."""
    g = torch.Generator().manual_seed(seed)
    p, n = model.modalities["image"].token_id, model.vision_model.tokens_per_item()
    size = model.vision_model.vision_encoder.image_size
    tokens = torch.randint(0, 500, (rows, seq), generator=g)
    for i in range(images_per_row):
        tokens[:, 1 + i * (n + 2): 1 + i * (n + 2) + n] = p
    pixels = torch.randn(rows, images_per_row, 1, 3, size, size, generator=g)
    return tokens, {"image": (pixels, torch.full((rows, images_per_row, 2), size))}


def _storage(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------- exact state


@pytest.mark.parametrize("frozen_dtype", ["fp32", "bf16"])
def test_weights_grads_and_adam_equal_a_real_models_storage(frozen_dtype):
    """DP = 1 on the CPU: the planner's bytes are those of the trainer's model (build,
    precision policy, AdamW param groups) after one real forward / backward / step."""
    cfg = _tiny_cfg(f"frozen_param_dtype={frozen_dtype}")
    model, optimizer = _one_real_step(cfg)

    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    if frozen_dtype == "bf16":
        assert {p.dtype for p in frozen} == {torch.bfloat16}
    state = [t for s in optimizer.state.values() for t in s.values()]
    assert len(state) == 3 * len(trainable)  # exp_avg, exp_avg_sq, step

    plan = plan_memory(cfg, gpus=1, device="cpu")
    assert plan.frozen_weights == _storage(frozen)
    assert plan.trainable_weights == _storage(trainable)
    assert plan.grads == _storage(p.grad for p in trainable)
    assert plan.optimizer == _storage(state)
    assert plan.fsdp_transient == 0 and plan.dp == 1 and plan.data_parallel == "none"


@pytest.mark.parametrize("trainable,frozen_dtype", [
    ("{decoder: false, vision: false, adapters: true}", "fp32"),  # LLaVA stage 1: the projector
    ("{decoder: true, vision: false, adapters: true}", "bf16"),  # LLaVA-1.5 stage 2: projector + LLM
    ("{decoder: false, vision: true, adapters: true}", "bf16"),  # the tower too (Carrot, OneVision)
])
def test_llava_weights_grads_and_adam_equal_a_real_models_storage(trainable, frozen_dtype):
    """A LLaVA model (CLIP tower + mlp2x_gelu projector, no cross-attention) at DP = 1 on
    the CPU: the planner's bytes are the trainer's model's after a real step, as for
    Meta's model. (At DP = 2 under FSDP: tests/test_training_cluster.py's DP family
    compares them with each rank's shards.)"""
    cfg = load_config(TrainConfig, LLAVA_PRETRAIN, [*TINY_LLAVA, f"trainable={trainable}", f"frozen_param_dtype={frozen_dtype}"])
    model, optimizer = _one_real_step(cfg)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is not None for p in trainable_params) and frozen
    state = [t for s in optimizer.state.values() for t in s.values()]
    assert len(state) == 3 * len(trainable_params)

    plan = plan_memory(cfg, gpus=1, device="cpu")
    assert plan.frozen_weights == _storage(frozen)
    assert plan.trainable_weights == _storage(trainable_params)
    assert plan.grads == _storage(p.grad for p in trainable_params)
    assert plan.optimizer == _storage(state)
    assert plan.batch.tower is not None and plan.batch.tower.tokens_per_image == 16


def test_llava_recipes_plan_with_the_towers_fsdp_units(capsys):
    """The 8B LLaVA recipes plan on 8 GPUs under FSDP (they failed on Meta's ViT layout):
    the tower's blocks are units of their own (the all-gather holds one block, not the
    tower), the plan names the tower's crops, and the CLI prints it."""
    from llama_vision.training.memory_plan import fsdp_unit_names

    spec = importlib.util.spec_from_file_location("plan_memory_cli", ROOT / "tools/plan_memory.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for name, tower_px in (("llava_pretrain", 336), ("llava_sft", 336), ("carrot_lora", 384)):
        cfg = load_config(TrainConfig, ROOT / "configs/train" / f"{name}.yaml")
        model = build_meta_model(cfg, 1, "cuda")
        owner, _ = fsdp_unit_names(model)
        assert owner["vision_model.vision_encoder.blocks.3.mlp.fc1.weight"] == "vision_model.vision_encoder.blocks.3"
        assert owner["vision_model.projector.linear_1.weight"] == "vision_model.projector"
        one, eight = plan_memory(cfg, gpus=1, device="cuda", model=model), plan_memory(cfg, gpus=8, device="cuda", model=model)
        assert eight.data_parallel == "fsdp" and eight.fsdp_transient > 0
        assert eight.weights == pytest.approx(one.weights / 8, rel=0.01)
        assert eight.batch.tower.image_size == tower_px and eight.activation_parts["decoder"] > 0
        assert cli.main(["--config", str(ROOT / "configs/train" / f"{name}.yaml"), "--gpus", "8"]) == 0
        out = capsys.readouterr().out
        assert "TP 1 x DP 8, FSDP" in out and f"image(s) x 1 crop(s) of {tower_px} px through the LLaVA tower" in out


def test_lora_line_is_the_adaptors_real_storage_and_count():
    """LoRA on the trunk (rank 4), everything else frozen: the planner's LoRA share equals
    the adaptors' weights + grads + AdamW state after a real step, and its parameter count
    is r * (in + out) per adapted projection, by hand."""
    from llama_vision.training.memory_plan import format_plan

    cfg = _tiny_cfg("lora={targets: [trunk_attention, trunk_mlp], rank: 4, alpha: 8}",
                    "trainable={decoder: false, vision: false, adapters: false, lora: true}")
    model, optimizer = _one_real_step(cfg)
    lora = [p for n, p in model.named_parameters() if ".adaptor." in n]
    assert lora and all(p.requires_grad for p in lora)
    state = [t for p in lora for t in optimizer.state[p].values()]

    plan = plan_memory(cfg, gpus=1, device="cpu")
    assert plan.lora_bytes == _storage(lora) + _storage(p.grad for p in lora) + _storage(state)
    a = model.args
    d, kv, ffn = a.dim, a.n_kv_heads * (a.dim // a.n_heads), a.ffn_hidden_dim
    per_layer = 4 * ((d + d) + 2 * (d + kv) + (d + d) + 3 * (d + ffn))
    assert plan.lora_params == a.n_layers * per_layer == sum(p.numel() for p in lora)
    assert "LoRA, in the above" in format_plan(plan)
    assert "LoRA" not in format_plan(plan_memory(_tiny_cfg(), gpus=1, device="cpu"))


# --------------------------------------------------------------------------- division rules


TOY = [
    ParamSpec("a", (10, 3), 4, True, "u1", True),  # fp32, trains
    ParamSpec("b", (7,), 2, False, "u2"),  # bf16, frozen
    ParamSpec("c", (2, 5), 4, True, ""),  # fp32, trains, the root's; dim 0 < DP
    ParamSpec("d", (16, 2), 2, False, "outer"),  # bf16, frozen, an enclosing unit's
]


def test_fsdp_shards_dim0_padded_to_a_multiple_of_dp():
    s = per_rank_state(TOY, 4, "fsdp", step_bytes=4, enclosing_units=frozenset({"outer"}))
    # rows per rank ceil(dim0 / 4): a 3 x 3, b 2, c 1 x 5 (ranks 2, 3 hold padding), d 4 x 2
    assert s.trainable_weights == (9 + 5) * 4
    assert s.frozen_weights == (2 + 8) * 2
    assert s.grads == (9 + 5) * 4
    assert s.optimizer == (9 + 5) * 8 + 2 * 4  # exp_avg + exp_avg_sq, one step per parameter
    # gathered: root (c: 40 B) + enclosing (d: 64 B) + the two largest other units (a: 120,
    # b: 14) + the largest unit's gradients (a: 120)
    assert s.fsdp_transient == 40 + 64 + 120 + 14 + 120


def test_zero1_keeps_weights_and_grads_whole_and_spreads_adam_greedily():
    s = per_rank_state(TOY, 4, "zero1", step_bytes=4)
    assert (s.trainable_weights, s.frozen_weights, s.grads) == ((30 + 10) * 4, (7 + 32) * 2, (30 + 10) * 4)
    assert s.fsdp_transient == 0
    assert s.optimizer == 30 * 8 + 4 and s.optimizer_rank == 0  # a alone on rank 0, c on rank 1
    # torch's rule: per group, largest first, onto the rank with the fewest elements (lowest
    # on ties); the sizes carry over from group to group.
    assert zero1_partition([[5, 30, 10, 10]], 2) == [[(0, 1)], [(0, 2), (0, 3), (0, 0)]]
    assert zero1_partition([[8, 8], [3, 9]], 2) == [[(0, 0), (1, 1)], [(0, 1), (1, 0)]]


def test_data_parallel_of_one_shards_nothing():
    for mode in ("fsdp", "zero1"):
        s = per_rank_state(TOY, 1, mode, step_bytes=0)
        assert (s.trainable_weights, s.frozen_weights, s.grads, s.optimizer, s.fsdp_transient) == (160, 78, 160, 320, 0)


def test_tensor_parallel_shards_follow_the_layer_factories():
    """Built as TP rank 0 of 2 and of 4 (tiny: dim 64, 4 heads of 16, 2 KV heads, vocab
    512): column-parallel weights split on dim 0, row-parallel on dim 1, K/V replicated
    once TP exceeds the KV heads; the groups are restored afterwards."""
    import model_parallel as mp

    cfg = _tiny_cfg()
    shapes = {tp: {p.name: p.shape for p in param_specs(build_meta_model(cfg, tp, "cpu"))} for tp in (1, 2, 4)}
    assert mp.tp_size() == 1 and not mp.is_model_parallel()
    layer = "text_model.layers.0."
    assert [shapes[tp][layer + "attention.wq.weight"] for tp in (1, 2, 4)] == [(64, 64), (32, 64), (16, 64)]
    assert [shapes[tp][layer + "attention.wk.weight"] for tp in (1, 2, 4)] == [(32, 64), (16, 64), (32, 64)]
    assert [shapes[tp][layer + "attention.wo.weight"] for tp in (1, 2, 4)] == [(64, 64), (64, 32), (64, 16)]
    assert [shapes[tp]["text_model.tok_embeddings.weight"] for tp in (1, 2, 4)] == [(512, 64), (256, 64), (128, 64)]
    assert shapes[4][layer + "attention_norm.weight"] == (64,)  # replicated
    plans = {tp: plan_memory(load_config(TrainConfig, PRETRAIN, [*TINY, f"tp={tp}"]), gpus=tp, device="cpu") for tp in (1, 2)}
    assert plans[1].params == plans[2].params  # the whole model, whatever the TP degree
    assert plans[2].frozen_weights < 0.6 * plans[1].frozen_weights
    with pytest.raises(ValueError, match=r"tp=2 does not divide the number of GPUs \(3\)"):
        plan_memory(load_config(TrainConfig, PRETRAIN, [*TINY, "tp=2"]), gpus=3, device="cpu")


def test_90b_plans_in_seconds_and_fsdp_divides_by_dp():
    import time

    cfg = load_config(TrainConfig, ROOT / "configs/train/image_sft.yaml",
                      [f"model={ROOT / 'configs/model/llama3_2_90b_vision.yaml'}", "tp=8"])
    t0 = time.perf_counter()
    model = build_meta_model(cfg, 8, "cuda")
    zero1 = plan_memory(load_config(TrainConfig, ROOT / "configs/train/image_sft.yaml",
                                    [f"model={ROOT / 'configs/model/llama3_2_90b_vision.yaml'}", "tp=8", "data_parallel=zero1"]),
                        gpus=16, device="cuda", model=model)
    fsdp = plan_memory(cfg, gpus=16, device="cuda", model=model)
    assert time.perf_counter() - t0 < 30
    assert 88e9 < fsdp.params < 89e9 and 17e9 < fsdp.trainable_params < 19e9
    # ~88.5B parameters / TP 8, frozen ones bf16 (2 B), trainable fp32 (4 B)
    whole = 2 * (fsdp.params - fsdp.trainable_params) + 4 * fsdp.trainable_params
    assert zero1.weights == pytest.approx(whole / 8, rel=0.01)
    assert fsdp.weights == pytest.approx(zero1.weights / 2, rel=0.001)  # DP = 2, padding aside
    assert fsdp.grads == pytest.approx(zero1.grads / 2, rel=0.001)
    assert zero1.optimizer >= 2 * zero1.grads / 2 and fsdp.optimizer == pytest.approx(2 * fsdp.grads, rel=1e-6)
    assert fsdp.fsdp_transient > 0 and zero1.fsdp_transient == 0
    assert fsdp.fits is None and "fit" not in format_plan(fsdp)  # no card given: no verdict


# --------------------------------------------------------------------------- activations


def _saved_bytes(model, fn) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while `fn` runs."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("trainable,images_per_row,over", [
    ({"vision", "adapters"}, 1, {}),
    ({"adapters"}, 1, {}),
    ({"vision"}, 1, {}),
    ({"decoder", "vision", "adapters"}, 1, {}),
    ({"decoder"}, 0, {}),  # text only
    ({"vision", "adapters"}, 2, {}),
    ({"vision", "adapters"}, 1, {"dim": 128, "n_heads": 8, "n_kv_heads": 2, "vision_width": 64, "vision_chunk_size": 56}),
])
def test_activation_estimate_matches_the_tensors_autograd_saves(trainable, images_per_row, over):
    """float32 on the CPU, no checkpointing: the estimate of what the forward keeps for
    backward (and the loss keeps: log-softmax) is within 3% of the real saved tensors."""
    import llama_vision
    from llama_vision.model import set_trainable
    from llama_vision.training.activation_memory import BatchShape, estimate_activations
    from llama_vision.training.losses import lm_loss_sum

    torch.manual_seed(0)
    model = llama_vision.build_model(tiny_params(**over))
    model.train()
    set_trainable(model, **{g: g in trainable for g in ("decoder", "vision", "adapters")})
    rows, seq, tiles, n = 2, 40, 4, images_per_row
    size = model.args.vision_chunk_size
    tokens, labels = torch.randint(0, 500, (rows, seq)), torch.randint(0, 500, (rows, seq))
    if n == 0:
        shape = BatchShape(rows, seq)
        got = _saved_bytes(model, lambda: lm_loss_sum(model(tokens), labels))
    else:
        tokens[:, [0, 20][:n]] = model.args.image_token_id
        images, ratios = torch.randn(rows, n, tiles, 3, size, size), torch.tensor([[[2, 2]] * n] * rows)
        shape = BatchShape(rows, seq, images=rows * n, images_per_row=n, tiles=tiles)
        got = _saved_bytes(model, lambda: lm_loss_sum(model(tokens, images, ratios), labels))
    est = estimate_activations(model.args, shape, trainable=frozenset(trainable), device_type="cpu")
    assert est.saved == pytest.approx(got, rel=0.03)


@pytest.mark.parametrize("trainable,images_per_row,over", [
    ({"adapters"}, 1, {}),  # LLaVA stage 1: the frozen tower keeps nothing, the decoder passes the gradient on
    ({"vision", "adapters"}, 1, {}),
    ({"vision"}, 1, {}),
    ({"decoder", "vision", "adapters"}, 1, {}),
    ({"vision", "adapters"}, 2, {}),
    ({"vision", "adapters"}, 1, {"projector": "linear"}),
    ({"vision", "adapters"}, 1, {"tower": {"kind": "siglip", "act": "gelu_tanh", "feature_select": "full",
                                           "feature_layer": -1, "post_layernorm": True}}),
    ({"vision", "adapters"}, 2, {"tower": {"width": 64, "heads": 4, "mlp_dim": 256, "image_size": 56}}),
])
def test_llava_activation_estimate_matches_the_tensors_autograd_saves(trainable, images_per_row, over):
    """A LLaVA model (float32 on the CPU, no checkpointing): the estimate is within 3% of
    the real saved tensors, and its tower + projector share (the difference a trainable
    tower makes) within 1%."""
    import llama_vision
    from llama_vision.model import set_trainable
    from llama_vision.training.activation_memory import BatchShape, TowerShape, estimate_activations
    from llama_vision.training.losses import lm_loss_sum

    base = yaml.safe_load((ROOT / "configs/model/tiny_llava.yaml").read_text())
    llava = {**base["llava"], **{k: v for k, v in over.items() if k != "tower"}}
    llava["tower"] = {**llava["tower"], **over.get("tower", {})}
    seq = 40 + images_per_row * (llava["tower"]["image_size"] // llava["tower"]["patch_size"]) ** 2

    def run(groups):
        torch.manual_seed(0)
        model = llama_vision.build_model({**base, "vocab_size": 512, "llava": llava})
        model.train()
        set_trainable(model, **{g: g in groups for g in ("decoder", "vision", "adapters")})
        tokens, media = _llava_inputs(model, rows=2, seq=seq, images_per_row=images_per_row)
        got = _saved_bytes(model, lambda: lm_loss_sum(model(tokens, media_inputs=media), torch.randint(0, 500, tokens.shape)))
        shape = BatchShape(2, seq, images=2 * images_per_row, images_per_row=images_per_row, tiles=1,
                           tower=TowerShape.of(model.vision_model))
        return got, estimate_activations(model.args, shape, trainable=frozenset(groups), device_type="cpu")

    got, est = run(trainable)
    assert est.saved == pytest.approx(got, rel=0.03)
    if "vision" in trainable:  # what training the tower adds
        got_frozen, est_frozen = run(trainable - {"vision"})
        assert est.saved - est_frozen.saved == pytest.approx(got - got_frozen, rel=0.01)


def test_activation_checkpointing_and_tp_shrink_the_estimate():
    from llama_vision.training.activation_memory import KINDS, BatchShape, estimate_activations
    from llama_vision.training.parallelize import CHECKPOINT_KINDS

    assert set(KINDS) == set(CHECKPOINT_KINDS)  # the planner knows the trainer's kinds
    cfg = _tiny_cfg()
    args = build_meta_model(cfg, 1, "cpu").args
    shape = BatchShape(4, 64, images=4, images_per_row=1, tiles=4)
    est = lambda **kw: estimate_activations(args, shape, **kw).parts  # noqa: E731
    plain, ckpt = est(), est(checkpointed=frozenset({"decoder", "vision"}))
    assert ckpt["decoder"] < plain["decoder"] / 2 and ckpt["vision"] < plain["vision"] / 2
    assert ckpt["adapters"] == plain["adapters"]
    assert est(tp=2)["adapters"] < plain["adapters"]
    with pytest.raises(ValueError, match="unknown activation-checkpointing kind"):
        estimate_activations(args, shape, checkpointed=frozenset({"mlp"}))


MEDIUM = {  # ~52M parameters, 13M trainable (ViT + adapters): ~0.5 GB planned in float32
    "dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 16384, "multiple_of": 128,
    "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": False, "max_seq_len": 256,
    "vision_chunk_size": 112, "vision_max_num_chunks": 4, "vision_num_cross_attention_layers": 2,
    "vision_width": 256, "vision_layers": 6, "vision_heads": 4, "vision_global_layers": 2,
    "vision_patch_size": 14, "vision_intermediate_layers": [1, 3, 5],
}


@linux_only
def test_planned_total_matches_the_rss_of_a_real_training_run(tmp_path):
    """A fresh process builds the medium model and trains 2 steps of 2 micro-batches
    (tests/plan_memory_rss_worker.py); its peak-RSS increase is within 20% of the CPU plan.
    glibc's mmap threshold is pinned so that freed large tensors leave the resident set (its
    adaptive default keeps them in the heap, which RSS counts though no tensor uses them)."""
    (tmp_path / "medium.yaml").write_text(yaml.safe_dump(MEDIUM))
    overrides = [f"model={tmp_path / 'medium.yaml'}", "micro_batch_size=2", "grad_accum_steps=2",
                 "data.max_seq_len=128", "data.max_num_tiles=2"]
    plan = plan_memory(load_config(TrainConfig, PRETRAIN, overrides), gpus=1, device="cpu")
    assert 0.25 < plan.activations / plan.total < 0.45  # the estimate carries real weight here
    # A clean environment: variables earlier tests left in this process (process-group
    # ranks, thread settings) must not reach the measured one.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests/plan_memory_rss_worker.py"), str(PRETRAIN), json.dumps(overrides)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["delta"]
    assert plan.total == pytest.approx(measured, rel=0.2), (plan.total, measured, format_plan(plan))


# --------------------------------------------------------------------------- the CLI


def test_cli_prints_a_plan_and_names_bad_values(capsys):
    spec = importlib.util.spec_from_file_location("plan_memory_cli", ROOT / "tools/plan_memory.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--config", str(PRETRAIN), *TINY, "--gpus", "2", "--gpu-memory-gib", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "TP 1 x DP 2, FSDP" in out and "activations (est.)" in out and "fits a 4.0 GiB card (with 2.0 GiB reserved)" in out
    assert cli.main(["--config", str(PRETRAIN), *TINY, "tp=3", "--gpus", "8"]) == 2
    assert "tp=3 does not divide the number of GPUs (8)" in capsys.readouterr().err
    assert cli.main(["--config", str(PRETRAIN), "tpp=2"]) == 2
    assert "unknown config key 'tpp'; did you mean 'tp'?" in capsys.readouterr().err
    assert cli.main(["--config", str(PRETRAIN), *TINY, "--json", "--device", "cpu", "--gpus", "1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total"] == sum(plan[k] for k in ("frozen_weights", "trainable_weights", "grads", "optimizer",
                                                  "fsdp_transient", "dpo_reference", "activations"))


def test_train_cli_profile_flag_sets_profile_steps(monkeypatch):
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "tools/train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    seen = []
    monkeypatch.setattr(cli, "train", lambda cfg, resume: seen.append((cfg.profile_steps, cfg.max_steps, resume)))
    cli.main(["--config", str(PRETRAIN), "--profile", "3", "max_steps=7", "--resume"])
    cli.main(["--config", str(PRETRAIN), "--profile=2"])
    cli.main(["--config", str(PRETRAIN)])
    assert seen == [(3, 7, True), (2, 30, False), (0, 30, False)]
    with pytest.raises(ValueError, match="--profile needs a number of steps"):
        cli.main(["--config", str(PRETRAIN), "--profile"])


# --------------------------------------------------------------------------- profiling


def _toy_loop(profiler, steps: int) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        model(torch.randn(16, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        profiler.step()


def test_step_profiler_writes_a_chrome_trace_and_a_summary(tmp_path):
    from llama_vision.training.profiling import StepProfiler

    with StepProfiler(tmp_path, steps=2, rank=3) as prof:
        _toy_loop(prof, 5)
    trace = tmp_path / "profile" / "rank_3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert prof.written and "aten::addmm" in names and any(str(n).startswith("ProfilerStep#") for n in names)
    # The warm-up step (#0) is discarded, the next two are recorded.
    assert {n for n in names if str(n).startswith("ProfilerStep#")} == {"ProfilerStep#1", "ProfilerStep#2"}
    summary = (tmp_path / "profile" / "rank_3.txt").read_text()
    assert "2 step(s) recorded" in summary and "aten::addmm" in summary
    assert not [p for p in (tmp_path / "profile").iterdir() if ".tmp-" in p.name]

    # A run that ends before the recording does still writes what was recorded.
    with StepProfiler(tmp_path / "short", steps=10) as short:
        _toy_loop(short, 3)
    assert json.loads((tmp_path / "short" / "profile" / "rank_0.json").read_text())["traceEvents"]

    off = StepProfiler(tmp_path / "off", steps=0)
    _toy_loop(off, 2)
    off.close()
    assert not off.enabled and not (tmp_path / "off").exists()


@linux_only
def test_cpu_peak_memory_is_the_peak_rss_in_bytes():
    from llama_vision.training.profiling import peak_memory_bytes, reset_peak_memory

    def hwm() -> int:  # the kernel's peak RSS, /proc/self/status VmHWM (kB)
        line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
        return int(line.split()[1]) * 1024

    assert reset_peak_memory("cpu")
    before = peak_memory_bytes("cpu")
    assert abs(before - hwm()) < 16 << 20
    big = torch.ones(256 << 20, dtype=torch.uint8)  # 256 MiB, touched
    assert peak_memory_bytes("cpu") >= before + (240 << 20)
    del big
    assert reset_peak_memory("cpu")
    assert peak_memory_bytes("cpu") < before + (128 << 20)
    with pytest.raises(ValueError, match="cuda and cpu"):
        peak_memory_bytes("meta")



def test_readme_table_is_the_planners():
    """README.md's "Memory per GPU" table is what `tools/plan_memory.py --table` prints
    (regenerate it with that command when the model or the planner changes)."""
    from llama_vision.training.memory_plan import readme_table

    assert readme_table(ROOT) in (ROOT / "README.md").read_text()
