"""LoRA (llama_vision.model.lora): the forward is base + (alpha/r) B A x, a fresh adaptor
changes nothing bitwise, merge/unmerge (float32 and what a bf16 base guarantees), TP=2
equals TP=1 with each rank's A/B shards checked, only the LoRA tensors (and the groups a
config names) train, and a tiny LoRA SFT run lowers the loss, resumes bitwise and saves
final/ merged plus its adaptors, which load back onto the base and export through the
converters."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import ROOT, run_torchrun, tiny_inputs, tiny_model, tiny_params, tiny_train_overrides
from llama_vision.config import load_config
from llama_vision.model.lora import (
    apply_lora,
    lora_from_meta_args,
    lora_modules,
    merge_lora,
    merged_state_dict,
    resolve_targets,
    unmerge_lora,
)
from llama_vision.training.train_config import TrainConfig

ALL = ["trunk_attention", "trunk_mlp", "adapters", "vision"]
WORKER = Path(__file__).resolve().parent / "dist_lora_worker.py"
SFT_LORA = ROOT / "configs/train/tiny_image_sft_lora.yaml"


@torch.no_grad()
def _random_b(model, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for host in lora_modules(model).values():
        b = host.adaptor.B.weight
        b.copy_(scale * torch.randn(b.shape, generator=g))


def _logits(model):
    tokens, imgs, ar = tiny_inputs()
    tokens[0, 0] = model.args.image_token_id  # (the trained models' vocabulary is the corpus tokenizer's)
    with torch.no_grad():
        return model(tokens, imgs, ar)


def test_forward_is_base_plus_scaled_b_a_x():
    from model_parallel import column_parallel_linear

    torch.manual_seed(0)
    net = nn.Sequential(column_parallel_linear(8, 6, bias=True))
    nn.init.normal_(net[0].bias)
    (name,) = apply_lora(net, ["0"], rank=3, alpha=6.0)
    host = net[0]
    assert name == "0" and host.adaptor.A.weight.shape == (3, 8) and host.adaptor.B.weight.shape == (6, 3)
    assert torch.count_nonzero(host.adaptor.B.weight) == 0 and torch.count_nonzero(host.adaptor.A.weight) == 24
    with torch.no_grad():
        host.adaptor.B.weight.normal_()
    x = torch.randn(5, 8)
    a, b = host.adaptor.A.weight, host.adaptor.B.weight
    want = x @ host.weight.T + host.bias + (6.0 / 3) * (x @ a.T) @ b.T
    torch.testing.assert_close(net(x), want, atol=1e-6, rtol=1e-6)
    # Dropout hits the adaptor's input only, in training mode.
    drop = nn.Sequential(nn.Linear(8, 6))
    apply_lora(drop, ["0"], rank=3, alpha=6.0, dropout=0.5)
    with torch.no_grad():
        drop[0].adaptor.B.weight.normal_()
    torch.manual_seed(1)
    got = drop.train()(x)
    torch.manual_seed(1)
    mask = F.dropout(torch.ones_like(x), 0.5, training=True)
    ad = drop[0].adaptor
    torch.testing.assert_close(got, F.linear(x, drop[0].weight, drop[0].bias) + 2.0 * ((x * mask) @ ad.A.weight.T) @ ad.B.weight.T)
    torch.testing.assert_close(drop.eval()(x), F.linear(x, drop[0].weight, drop[0].bias) + 2.0 * (x @ ad.A.weight.T) @ ad.B.weight.T)


def test_targets_shorthands_and_errors():
    model = tiny_model(seed=1)
    names = resolve_targets(model, ["trunk_attention"])
    assert len(names) == 4 * model.args.n_layers and all(n.startswith("text_model.layers.") for n in names)
    mlp = resolve_targets(model, ["trunk_mlp"])
    assert {n.rsplit(".", 1)[-1] for n in mlp} == {"w1", "w2", "w3"}
    adapters = resolve_targets(model, ["adapters"])
    assert "vision_model.vision_projection" in adapters and all(
        n.startswith(("text_model.cross_attention_layers.", "vision_model.vision_projection")) for n in adapters)
    vision = resolve_targets(model, ["vision"])
    assert vision and all(n.startswith("vision_model.vision_encoder.") for n in vision)
    assert resolve_targets(model, ["text_model.layers.*.attention.wq"]) == [f"text_model.layers.{i}.attention.wq" for i in range(4)]
    with pytest.raises(ValueError, match="matches no linear"):
        resolve_targets(model, ["text_model.layers.*.attention.wqq"])
    apply_lora(model, ["trunk_attention"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, ["trunk_mlp"])
    # Meta's params.json lora_args ({rank, scale}: y = W x + scale B A x) -> the lora: block.
    assert lora_from_meta_args({"rank": 16, "scale": 2.0}) == {
        "targets": ["trunk_attention", "trunk_mlp"], "rank": 16, "alpha": 32.0, "dropout": 0.0}
    from llama_vision.training.build import stage_lora

    assert stage_lora(TrainConfig()) is None
    assert stage_lora(TrainConfig(), {"rank": 16, "scale": 2.0})["alpha"] == 32.0  # the model's params.json
    explicit = load_config(TrainConfig, SFT_LORA)
    assert stage_lora(explicit, {"rank": 16, "scale": 2.0}) == {  # an explicit lora: block wins
        "targets": ["trunk_attention", "trunk_mlp"], "rank": 4, "alpha": 8.0, "dropout": 0.0}


def test_fresh_lora_is_bitwise_a_no_op_also_on_a_bf16_base():
    from llama_vision.training.precision import PrecisionPolicy, apply_precision

    import llama_vision

    base = tiny_model(seed=2)
    lora = copy.deepcopy(base)
    apply_lora(lora, ALL, rank=4, alpha=8)
    assert torch.equal(_logits(lora), _logits(base))
    # Frozen trunk stored in bf16 (the GPU policy, here without autocast): the LoRA'd
    # linears keep their bf16 base weights, A and B stay float32 masters.
    policy = PrecisionPolicy(frozen_param_dtype=torch.bfloat16)
    for m in (base, lora):
        llama_vision.set_trainable(m, decoder=False, vision=True, adapters=True)
        apply_precision(m, policy)
    wq = lora.text_model.layers[0].attention.wq
    assert wq.weight.dtype == torch.bfloat16 and wq.adaptor.A.weight.dtype == wq.adaptor.B.weight.dtype == torch.float32
    assert torch.equal(_logits(lora), _logits(base))
    _random_b(lora)
    assert (_logits(lora) - _logits(base)).abs().max() > 1e-3  # and the adaptors act


def test_merge_unmerge_float32():
    model = tiny_model(seed=3)
    apply_lora(model, ALL, rank=4, alpha=8, seed=1)
    _random_b(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = _logits(model)
    plain = tiny_model(seed=3)
    assert (unmerged - _logits(plain)).abs().max() > 1e-3
    # merged_state_dict: the plain model's keys, the same function.
    plain.load_state_dict(merged_state_dict(model), strict=True)
    torch.testing.assert_close(_logits(plain), unmerged, atol=1e-5, rtol=0)
    assert merge_lora(model) == len(lora_modules(model)) and merge_lora(model) == 0
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=0)
    assert unmerge_lora(model) == len(lora_modules(model))
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0, msg=n)


def test_merge_on_a_bf16_base_rounds_once_and_unmerge_is_within_one_ulp():
    """bf16 base: merged W is bf16(W + D) (D = alpha/r B A in float32), bitwise; unmerge
    gives bf16(bf16(W + D) - D): within one bf16 ulp of |W + D| of W, bitwise W where D = 0."""
    model = tiny_model(seed=4)
    apply_lora(model, ["trunk_attention", "trunk_mlp"], rank=4, alpha=8, seed=1)
    model.to(torch.bfloat16)
    for host in lora_modules(model).values():
        host.adaptor.float()
    _random_b(model, scale=0.2)
    hosts = lora_modules(model)
    # One adaptor keeps B = 0: its weight must come back bitwise.
    zero = hosts["text_model.layers.0.attention.wq"]
    with torch.no_grad():
        zero.adaptor.B.weight.zero_()
    w0 = {n: h.weight.detach().clone() for n, h in hosts.items()}
    deltas = {n: h.adaptor.delta() for n, h in hosts.items()}
    merge_lora(model)
    eps = torch.finfo(torch.bfloat16).eps  # 2^-7: ulp(x) <= eps * |x|
    for n, h in hosts.items():
        exact = w0[n].float() + deltas[n]
        assert torch.equal(h.weight, exact.to(torch.bfloat16)), n
    unmerge_lora(model)
    for n, h in hosts.items():
        exact = (w0[n].float() + deltas[n]).abs()
        err = (h.weight.float() - w0[n].float()).abs()
        assert bool((err <= eps * torch.maximum(exact, w0[n].float().abs()) + 1e-30).all()), n
        same = deltas[n] == 0
        assert torch.equal(h.weight[same], w0[n][same]), n
    assert torch.equal(zero.weight, w0["text_model.layers.0.attention.wq"])
    assert any(not torch.equal(h.weight, w0[n]) for n, h in hosts.items())  # not bitwise in general


def test_tp2_equals_tp1_with_column_and_row_shards(tmp_path):
    out = tmp_path / "result"
    run_torchrun(WORKER, str(out))
    for rank in (0, 1):
        report = json.loads(Path(f"{out}.{rank}").read_text())
        for kind, r in report.items():
            assert r["fresh_a_is_slice"], (kind, rank)  # the init is TP-invariant
            assert r["shapes"] == r["want_shapes"], (kind, rank, r["shapes"])
            plan = r["lora_plan"]
            assert plan["text_model.layers.1.attention.wq.adaptor.A.weight"] is None
            assert plan["text_model.layers.1.attention.wq.adaptor.B.weight"] == 0
            assert plan["text_model.layers.1.attention.wo.adaptor.A.weight"] == 1
            assert plan["text_model.layers.1.attention.wo.adaptor.B.weight"] is None
            assert r["lora_effect"] > 1e-2
            assert r["max_diff"] < 1e-5 and r["tp1_merged_diff"] < 1e-5 and r["merged_diff"] < 1e-5, (kind, r)
            assert r["n_lora_grads"] > 100 and not r["grads_missing"] and r["grad_worst"][1] < 1e-5, (kind, r["grad_worst"])
            assert r["saved_equal"] and r["loaded_diff"] < 1e-5, (kind, r)


def test_configs_load_and_the_11b_targets_resolve():
    import llama_vision

    cfg = load_config(TrainConfig, ROOT / "configs/train/image_sft_lora.yaml")
    assert cfg.lora.targets == ["trunk_attention", "trunk_mlp"] and (cfg.lora.rank, cfg.lora.alpha) == (16, 32.0)
    t = cfg.trainable
    assert (t.decoder, t.vision, t.adapters, t.lora) == (False, True, True, True) and cfg.stage == "sft"
    tiny = load_config(TrainConfig, SFT_LORA)
    assert tiny.lora.targets == ["trunk_attention", "trunk_mlp"] and tiny.stage == "sft"
    from llama_vision.training.build import load_model_params

    params = {**load_model_params(str(ROOT / cfg.model)), **cfg.model_overrides, "vocab_size": 128256}
    model = llama_vision.build_model(params, device="meta")
    names = apply_lora(model, cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    assert len(names) == 7 * model.args.n_layers
    counts = llama_vision.set_trainable(model, decoder=False, vision=True, adapters=True)
    assert counts["lora"] == sum(16 * (a + b) for a, b in (
        tuple(m.weight.shape[::-1]) for n in names for m in [model.get_submodule(n)]))


# --- training ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(shapes_corpus, tmp_path_factory):
    """A LoRA-only tiny SFT run (vision and adapters frozen) from a saved random base, 8
    steps, checkpoint at 4, final/ saved; its trainer and the gradients it saw."""
    import llama_vision
    from llama_vision.checkpoint import save_meta_checkpoint
    from llama_vision.data.synthetic.chat_sets import write_chat_sets
    from llama_vision.tokenizer import load_tokenizer
    from llama_vision.training.trainer import Trainer

    root = tmp_path_factory.mktemp("lora")
    chat = write_chat_sets(root / "chat", n=24)
    n_words = load_tokenizer(shapes_corpus["tokenizer"]).n_words
    base = llama_vision.build_model(tiny_params(vocab_size=n_words), seed=5)
    save_meta_checkpoint(base, root / "base")
    overrides = dict(max_steps=8, checkpoint_every=4, keep_last=5, init_from=root / "base", micro_batch_size=4,
                     **{"data.paths": f'["{chat["sft"]}"]', "data.shuffle": "false", "trainable.vision": "false",
                        "trainable.adapters": "false", "optim.lr": 3e-3, "optim.warmup_steps": 1})
    cfg = load_config(TrainConfig, SFT_LORA, tiny_train_overrides(shapes_corpus, root / "run", **overrides))
    trainer = Trainer(cfg)
    got_grad: set[str] = set()
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:  # (a frozen tensor takes no hook: it never gets a gradient)
            p.register_hook(lambda g, n=n: got_grad.add(n))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    return {"root": root, "trainer": trainer, "got_grad": got_grad, "before": before, "overrides": overrides,
            "corpus": shapes_corpus}


def test_lora_sft_trains_only_lora_and_lowers_the_loss(lora_run):
    from llama_vision.training.metrics import read_metrics

    trainer = lora_run["trainer"]
    model = trainer.model
    lora = {n for n, _ in model.named_parameters() if ".adaptor." in n}
    assert lora and lora_run["got_grad"] == lora  # gradients reach the LoRA tensors only
    assert all(p.requires_grad == (n in lora) and p.grad is None for n, p in model.named_parameters())
    assert {id(p) for p in trainer.optimizer.state} == {id(p) for n, p in model.named_parameters() if n in lora}
    assert {id(p) for p in trainer.params} == {id(p) for n, p in model.named_parameters() if n in lora}
    for n, p in model.named_parameters():
        if n in lora:
            if n.endswith("B.weight"):
                assert not torch.equal(p, lora_run["before"][n]), n
        else:
            assert torch.equal(p, lora_run["before"][n]), n
    losses = [m["loss"] for m in read_metrics(lora_run["root"] / "run" / "metrics.jsonl")]
    print(losses)
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


def test_lora_sft_resumes_bitwise(lora_run, shapes_corpus):
    from llama_vision.training.dcp_checkpoint import read_tensors
    from llama_vision.training.metrics import read_metrics
    from llama_vision.training.trainer import train

    root = lora_run["root"]
    out = root / "resumed"
    cfg = load_config(TrainConfig, SFT_LORA, tiny_train_overrides(
        shapes_corpus, out, save_final="false", resume_from=root / "run" / "checkpoints" / "step_4", **lora_run["overrides"]))
    train(cfg)
    want = read_metrics(root / "run" / "metrics.jsonl")[4:]
    got = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(5, 9))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    ref, res = read_tensors(root / "run" / "checkpoints" / "step_8", "model."), read_tensors(out / "checkpoints" / "step_8", "model.")
    assert set(ref) == set(res) and all(".adaptor." in k for k in ref)
    for k in ref:
        assert torch.equal(ref[k], res[k]), k


def test_final_is_merged_and_the_adaptors_load_onto_the_base_and_export(lora_run, tmp_path):
    from llama_vision.checkpoint import convert_checkpoint, export_merged, load_base, load_lora, load_model, read_lora_config

    trainer = lora_run["trainer"]
    final = lora_run["root"] / "run" / "final"
    config = read_lora_config(final)
    assert (config["rank"], config["alpha"]) == (4, 8.0) and config["targets"] == ["trunk_attention", "trunk_mlp"]
    assert config["base_checkpoint"] == str((lora_run["root"] / "base").resolve()) and config["also_trained"] == []
    assert len(config["modules"]) == 7 * trainer.model.args.n_layers
    trained = _logits(trainer.model.eval())
    merged = load_model(final)  # a plain model: LoRA merged into final/'s weights
    assert not any(".adaptor." in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged), trained, atol=1e-5, rtol=0)
    base = load_base(final)
    assert (_logits(base) - trained).abs().max() > 1e-4
    load_lora(base, final)
    torch.testing.assert_close(_logits(base), trained, atol=1e-5, rtol=0)
    hf = export_merged(final, tmp_path / "hf", to="hf")
    torch.testing.assert_close(_logits(load_model(hf)), trained, atol=1e-5, rtol=0)
    meta = convert_checkpoint(hf, tmp_path / "meta", "meta")
    torch.testing.assert_close(_logits(load_model(meta)), trained, atol=1e-5, rtol=0)


def test_lazy_build_equals_eager_with_lora_on_a_bf16_base(lora_run):
    """build_training_model(lazy=True) (the Trainer's path: adaptors added to the loaded,
    memory-mapped base) is bitwise the eager build; under the bf16 policy the LoRA'd base
    weights are bf16 and the adaptors float32 with their dtype hooks (a forward runs)."""
    from llama_vision.tokenizer import load_tokenizer
    from llama_vision.training.build import build_training_model
    from llama_vision.training.precision import PrecisionPolicy

    cfg = load_config(TrainConfig, SFT_LORA, tiny_train_overrides(lora_run["corpus"], lora_run["root"] / "lazy",
                                                                  init_from=lora_run["root"] / "base"))
    tok = load_tokenizer(cfg.tokenizer)
    eager = dict(build_training_model(cfg, tok).named_parameters())
    policy = PrecisionPolicy(frozen_param_dtype=torch.bfloat16)
    lazy_model = build_training_model(cfg, tok, lazy=True, precision=policy)
    lazy = dict(lazy_model.named_parameters())
    assert eager.keys() == lazy.keys() and any(".adaptor." in n for n in lazy)
    for n, p in eager.items():
        q = lazy[n]
        assert q.requires_grad == p.requires_grad, n
        if n.startswith("text_model.layers."):
            assert p.requires_grad == (".adaptor." in n), n
        want = p.detach() if p.requires_grad else p.detach().to(torch.bfloat16)
        assert q.dtype == want.dtype and torch.equal(q.detach(), want), n
    assert lazy_model.text_model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    # The config's trainable groups are LoRA + what it names (vision, adapters); the trunk is frozen.
    from llama_vision.model.trainability import trainable_groups

    on = {g for g, ps in trainable_groups(lazy_model).items() if ps and all(p.requires_grad for _, p in ps)}
    off = {g for g, ps in trainable_groups(lazy_model).items() if not any(p.requires_grad for _, p in ps)}
    assert on == {"lora", "vision", "adapters"} and off == {"decoder"}
    logits = _logits(lazy_model.eval())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
