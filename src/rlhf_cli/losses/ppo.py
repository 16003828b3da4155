"""PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020), as pure functions.

Notation: B rollouts, T response tokens (right-padded), `mask` (B, T) is 1 on real response tokens.
Per token t of a response: logp = log pi(a_t | s_t), ref_logp = log pi_ref(a_t | s_t), v = V(s_t).

    r_t   = -beta * (logp_t - ref_logp_t)  (+ score on the last real token)     KL-penalised reward
    d_t   = r_t + gamma * V(s_{t+1}) - V(s_t)                                   TD error (V = 0 past the end)
    A_t   = d_t + gamma * lam * A_{t+1}                                         GAE
    R_t   = A_t + V(s_t)                                                        value target
    L_pi  = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)),  ratio = exp(logp - old_logp)
    L_V   = mean_t 0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)
    loss  = L_pi + vf_coef * L_V

Means are over real tokens of the whole batch (padding never counts).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the real tokens."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over real tokens; padded positions come out 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each right-padded row (0 for an empty row)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return (pos * mask.long()).max(dim=1).values


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T): -kl_coef * log-ratio on every real token, the score added on the last.

    Returns (rewards, log_ratio) with log_ratio = (logp - ref_logp) * mask.
    """
    log_ratio = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * log_ratio
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_index(mask)] += scores * (mask.sum(1) > 0)
    return rewards, log_ratio


def sequence_kl(log_ratio: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) per-rollout KL estimates summed over tokens: k1 = sum log-ratio, k3 = sum (e^-x - 1 + x).

    On samples of the policy both estimate KL(pi || pi_ref); k3 is never negative (Schulman's
    approximation), k1 is unbiased.
    """
    k3 = (torch.expm1(-log_ratio) + log_ratio) * mask
    return log_ratio.sum(1), k3.sum(1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (B, T); V is taken as 0 after the last real token (episode end)."""
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        last = delta + gamma * lam * last * next_mask
        advantages[:, t] = last * mask[:, t]
    return advantages, (advantages + values) * mask


class PolicyLoss(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor  # share of tokens where the clipped objective was the active one
    approx_kl: torch.Tensor  # mean (ratio - 1) - log ratio: KL(old || new), >= 0


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> PolicyLoss:
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(ratio - 1 - log_ratio, mask)
    return PolicyLoss(loss, clipfrac, approx_kl)


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor
    error: torch.Tensor  # mean squared error of the unclipped values


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> ValueLoss:
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), mask)
        error = masked_mean(err, mask)
    return ValueLoss(loss, clipfrac, error)


def entropy(logits: torch.Tensor, mask: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy of the token distributions at the real response positions (logits (B, T, V)):
    H = logsumexp(x) - sum_v p_v x_v. `lse` (B, T): logsumexp(logits), when already computed."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse
    return masked_mean(lse - (torch.exp(logits - lse.unsqueeze(-1)) * logits).sum(-1), mask)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logits)[token] per position: (B, T, V), (B, T) -> (B, T), in float32.
    `lse` (B, T): logsumexp(logits), when already computed (the entropy needs it too)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - lse


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al.'s controller: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


class RunningMoments:
    """Mean and standard deviation of every score seen so far (parallel-variance merging, as trlx).

    `update(xs)` folds a batch in and returns that batch's own (mean, unbiased std).
    """

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 1e-24):
        self.mean, self.var, self.count = mean, var, count

    @property
    def std(self) -> float:
        n = self.count
        return math.sqrt(self.var * n / (n - 1)) if n > 1 else math.sqrt(self.var)

    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        xs = xs.double()
        n = xs.numel()
        mean, var = xs.mean().item(), xs.var(unbiased=False).item()
        delta, total = mean - self.mean, self.count + n
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total
        return mean, math.sqrt(var * n / (n - 1)) if n > 1 else 0.0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}
