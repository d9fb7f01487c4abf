"""The codebase's shape: no import cycles (lazy, function-level imports included), process
groups and fairscale only under model_parallel/, and modalities added to a built model
start from the weights build_model gives."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from _helpers import ROOT, tiny_params

PACKAGES = ("llama_vision", "model_parallel")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the packages that `name` imports, anywhere in the file (lazy ones too)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` imports the submodule when there is one.
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` -> the deepest known module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_no_import_cycles():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(n: str) -> None:  # depth-first; an edge back onto the path closes a cycle
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_only_model_parallel_touches_fairscale_and_process_groups():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("model_parallel"):
            continue
        text = path.read_text()
        for needle in ("import fairscale", "from fairscale", "torch.distributed import", "import torch.distributed"):
            if needle in text:
                offenders.append(f"{name}: {needle}")
    assert not offenders, offenders


def test_adding_video_to_a_built_model_gives_build_models_weights():
    """The trainer adds video to a built image model; build_model re-adds it from params:
    both give the same weights, and the video adapters do not copy the image adapters'."""
    import llama_vision
    from llama_vision.model.video import VideoConfig, add_video_adapters

    cfg = VideoConfig(num_frames=4, frames_per_group=2, tiles_per_frame=1, n_latents=3, depth=1, heads=4, every_k_image_layers=1)
    added = llama_vision.build_model(tiny_params(), seed=5)
    add_video_adapters(added, cfg, seed=5)
    built = llama_vision.build_model({**tiny_params(), "video": dict(vars(cfg))}, seed=5)
    a, b = added.state_dict(), built.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    img = a["text_model.cross_attention_layers.0.attention.wq.weight"]
    vid = a["text_model.video_cross_attention_layers.0.attention.wq.weight"]
    assert not torch.equal(img, vid)


def test_parallelize_switches_activation_checkpointing_on_from_outside():
    """Every layer stack checkpoints (decoder, the ViT's local and global transformers),
    names unchanged, gradients equal to the plain run."""
    from _helpers import tiny_inputs, tiny_model
    from llama_vision.training.parallelize import apply_activation_checkpointing

    def grads(model):
        model.train()
        tokens, images, ratios = tiny_inputs()
        model(tokens, images, ratios).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = tiny_model(), tiny_model()
    names = [n for n, _ in checkpointed.named_parameters()]
    assert apply_activation_checkpointing(checkpointed) == 4  # decoder, ViT local + global, adapters
    assert [n for n, _ in checkpointed.named_parameters()] == names
    want, got = grads(plain), grads(checkpointed)
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)
    only_adapters = tiny_model()
    assert apply_activation_checkpointing(only_adapters, ["adapters"]) == 1
    assert only_adapters.text_model.checkpoint_adapters and not only_adapters.text_model.checkpoint_activations
    got = grads(only_adapters)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)
    with pytest.raises(ValueError, match=r"unknown module kinds \['decodr'\]"):
        apply_activation_checkpointing(tiny_model(), ["decodr"])


def test_perceiver_activation_checkpointing_keeps_gradients():
    """The video aggregator's layers recompute in backward (kind "perceiver")."""
    from _helpers import tiny_model
    from llama_vision.model.video import VideoConfig, add_video_adapters
    from llama_vision.training.parallelize import apply_activation_checkpointing

    def grads(model):
        agg = model.video_aggregator.train()
        frames = torch.randn(1, 1, 4, 5, model.args.dim, generator=torch.Generator().manual_seed(0))
        agg(frames)[0].pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in agg.named_parameters() if p.grad is not None}

    plain, checkpointed = tiny_model(), tiny_model()
    for m in (plain, checkpointed):
        add_video_adapters(m, VideoConfig(num_frames=4, frames_per_group=2, n_latents=3, depth=2, heads=2))
    assert apply_activation_checkpointing(checkpointed, ["perceiver"]) == 1
    want, got = grads(plain), grads(checkpointed)
    assert want.keys() == got.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)


def test_train_state_layout(shapes_corpus, tmp_path):
    """The checkpoint keeps its documented layout (what resume reads): trainable tensors,
    AdamW state for every trainable parameter and nothing frozen, RNG; the JSON state."""
    from _helpers import tiny_train_overrides
    from llama_vision.config import load_config
    from llama_vision.training.train_config import TrainConfig
    from llama_vision.training.trainer import Trainer

    cfg = load_config(TrainConfig, ROOT / "configs/train/tiny_image_pretrain.yaml", tiny_train_overrides(shapes_corpus, tmp_path / "run"))
    trainer = Trainer(cfg)
    tensors, state = trainer.train_state.tensors(), trainer.train_state.json_state()
    assert set(state) == {"progress", "scheduler", "data", "layout"} and state["progress"]["step"] == 0
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {k[len("model."):] for k in tensors if k.startswith("model.")} == trainable
    assert {k for k in tensors if k.startswith("optim.")} == {f"optim.{n}.{s}" for n in trainable for s in ("step", "exp_avg", "exp_avg_sq")}
    assert {k.split(".")[0] for k in tensors} == {"model", "optim", "rng"}
    assert all(not n.startswith("text_model.layers.") for n in trainable)
