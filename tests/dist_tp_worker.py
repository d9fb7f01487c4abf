"""Run under torchrun (2 processes, gloo): TP=2 logits equal TP=1 logits.

Each rank builds the TP=1 model first (same seed -> same weights on both ranks), then
joins the TP group, builds the sharded model and loads its slice of the full weights.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _helpers import tiny_model  # noqa: E402

import model_parallel  # noqa: E402
import llama_vision  # noqa: E402

IMG = 512


def main(out_path: str, overrides: dict) -> None:
    torch.manual_seed(0)
    full = tiny_model(seed=11, **overrides)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 1, 4, 3, 28, 28, generator=g)
    ar = torch.tensor([[[2, 2]], [[1, 3]]])
    tokens = torch.tensor([[IMG, 1, 2, 3, 4, 5, 6], [IMG, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        want = full(tokens, imgs, ar)
        want_text = full(tokens[:, 1:])
    full(tokens, imgs, ar).log_softmax(-1)[..., 5].sum().backward()
    want_grads = {n: p.grad.clone() for n, p in full.named_parameters() if p.grad is not None}

    model_parallel.init_model_parallel(2, backend="gloo")
    rank = model_parallel.tp_rank()
    torch.manual_seed(0)
    model = llama_vision.build_model(dict(full.args.__dict__), init=False)
    local = model_parallel.shard_state_dict(model, full.state_dict())
    model.load_state_dict(local, strict=True)
    model.eval()
    halves = {}
    runtime = model_parallel.shard_plan(model, "runtime")
    for key, dim in runtime.items():
        if dim is not None:
            halves[key] = list(model.state_dict()[key].shape) == [
                s // 2 if i == dim else s for i, s in enumerate(full.state_dict()[key].shape)
            ]
    with torch.no_grad():
        got = model(tokens, imgs, ar)
        got_text = model(tokens[:, 1:])
    model(tokens, imgs, ar).log_softmax(-1)[..., 5].sum().backward()
    import model_parallel.grads as G

    params = [p for p in model.parameters() if p.grad is not None]
    G.sync_gradients(params)
    local_want = model_parallel.shard_state_dict(model, want_grads)
    # Relative to the largest gradient of the model: a gate's gradient is a sum of many
    # cancelling terms, so its own magnitude is no scale for float-reassociation error.
    scale = max(float(g.abs().max()) for g in want_grads.values())
    grad_diff = {n: float((p.grad - local_want[n]).abs().max()) / scale
                 for n, p in model.named_parameters() if p.grad is not None}
    worst = max(grad_diff.items(), key=lambda kv: kv[1])
    # Sampling without a seed: each rank's own generator state differs, yet TP peers must
    # draw the same tokens (they run one model together).
    from llama_vision.generation import Generator

    torch.manual_seed(100 + rank)
    sampled = Generator(model).generate([[1, 2, 3], [4, 5]], max_new_tokens=6, temperature=1.0, stop_tokens=[])
    result = {
        "sampled": sampled,
        "grad_worst": worst,
        "rank": rank,
        "max_diff": float((got - want).abs().max()),
        "max_diff_text": float((got_text - want_text).abs().max()),
        "n_sharded": len(halves),
        "all_halves": all(halves.values()),
    }
    Path(f"{out_path}.{rank}").write_text(json.dumps(result))
    model_parallel.destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
