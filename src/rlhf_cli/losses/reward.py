"""Pairwise reward-model loss (Bradley-Terry), as in Ouyang et al. 2022 eq. 1 / Stiennon et al. 2020.

Notation: B = number of (chosen, rejected) pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RewardLoss(NamedTuple):
    losses: torch.Tensor  # (B,) per-pair loss, unreduced (keeps the graph)
    accuracy: torch.Tensor  # (B,) 1.0 where r_chosen > r_rejected, detached
    margin: torch.Tensor  # (B,) r_chosen - r_rejected, detached


def pairwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> RewardLoss:
    """-log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2.

    chosen_rewards, rejected_rewards: (B,). `margin` (B,), optional: how much the chosen must win
    by (Llama 2's preference-strength margin). `center_coef` > 0 pulls the mean reward towards 0
    (Eisenstein et al. 2023, TRL's center_rewards_coefficient), since the BT loss only sees
    differences and leaves the offset free.
    """
    diff = chosen_rewards - rejected_rewards
    target = diff - margin if margin is not None else diff
    losses = -F.logsigmoid(target)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return RewardLoss(losses, (diff > 0).float().detach(), diff.detach())
