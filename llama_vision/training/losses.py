"""Losses: token cross-entropy (summed, normalised by the GLOBAL target count so DP=N
equals DP=1 with the full batch) and DPO."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V], labels [B, S] (already shifted; -100 = no loss) -> summed NLL."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over each row's labelled tokens -> [B]."""
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation (Rafailov et al.): per pair
    -log sigmoid(beta * ((pc - pr) - (rc - rr))). Returns (losses [B], reward margins [B])."""
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    return -F.logsigmoid(beta * margin), beta * margin.detach()
