"""Critic-free online RL (GRPO family: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++) as pure functions.

Notation: N = P prompts x G completions, the G completions of a prompt contiguous; T completion tokens
(right-padded), `mask` (N, T) is 1 on real completion tokens. One scalar reward r per completion.

Advantages (one per completion, broadcast to its tokens):
    grpo          A = (r - mean_g r) / (std + eps)   std: of the group ("group"), of all N rewards ("batch"),
                                                     or no division ("none": Dr. GRPO). std is unbiased.
    rloo          A_i = r_i - mean_{j != i in the group} r_j  = G / (G - 1) * (r_i - mean_g r)
    reinforce_pp  c = r - mean_g r, then whitened over the batch: A = (c - mean c) / sqrt(max(var c, 1e-8))
Loss, per real token t (ratio = exp(logp - old_logp); "sequence" importance (GSPO): exp of the mean
log-ratio over the completion's real tokens, the same for all of them):
    l_t  = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * k3_t
    k3_t = exp(ref_logp - logp) - (ref_logp - logp) - 1                  (Schulman's k3, >= 0)
Aggregation, returned as a sum and its units (loss = loss_sum / units, and sums/units of micro-batches add up):
    grpo          mean over completions of each one's token mean   loss_sum = sum_i mean_t l,   units = N
    bnpo, dapo    mean over all real tokens of the batch           loss_sum = sum_it l,         units = tokens
    dr_grpo       sum over tokens / (N * max_completion_length)    loss_sum = sum_it l / L_max, units = N

Conventions, and where they differ from TRL 1.16 (GRPOTrainer) and OpenRLHF:
- grpo advantages follow TRL: eps 1e-4 added to the std; "batch" is the std of the raw rewards of the
  batch (not of the centred advantages); a group with equal rewards gets A = 0. No NaN (missing) rewards.
- reinforce_pp follows OpenRLHF's `reinforce_baseline`: group mean subtracted, then the whitening it applies
  to all action tokens of the batch (mean and biased variance over tokens, rsqrt(max(var, 1e-8)); `eps`
  is not used). Rewards here are per completion, so completions weigh equally unless `lengths` (N,)
  token counts are given, which reproduces OpenRLHF's token weighting (gamma = 1, no KL folded into the
  reward). `scale` only applies to "grpo".
- TRL divides each micro-batch by its own count (bnpo: its tokens) and averages micro-batches; here the
  training loop divides the summed loss_sum by the summed units of the whole accumulated batch, so bnpo
  is the true token mean of that batch (what TRL does for "dapo" via num_items_in_batch). grpo and
  dr_grpo agree with TRL when micro-batches hold equally many completions.
- Log-ratios and k3 are taken on real tokens only (padding set to 0 before exp): same values as TRL
  on real tokens, but garbage at padded positions cannot turn into inf / NaN in the loss or gradients.
- GSPO: the sequence ratio is broadcast to tokens, so the loss equals TRL's, but clip counts are token
  counts (TRL counts completions at sequence level).
- clip_low / clip_high / kl are detached sums over real tokens (divide by `tokens`, summed over
  micro-batches, for TRL's clip_ratio/low_mean, high_mean and kl). kl is logged whenever ref_logprobs is
  given, even with beta = 0.
- Completions emptied by `mask_truncated` still count in the units of grpo / dr_grpo (they add 0 to
  loss_sum), as with TRL's mask_truncated_completions.
- Not here: TRL's delta (two-sided clip), KL bias correction, vLLM importance correction, entropy mask,
  cispo / sapo / luspo / vespo.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .ppo import masked_mean

ADVANTAGE_METHODS = ("grpo", "rloo", "reinforce_pp")
SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, num_generations: int, method: str = "grpo", scale: str = "group",
                     eps: float = 1e-4, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) rewards, groups of `num_generations` contiguous completions -> (N,) advantages.

    `scale` applies to "grpo" only; `lengths` (N,) token counts weight "reinforce_pp"'s whitening.
    """
    G, N = num_generations, rewards.numel()
    if G < 2 or N % G:
        raise ValueError(f"{N} rewards cannot be split into groups of num_generations={G} (need G >= 2)")
    if method not in ADVANTAGE_METHODS or scale not in SCALES:
        raise ValueError(f"unknown method {method!r} or scale {scale!r}")
    r = (rewards if rewards.is_floating_point() else rewards.float()).reshape(-1, G)
    centred = r - r.mean(1, keepdim=True)
    if method == "rloo":
        adv = r - (r.sum(1, keepdim=True) - r) / (G - 1)
    elif method == "reinforce_pp":
        w = torch.ones_like(centred) if lengths is None else lengths.reshape(centred.shape).to(centred.dtype)
        mean = masked_mean(centred, w)
        adv = (centred - mean) * masked_mean((centred - mean) ** 2, w).clamp(min=1e-8).rsqrt()
    elif scale == "none":
        adv = centred
    else:
        std = r.std(1, keepdim=True) if scale == "group" else r.std()
        adv = centred / (std + eps)
    return adv.reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1, any shape."""
    x = ref_logprobs - logprobs
    return torch.exp(x) - x - 1


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: (N, T) mask with the rows of (N,) bool `truncated` (no EOS) zeroed."""
    return torch.where(truncated.bool().unsqueeze(-1), torch.zeros_like(mask), mask)


