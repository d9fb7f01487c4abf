"""Run under torchrun (2 processes, gloo): the matmul FLOPs each TP=2 rank performs for a
training step, measured with FlopCounterMode, plus what `step_flops` says at TP=2.

Writes {out}.{rank}: {"measured": ..., "counted": ..., "trainable": [...]}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _helpers import tiny_params  # noqa: E402

import model_parallel  # noqa: E402
import llama_vision  # noqa: E402
from llama_vision.training.flops import StepShape, step_flops, trainable_from_model  # noqa: E402
from llama_vision.training.losses import lm_loss_sum  # noqa: E402

IMG = 512


def main(out_path: str) -> None:
    model_parallel.init_model_parallel(2, backend="gloo")
    rank = model_parallel.tp_rank()
    model = llama_vision.build_model(tiny_params(), seed=3).train()
    llama_vision.set_trainable(model, decoder=False, vision=True, adapters=True)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, 4, 3, 28, 28, generator=g)
    ar = torch.tensor([[[2, 2]], [[1, 3]]])
    tokens = torch.tensor([[IMG, 1, 2, 3, 4, 5, 6], [IMG, 7, 8, 9, 10, 11, 12]])
    labels = torch.tensor([[1, 2, 3, 4, 5, 6, -100], [7, 8, 9, 10, 11, 12, -100]])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        lm_loss_sum(model(tokens, images, ar), labels).backward()
    trainable = trainable_from_model(model)
    counted = step_flops(model.args, StepShape((7, 7), ((4,), (4,))), trainable).total
    Path(f"{out_path}.{rank}").write_text(json.dumps(
        {"measured": counter.get_total_flops(), "counted": counted, "trainable": sorted(trainable)}))
    model_parallel.destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
