"""Log-likelihood of continuations given a (multimodal) context: multiple-choice scoring by
option likelihood and lmms-eval's ``loglikelihood`` requests."""
from __future__ import annotations

from typing import Any

import torch

from llama_vision.inputs import pad_rows


@torch.inference_mode()
def continuation_logprobs(
    model, contexts: list[list[int]], continuations: list[list[int]], media_inputs: dict[str, Any] | None = None
) -> list[tuple[float, bool]]:
    """Per row: (sum of log p(continuation token | everything before it), whether every
    continuation token is the greedy pick) -- lm-eval's loglikelihood pair.

    contexts[b] + continuations[b] is row b (right-padded, causal, so padding never reaches
    a real position); ``media_inputs`` are the modality inputs of these B rows (as
    ``model(tokens, media_inputs=...)`` takes them). One forward for the whole batch.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if any(not c for c in contexts) or any(not k for k in continuations):
        raise ValueError("every context and every continuation needs at least one token")
    device = model.text_model.output.weight.device
    tokens, _ = pad_rows([c + k for c, k in zip(contexts, continuations)], device=device)
    logits = model(tokens, media_inputs=media_inputs or None)
    out = []
    for b, (ctx, cont) in enumerate(zip(contexts, continuations)):
        # Position i predicts token i + 1: the continuation's logits start one before it.
        start = len(ctx) - 1
        logp = torch.log_softmax(logits[b, start : start + len(cont)].float(), dim=-1)
        target = torch.tensor(cont, device=device)
        total = logp.gather(-1, target[:, None]).sum().item()
        greedy = bool((logp.argmax(-1) == target).all().item())
        out.append((total, greedy))
    return out