class GRPOLoss(NamedTuple):
    loss_sum: torch.Tensor  # loss = loss_sum / units (see the module docstring per loss_type)
    units: torch.Tensor  # completions (grpo, dr_grpo) or real tokens (bnpo, dapo)
    clip_low: torch.Tensor  # real tokens with ratio < 1 - eps and A < 0 (detached count)
    clip_high: torch.Tensor  # real tokens with ratio > 1 + eps_high and A > 0 (detached count)
    kl: torch.Tensor  # sum of k3 over real tokens (detached; 0 without ref_logprobs)
    tokens: torch.Tensor  # real tokens


def _ratio(log_ratio: torch.Tensor, mask: torch.Tensor, importance: str) -> torch.Tensor:
    if importance == "token":
        return torch.exp(log_ratio)
    if importance == "sequence":
        seq = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        return torch.exp(seq).expand_as(log_ratio)
    raise ValueError(f"unknown importance level {importance!r} (token or sequence)")


def _aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str,
               max_completion_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    masked = token_loss * mask
    n = token_loss.new_tensor(float(mask.shape[0]))
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum(), n
    if loss_type == "dr_grpo":
        return masked.sum() / max_completion_length, n
    return masked.sum(), mask.sum()


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "grpo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, importance: str = "token",
              max_completion_length: int | None = None) -> GRPOLoss:
    """Clipped surrogate of the GRPO family. logprobs, old_logprobs, ref_logprobs, mask: (N, T);
    advantages (N,) or (N, T). old_logprobs None: logprobs.detach() (one update per generation)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; one of {LOSS_TYPES}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("dr_grpo needs max_completion_length")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs")
    real = mask.bool()
    mask = mask.to(logprobs.dtype)
    zero = torch.zeros_like(logprobs)
    logp = torch.where(real, logprobs, zero)
    old = logp.detach() if old_logprobs is None else torch.where(real, old_logprobs, zero)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages

    ratio = _ratio(logp - old, mask, importance)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    token_loss = -torch.min(ratio * adv, clipped * adv)
    kl_tok = zero if ref_logprobs is None else k3_kl(logp, torch.where(real, ref_logprobs, zero))
    if beta != 0.0:
        token_loss = token_loss + beta * kl_tok
    loss_sum, units = _aggregate(token_loss, mask, loss_type, max_completion_length)

    with torch.no_grad():
        clip_low = ((ratio < 1 - epsilon) & (adv < 0) & real).sum().to(mask.dtype)
        clip_high = ((ratio > 1 + eps_high) & (adv > 0) & real).sum().to(mask.dtype)
        kl = (kl_tok * mask).sum()
    return GRPOLoss(loss_sum, units, clip_low, clip_high, kl, mask.sum())
