"""Prefix sharing: one forward pass over a prompt that several completions share (a preference
pair's chosen and rejected), whose keys and values every completion then attends to.

A pair costs P + 2C token-passes instead of 2(P + C): on TL;DR (P ~ 4C) 40% less work for the
reward model and DPO, with the same result up to float rounding. Gradients flow back through the
cached keys and values into the prompt pass. Prompts are left-padded (position ids count real
tokens only, as in generation), completions right-padded after them.

Both passes go through the model's own forward, so DDP / DeepSpeed see ordinary forward calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data.tokenize import pad_left, pad_right
from .models import checkpointing, new_cache, position_ids, score_head, tail_only, with_cache


@dataclass
class Shared:
    prompt_ids: torch.Tensor       # (B, Tp) left-padded
    prompt_mask: torch.Tensor      # (B, Tp)
    completion_ids: torch.Tensor   # (B*k, Tc) right-padded; row b*k + j is completion j of prompt b
    completion_mask: torch.Tensor  # (B*k, Tc)
    k: int

    def to(self, device) -> "Shared":
        return Shared(self.prompt_ids.to(device), self.prompt_mask.to(device), self.completion_ids.to(device),
                      self.completion_mask.to(device), self.k)


def split(groups: list[list[list[int]]], prompt_lens: list[int], pad_id: int) -> Shared | None:
    """`groups[b]`: k token lists that all start with the same `prompt_lens[b]` prompt tokens.

    None when that does not hold for every group (different prompts, an empty prompt or an empty
    completion): the caller then runs the plain concatenated forward.
    """
    k = len(groups[0])
    prompts, completions = [], []
    for seqs, n in zip(groups, prompt_lens):
        if n < 1 or len(seqs) != k or any(len(s) <= n or s[:n] != seqs[0][:n] for s in seqs):
            return None
        prompts.append(seqs[0][:n])
        completions += [s[n:] for s in seqs]
    p = pad_left(prompts, pad_id)
    c = pad_right(completions, pad_id)
    pm = pad_left([[1] * len(x) for x in prompts], 0)
    cm = pad_right([[1] * len(x) for x in completions], 0)
    return Shared(p, pm, c, cm, k)


def usable(model) -> bool:
    """Whether `model` can run the prompt once and the completions on its cache. Not while it trains with
    gradient checkpointing: transformers keeps no cache then, and a block recomputed in the backward pass
    would append its keys to the cache a second time. The plain concatenated forward is used instead."""
    return not checkpointing(model, training_only=True)


def _prompt_pass(fwd, s: Shared, **kw):
    """The prompts' forward, filling a fresh KV cache; returns (output, cache)."""
    cache = new_cache(fwd)
    with tail_only(fwd, 1):  # read at its last position alone, and through its keys and values
        out = fwd(input_ids=s.prompt_ids, attention_mask=s.prompt_mask, position_ids=position_ids(s.prompt_mask),
                  use_cache=True, **with_cache(fwd, cache), **kw)
    return out, cache


def _completion_pass(fwd, s: Shared, cache):
    """The completions' forward, attending to the (repeated) prompt keys/values in `cache`."""
    k = s.k
    cache.batch_repeat_interleave(k)
    prompt_mask = s.prompt_mask.repeat_interleave(k, 0)
    start = prompt_mask.sum(1, keepdim=True)  # each completion continues its prompt's positions
    positions = start + torch.arange(s.completion_ids.shape[1], device=start.device)
    # padding after a short completion would run past the model's positions: it is masked anyway
    positions = positions.masked_fill(s.completion_mask == 0, 0)
    return fwd(input_ids=s.completion_ids, attention_mask=torch.cat([prompt_mask, s.completion_mask], 1),
               position_ids=positions, use_cache=True, **with_cache(fwd, cache))


def completion_logits(model, s: Shared) -> torch.Tensor:
    """(B*k, Tc, V) logits of a causal LM: row t predicts completion token t."""
    out, cache = _prompt_pass(model, s, logits_to_keep=1)
    first = out.logits[:, -1:].repeat_interleave(s.k, 0)  # predicts each completion's first token
    rest = _completion_pass(model, s, cache).logits[:, :-1]
    return torch.cat([first, rest], 1)


def completion_logps(model, s: Shared) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*k,) summed log-probs of each completion under a causal LM, and (B*k,) token counts."""
    logits = completion_logits(model, s).float()
    token = torch.gather(F.log_softmax(logits, -1), 2, s.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = s.completion_mask.bool()
    return (token * mask).sum(-1), mask.sum(-1)


def completion_rewards(model, s: Shared) -> torch.Tensor:
    """(B*k,) scalar reward of each prompt + completion of a sequence classifier (its score head), read
    at the completion's last token."""
    base = model.base_model
    _, cache = _prompt_pass(base, s)
    hidden = _completion_pass(base, s, cache).last_hidden_state  # (B*k, Tc, H)
    last = s.completion_mask.sum(1) - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return score_head(model)(pooled).squeeze(-1).float()
