"""Peak host memory of `load_model`, one process per rank: run as a plain process (TP=1) or
under torchrun (TP=2, gloo). Started by test_checkpoint_tp_memory.py (or by hand).

argv: CHECKPOINT_DIR OUT_DIR [DTYPE [LAYOUT_DIR ...]]. Writes OUT_DIR/mem.tpT.rankR.json (RSS figures, KiB)
and OUT_DIR/logits.tpT.pt (rank 0): the model's logits for `inputs()` (the vocab-parallel
output gathered, as the model returns it at any TP degree).

RSS figures, each {"vm_rss", "vm_hwm", "ru_maxrss"} in KiB: `start` after the imports,
`before` right before `load_model` -- after the process group and a few meta-device ops,
whose first use imports torch's meta-tensor machinery (sympy & co., ~150 MiB once per
process, the same at every TP degree; nothing of the model is built) --, `loaded` after `load_model` returned, `forward`
after one forward pass over an image prompt (it reads every weight it uses, so mapped file
pages count by then). VmHWM is the high-water mark of this address space;
getrusage(RUSAGE_SELF).ru_maxrss is the same for a process started by exec unless its
parent's resident set was larger at the fork.

Under torchrun the worker also checks, after the measurement, that model_parallel's fairscale
layers (built without fairscale's constructors) match fairscale's constructors
(`fairscale_layers_match` in the json), and loads every LAYOUT_DIR (small checkpoints whose
TP=2 slices are strided views of the file's tensors: a one-file Meta dir, an HF dir):
`layouts` lists, per dir, the parameters that are not contiguous and the TP-split ones
that keep a larger storage alive (a whole un-permuted HF q/k behind a slice).
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch


def rss_kib() -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {
        "vm_rss": int(status["VmRSS"].split()[0]),
        "vm_hwm": int(status["VmHWM"].split()[0]),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def inputs(params: dict):
    """A 16-token prompt starting with the image token (row 0 of the learnable table), one
    image of 2x2 tiles."""
    g = torch.Generator().manual_seed(5)
    s, t = params["vision_chunk_size"], params["vision_max_num_chunks"]
    images = torch.zeros(1, 1, t, 3, s, s)
    images[0, 0, :4] = torch.randn(4, 3, s, s, generator=g)
    tokens = torch.cat([torch.tensor([params["vocab_size"]]), torch.randint(0, params["vocab_size"], (15,), generator=g)])
    return tokens[None], images, torch.tensor([[[2, 2]]])


@torch.no_grad()
def fairscale_layers_match() -> list[str]:
    """Differences between the factories' fairscale modules and fairscale's own constructors
    (class, plain attributes, parameter names / shapes / dtypes, zero bias, forward)."""
    from fairscale.nn.model_parallel import layers as fs

    import model_parallel as mp

    def same(ours, theirs, x, what) -> list[str]:
        bad = []
        if type(ours) is not type(theirs):
            bad.append(f"{what}: {type(ours).__name__} vs {type(theirs).__name__}")
        skip = {"_parameters", "tp_dims", "checkpoint_tp_dims"}
        a = {k: v for k, v in vars(ours).items() if k not in skip}
        b = {k: v for k, v in vars(theirs).items() if k not in skip}
        if a.keys() != b.keys():
            bad.append(f"{what}: attributes {sorted(a.keys() ^ b.keys())}")
        bad += [f"{what}.{k}: {a[k]!r} vs {b[k]!r}" for k in a.keys() & b.keys() if not isinstance(a[k], dict) and a[k] != b[k]]
        pa, pb = dict(ours.named_parameters()), dict(theirs.named_parameters())
        if [(k, v.shape, v.dtype) for k, v in pa.items()] != [(k, v.shape, v.dtype) for k, v in pb.items()]:
            bad.append(f"{what}: parameters {[(k, tuple(v.shape)) for k, v in pa.items()]} vs {[(k, tuple(v.shape)) for k, v in pb.items()]}")
        elif getattr(ours, "bias", None) is not None and bool(ours.bias.any()):
            bad.append(f"{what}: bias not zero")
        else:
            g = torch.Generator().manual_seed(0)
            for k, p in pb.items():
                p.copy_(torch.randn(p.shape, generator=g))
                pa[k].copy_(p)
            if not torch.equal(ours(x), theirs(x)):
                bad.append(f"{what}: forward differs")
        return bad

    keep = lambda w: w  # noqa: E731 -- fairscale's init hook, a no-op
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    bad = same(mp.column_parallel_linear(8, 6, bias=True), fs.ColumnParallelLinear(8, 6, bias=True, gather_output=False, init_method=keep), x, "column")
    bad += same(mp.column_parallel_linear(8, 6, gather_output=True), fs.ColumnParallelLinear(8, 6, bias=False, gather_output=True, init_method=keep), x, "column_gathered")
    bad += same(mp.row_parallel_linear(8, 6, bias=True), fs.RowParallelLinear(8, 6, bias=True, input_is_parallel=True, init_method=keep), x[:, :4], "row")
    bad += same(mp.vocab_parallel_embedding(10, 4), fs.VocabParallelEmbedding(10, 4, init_method=keep), torch.tensor([[0, 3, 5, 9]]), "vocab")
    with torch.device("meta"):
        on_meta = [mp.column_parallel_linear(8, 6, bias=True), mp.row_parallel_linear(8, 6), mp.vocab_parallel_embedding(10, 4)]
    bad += [f"{type(m).__name__} has non-meta tensors" for m in on_meta if not all(p.is_meta for p in m.parameters())]
    return bad


@torch.no_grad()
def layout_problems(path: Path) -> dict[str, list[str]]:
    import model_parallel as mp
    from llama_vision.checkpoint import load_model

    model = load_model(path, tp=mp.tp_size())
    split = mp.shard_plan(model, "runtime")
    params = dict(model.named_parameters())
    return {
        "not_contiguous": [n for n, p in params.items() if not p.is_contiguous()],
        "larger_storage": [n for n, p in params.items() if split.get(n) is not None and p.untyped_storage().nbytes() > p.numel() * p.element_size()],
    }


@torch.no_grad()
def main(ckpt: Path, out: Path, dtype: torch.dtype, layout_dirs: list[Path]) -> None:
    import model_parallel as mp
    from llama_vision.checkpoint import checkpoint_params, load_model

    start = rss_kib()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        mp.init_model_parallel(world, backend="gloo")
    rank = mp.tp_rank()
    params = checkpoint_params(ckpt)
    args = inputs(params)
    with torch.device("meta"):  # warm-up: the first meta-device ops import ~900 modules
        torch.nn.Embedding(8, 8), torch.nn.Linear(8, 8), torch.randn(8)
    before = rss_kib()
    model = load_model(ckpt, tp=world, dtype=dtype)
    loaded = rss_kib()
    logits = model(*args)
    forward = rss_kib()
    result = {"tp": world, "rank": rank, "start": start, "before": before, "loaded": loaded, "forward": forward,
              "dtype": str(dtype), "param_dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    if world > 1:
        result["fairscale_layers_match"] = fairscale_layers_match()
        result["layouts"] = {d.name: layout_problems(d) for d in layout_dirs}
    (out / f"mem.tp{world}.rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        torch.save(logits, out / f"logits.tp{world}.pt")
    if world > 1:
        mp.barrier()
        mp.destroy_model_parallel()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.float32,
         [Path(d) for d in sys.argv[4:]])
