"""ILQL: implicit language Q-learning (Snell et al. 2022), trlx's loss terms, as pure functions.

Notation: B sequences, T' = T - 1 action slots. Slot t is the state "tokens up to position t" and the
action "token t + 1"; `mask` (B, T') is 1 where that token belongs to the completion (an action).
`nonterminal` (B, T') is 1 where the action is followed by another action. The reward of a sequence
sits on its last action.

    y_t      = r_t + gamma * V(s_{t+1}) * nonterminal_t                  (V(s_{t+1}) detached)
    L_Q      = sum_i mean_t (Q_i(s_t, a_t) - y_t)^2
    L_V      = mean_t |tau - 1(Qhat_t < V_t)| * (Qhat_t - V_t)^2,  Qhat = min_i Q_target_i   (expectile)
    L_CQL    = sum_i mean_t CE(Q_i(s_t, .), a_t)                          (pushes down unseen actions)
    L_AWAC   = mean_t exp(beta * (Qhat_t - V_t)) * CE(logits_t, a_t)      (weight detached)
    loss     = L_Q + L_V + cql_scale * L_CQL + awac_scale * L_AWAC

Means are over the real actions of the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ILQLLoss(NamedTuple):
    loss: torch.Tensor
    loss_q: torch.Tensor
    loss_v: torch.Tensor
    loss_cql: torch.Tensor
    loss_awac: torch.Tensor
    mean_q: torch.Tensor
    mean_v: torch.Tensor


def nonterminal_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 where the next slot is also an action (so V(next state) counts); 0 on each last action."""
    return torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1) * mask


def _ce(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(-1, V).float(), actions.reshape(-1), reduction="none").reshape(B, T)


def ilql_loss(logits: torch.Tensor, qs: list[torch.Tensor], target_qs: list[torch.Tensor], v: torch.Tensor,
              actions: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, gamma: float, tau: float,
              cql_scale: float, awac_scale: float, beta: float) -> ILQLLoss:
    """logits, qs[i], target_qs[i]: (B, T', vocab) at the state slots; v: (B, T' + 1) values of every
    state including the one after the last slot; actions, mask, rewards: (B, T')."""
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    a = actions.unsqueeze(-1)
    Q = [q.gather(-1, a).squeeze(-1).float() for q in qs]
    Qhat = torch.stack([q.gather(-1, a).squeeze(-1) for q in target_qs]).min(0).values.float().detach()
    V, V_next = v[:, :-1].float(), v[:, 1:].float() * nonterminal_mask(mask)
    y = rewards + gamma * V_next.detach()
    loss_q = sum(((q - y) ** 2 * mask).sum() / n for q in Q)
    weight = torch.where(Qhat < V, 1.0 - tau, tau)
    loss_v = (weight * (Qhat - V) ** 2 * mask).sum() / n
    loss_cql = sum((_ce(q, actions) * mask).sum() / n for q in qs)
    awac_weight = torch.exp(beta * (Qhat - V)).detach()
    loss_awac = (_ce(logits, actions) * awac_weight * mask).sum() / n
    loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    with torch.no_grad():
        mean_q = (Q[0] * mask).sum() / n
        mean_v = (V * mask).sum() / n
    return ILQLLoss(loss, loss_q, loss_v, loss_cql, loss_awac, mean_q, mean_v)


@torch.no_grad()
def polyak_update(target: torch.nn.Module, source: torch.nn.Module, alpha: float) -> None:
    """target <- alpha * source + (1 - alpha) * target, parameter by parameter."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(1.0 - alpha).add_(s.detach(), alpha=alpha)


def steered_logits(logits: torch.Tensor, target_qs: list[torch.Tensor], v: torch.Tensor, beta: float) -> torch.Tensor:
    """log pi(a|s) + beta * (min_i Q_target_i(s, a) - V(s)): the ILQL sampling distribution (before top-k)."""
    adv = torch.stack(target_qs).min(0).values - v.unsqueeze(-1)
    return torch.log_softmax(logits.float(), dim=-1) + beta * adv.float()
