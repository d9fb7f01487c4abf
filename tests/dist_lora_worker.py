"""Run under torchrun (2 processes, gloo): a LoRA model at TP=2 equals the TP=1 one.

Each rank builds the TP=1 models first (K/V column-parallel, and n_kv_heads=1: K/V
replicated across TP), with LoRA on every shorthand and random non-zero B; then joins the
TP group, builds the sharded models, adds LoRA (its fresh A must be the slice of the TP=1
A: the init is TP-invariant), loads its slice of the TP=1 weights and checks: A/B shard
shapes of a column- (wq, w1) and a row-parallel (wo, w2) base, logits, LoRA gradients
after the TP gradient sync, merged logits, save_lora's whole tensors, load_lora onto a
plain TP=2 base. Writes a JSON report per rank to `<out>.<rank>`.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _helpers import tiny_model  # noqa: E402

import model_parallel  # noqa: E402
import model_parallel.grads as G  # noqa: E402
import llama_vision  # noqa: E402
from llama_vision.checkpoint import load_lora, save_lora  # noqa: E402
from llama_vision.model.lora import apply_lora, lora_modules, lora_state_dict, merge_lora  # noqa: E402

IMG = 512
TARGETS = ["trunk_attention", "trunk_mlp", "adapters", "vision"]
RANK, ALPHA = 4, 8.0


def inputs():
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 1, 4, 3, 28, 28, generator=g)
    ar = torch.tensor([[[2, 2]], [[1, 3]]])
    tokens = torch.tensor([[IMG, 1, 2, 3, 4, 5, 6], [IMG, 7, 8, 9, 10, 11, 12]])
    return tokens, imgs, ar


def loss(model, tokens, imgs, ar):
    return model(tokens, imgs, ar).log_softmax(-1)[..., 5].sum()


def tp1_reference(overrides: dict) -> dict:
    full = tiny_model(seed=11, **overrides)
    apply_lora(full, TARGETS, rank=RANK, alpha=ALPHA, seed=3)
    init_a = {k: v.clone() for k, v in lora_state_dict(full).items() if k.endswith("A.weight")}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for host in lora_modules(full).values():
            host.adaptor.B.weight.copy_(0.05 * torch.randn(host.adaptor.B.weight.shape, generator=g))
    tokens, imgs, ar = inputs()
    with torch.no_grad():
        logits = full(tokens, imgs, ar)
    loss(full, tokens, imgs, ar).backward()
    grads = {n: p.grad.clone() for n, p in full.named_parameters() if ".adaptor." in n}
    merged = copy.deepcopy(full)
    merge_lora(merged)
    plain = copy.deepcopy(full)  # without its LoRA: B zeroed
    with torch.no_grad():
        merged_logits = merged(tokens, imgs, ar)
        for host in lora_modules(plain).values():
            host.adaptor.B.weight.zero_()
        effect = float((plain(tokens, imgs, ar) - logits).abs().max())
    return {"model": full, "init_a": init_a, "logits": logits, "grads": grads, "merged_logits": merged_logits,
            "lora_effect": effect}


def check(ref: dict, out_dir: Path) -> dict:
    full = ref["model"]
    rank = model_parallel.tp_rank()
    tokens, imgs, ar = inputs()
    model = llama_vision.build_model(dict(full.args.__dict__), init=False)
    apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA, seed=3)
    fresh_a_is_slice = all(
        torch.equal(model.state_dict()[k], v) for k, v in model_parallel.shard_state_dict(model, ref["init_a"]).items()
    )
    model.load_state_dict(model_parallel.shard_state_dict(model, full.state_dict()), strict=True)
    model.eval()
    sd = model.state_dict()
    dim, heads = full.args.dim, full.args.n_heads * full.args.head_dim
    hidden = full.args.ffn_hidden_dim
    layer = "text_model.layers.1"
    shapes = {k: list(sd[k].shape) for k in sd if k.startswith(layer) and ".adaptor." in k}
    want_shapes = {
        f"{layer}.attention.wq.adaptor.A.weight": [RANK, dim],  # column: A replicated
        f"{layer}.attention.wq.adaptor.B.weight": [heads // 2, RANK],  # ... B split on out
        f"{layer}.attention.wo.adaptor.A.weight": [RANK, heads // 2],  # row: A split on in
        f"{layer}.attention.wo.adaptor.B.weight": [dim, RANK],  # ... B replicated
        f"{layer}.feed_forward.w1.adaptor.A.weight": [RANK, dim],
        f"{layer}.feed_forward.w1.adaptor.B.weight": [hidden // 2, RANK],
        f"{layer}.feed_forward.w3.adaptor.A.weight": [RANK, dim],
        f"{layer}.feed_forward.w3.adaptor.B.weight": [hidden // 2, RANK],
        f"{layer}.feed_forward.w2.adaptor.A.weight": [RANK, hidden // 2],
        f"{layer}.feed_forward.w2.adaptor.B.weight": [dim, RANK],
    }
    kv = full.args.n_kv_heads * full.args.head_dim
    kv_split = full.args.n_kv_heads >= 2
    for w in ("wk", "wv"):  # column-parallel K/V: B split; replicated K/V (TP > n_kv_heads): both whole
        want_shapes[f"{layer}.attention.{w}.adaptor.A.weight"] = [RANK, dim]
        want_shapes[f"{layer}.attention.{w}.adaptor.B.weight"] = [kv // 2 if kv_split else kv, RANK]
    plan = model_parallel.shard_plan(model, "runtime")
    lora_plan = {k: plan[k] for k in want_shapes}

    with torch.no_grad():
        logits = model(tokens, imgs, ar)
    loss(model, tokens, imgs, ar).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    G.sync_gradients(params)
    want_grads = model_parallel.shard_state_dict(model, ref["grads"])
    scale = max(float(g.abs().max()) for g in ref["grads"].values())
    grad_diff = {n: float((p.grad - want_grads[n]).abs().max()) / scale for n, p in model.named_parameters() if n in want_grads}
    grads_missing = sorted(set(want_grads) - {n for n, p in model.named_parameters() if p.grad is not None})
    worst = max(grad_diff.items(), key=lambda kv: kv[1])

    # save_lora gathers the TP shards into the whole tensors.
    from safetensors.torch import load_file

    save_lora(model, out_dir)
    model_parallel.barrier()
    saved = load_file(str(out_dir / "lora.safetensors"))
    want_saved = lora_state_dict(full)
    saved_equal = set(saved) == set(want_saved) and all(torch.equal(saved[k], want_saved[k]) for k in want_saved)

    # load_lora onto a plain TP=2 base.
    base = llama_vision.build_model(dict(full.args.__dict__), init=False)
    base_sd = {k: v for k, v in full.state_dict().items() if ".adaptor." not in k}
    base.load_state_dict(model_parallel.shard_state_dict(base, base_sd), strict=True)
    load_lora(base, out_dir)
    with torch.no_grad():
        loaded_logits = base.eval()(tokens, imgs, ar)
        merge_lora(model)  # per rank, each W shard with its own B A
        merged_logits = model(tokens, imgs, ar)
    return {
        "rank": rank,
        "fresh_a_is_slice": fresh_a_is_slice,
        "shapes": shapes,
        "want_shapes": want_shapes,
        "lora_plan": lora_plan,
        "max_diff": float((logits - ref["logits"]).abs().max()),
        "tp1_merged_diff": float((ref["logits"] - ref["merged_logits"]).abs().max()),
        "lora_effect": ref["lora_effect"],
        "grad_worst": worst,
        "grads_missing": grads_missing,
        "n_lora_grads": len(grad_diff),
        "merged_diff": float((merged_logits - ref["logits"]).abs().max()),
        "saved_equal": saved_equal,
        "loaded_diff": float((loaded_logits - ref["logits"]).abs().max()),
    }


def main(out_path: str) -> None:
    torch.manual_seed(0)
    refs = {name: tp1_reference(o) for name, o in (("kv_sharded", {}), ("kv_replicated", {"n_kv_heads": 1}))}
    model_parallel.init_model_parallel(2, backend="gloo")
    rank = model_parallel.tp_rank()
    report = {}
    for name, ref in refs.items():
        d = Path(f"{out_path}.{name}.lora")
        report[name] = check(ref, d)
    Path(f"{out_path}.{rank}").write_text(json.dumps(report))
    model_parallel.destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
