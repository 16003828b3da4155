"""PPO rollouts in one pass: KV-cached sampling from the policy-with-value-head that also keeps, for
every sampled token, its log-prob under the policy and the value of the state before it.

PPO needs those "old" log-probs and values; computing them while sampling (as TRL does for the
log-probs) saves the second full forward pass over every rollout. Sampling stops as soon as every
row has emitted EOS. The log-probs are of the untempered logits, as `losses.ppo.token_logprobs`
computes them in the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data.tokenize import pad_left
from .eval.generation import cut_at_stop


@dataclass
class Sampled:
    responses: list[list[int]]     # each ends with EOS when it ended (sampled or at a stop string)
    logprobs: list[torch.Tensor]   # (len,) per response: log-prob of each response token
    values: list[torch.Tensor]     # (len,) per response: value of the state before each token


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then nucleus (top-p) filtering: the tokens left out get -inf (at least one is kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already exceeds top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: torch.Tensor) -> torch.Tensor:
    """(B,) one token per row of (B, V) probabilities, by inverse CDF: one uniform number per row
    (torch.multinomial and Gumbel-max draw one per vocabulary entry, which costs more than a whole
    decode step of a small model on CPU). `right=True` never lands on a zero-probability token."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(core, tokenizer, prompt_ids: list[list[int]], gen_cfg, stop_sequences=()) -> Sampled | None:
    """Sample a response for each prompt (left-padded, one batch) from `core` (PolicyWithValueHead).

    None in the rare case that a stop string ends right at the last sampled token (the EOS put after
    it has no logits yet): the caller then scores the responses with a forward pass.
    """
    from .heads import position_ids

    device = next(core.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    B = len(prompt_ids)
    ids = pad_left(prompt_ids, pad).to(device)
    mask = pad_left([[1] * len(p) for p in prompt_ids], 0).to(device)
    pos = position_ids(mask)[:, -1:]
    out = core.policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                      output_hidden_states=True, logits_to_keep=1)
    tokens, lps, eos_lps, values = [], [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(gen_cfg.max_new_tokens):
        logits = out.logits[:, -1].float()
        values.append(core.value_head(out.hidden_states[-1][:, -1]).squeeze(-1).float())
        logp = F.log_softmax(logits, -1)
        if gen_cfg.do_sample:
            probs = filter_logits(logits / gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p).softmax(-1)
            nxt = draw(probs)
        else:
            nxt = logits.argmax(-1)
        nxt = nxt.masked_fill(done, pad)
        tokens.append(nxt)
        lps.append(logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
        eos_lps.append(logp[:, eos])
        done |= nxt == eos
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        pos = pos + 1
        out = core.policy(input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=pos,
                          past_key_values=out.past_key_values, use_cache=True, output_hidden_states=True)
    toks, lp, elp, val = (torch.stack(x, 1).cpu() for x in (tokens, lps, eos_lps, values))
    steps = toks.shape[1]
    responses, out_lp, out_v = [], [], []
    for b in range(B):
        row = toks[b].tolist()
        ended = eos in row
        row = row[: row.index(eos)] if ended else row
        row, stopped = cut_at_stop(tokenizer, row, stop_sequences)
        n = len(row)
        row_lp, row_v = lp[b, :n], val[b, :n]
        if ended or stopped:
            if n >= steps:  # cut after the last sampled step: no logits for an EOS there
                return None
            row = row + [eos]
            # a sampled EOS is the token drawn at step n; an EOS put after a stop string is scored there too
            row_lp = torch.cat([row_lp, elp[b, n: n + 1]])
            row_v = val[b, : n + 1]
        responses.append(row)
        out_lp.append(row_lp)
        out_v.append(row_v)
    return Sampled(responses, out_lp, out_v)
