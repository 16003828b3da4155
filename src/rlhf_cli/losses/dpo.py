"""Direct preference optimisation losses over summed response log-probabilities.

Notation: B = pairs. Inputs are log pi(y|x) summed over the response tokens (prompt excluded), for
the policy and the frozen reference, chosen (w) and rejected (l). h = (log pi_w - log pi_l) -
(log ref_w - log ref_l) is the implicit reward margin (divided by beta).

    sigmoid  Rafailov et al. 2023 eq. 7: -log sigmoid(beta h); with label smoothing eps, the
             conservative DPO of Mitchell 2023: -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo      Azar et al. 2023 eq. 17 on length-normalised log-probs (as AReaL and TRL do): (h - 1/(2 beta))^2
    hinge    SLiC (Zhao et al. 2023): max(0, 1 - beta h)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


class DPOLoss(NamedTuple):
    losses: torch.Tensor  # (B,) unreduced, keeps the graph
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi_w - log ref_w), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (log pi_l - log ref_l), detached


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed log-prob of labels[:, t+1] under logits[:, t] where labels != -100, and (B,) token counts.

    logits: (B, T, V); labels: (B, T) with -100 on prompt and padding.
    """
    shift_logits, shift_labels = logits[:, :-1, :].float(), labels[:, 1:]  # (B, T-1, V), (B, T-1)
    mask = shift_labels != -100
    safe = shift_labels.masked_fill(~mask, 0)
    token_logps = torch.gather(F.log_softmax(shift_logits, dim=-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
) -> DPOLoss:
    """Per-pair DPO loss (see module doc). Lengths (B,) are needed by `ipo` and by `rpo_alpha` > 0,
    which adds alpha * the chosen response's mean token NLL (RPO, Pang et al. 2024)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    pw, pl, rw, rl = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs chosen_lengths and rejected_lengths")
        cw, cl = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
        h = (pw / cw - pl / cl) - (rw / cw - rl / cl)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        h = (pw - pl) - (rw - rl)
        if loss_type == "sigmoid":
            losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        else:
            losses = torch.relu(1 - beta * h)
    if rpo_alpha:
        if chosen_lengths is None:
            raise ValueError("rpo_alpha needs chosen_lengths")
        losses = losses + rpo_alpha * (-pw / chosen_lengths.clamp(min=1))
    return DPOLoss(losses, (beta * (pw - rw)).detach(), (beta * (pl - rl)).detach())
