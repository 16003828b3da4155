"""Sampling and log-probs: every way text is drawn from a policy, and scored under one.

    generate            transformers' `generate` (KV cache, left padding, a fixed seed): held-out eval,
                        and rollouts under ZeRO-3 (synced across processes)
    sample              our KV-cached loop for PPO rollouts: keeps each sampled token's log-prob and the
                        value of the state before it, so no second forward pass scores the rollouts;
                        logits processors (transformers' top-k / top-p / temperature, ILQL's steering)
                        shape what is drawn
    ilql_generate       `sample` steered by ILQL's heads (`ILQLSteering`), as trlx's ILQL generate
    sequence_logprobs   summed log-probs of given responses (KL estimates)

Notation: B prompts, P prompt tokens (left-padded), R response tokens (right-padded), V vocabulary.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .data.tokenize import pad_left, pad_right
from .heads import ILQLHeads
from .losses.ilql import steered_logits
from .losses.ppo import token_logprobs
from .models import forward_with_hidden, new_cache, position_ids, tail_only, with_cache


def cut_at_stop(tokenizer, ids: list[int], stop_sequences: list[str]) -> tuple[list[int], bool]:
    """The tokens of `ids` before the first stop string, and whether one was found.

    Cuts on a token boundary: the kept tokens decode to text that ends before the stop string (a
    token straddling its start is dropped, and so is trailing whitespace), so the tokens that are
    trained on are exactly the ones that were sampled, never a re-tokenization of edited text.
    """
    if not stop_sequences or not ids:
        return ids, False
    text = tokenizer.decode(ids)
    starts = [i for i in (text.find(s) for s in stop_sequences if s) if i >= 0]
    if not starts:
        return ids, False
    stop = min(starts)
    keep = 0
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k])) > stop:
            break
        keep = k
    while keep and not tokenizer.decode(ids[keep - 1: keep]).strip():
        keep -= 1
    return ids[:keep], True


def seeded(seed: int | None, device):
    """Sampling noise from `seed` in a forked RNG (eval neither depends on nor disturbs training's RNG);
    None: the global RNG (rollouts)."""
    if seed is None:
        return contextlib.nullcontext()
    fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    @contextlib.contextmanager
    def ctx():
        with fork:
            torch.manual_seed(seed)
            yield
    return ctx()


def _progress(progress, name: str, total: int):
    return progress.add_task(name, total=total, info="") if progress is not None else None


@torch.no_grad()  # not inference_mode: ZeRO-3 keeps gathered weights, which must stay usable by autograd
def generate(model, tokenizer, prompt_ids: list[list[int]], gen_cfg, batch_size: int, seed: int | None,
             progress=None, stop_sequences: list[str] = (), keep_eos: bool = False,
             synced_gpus: bool = False) -> list[list[int]]:
    """Completion token ids for each prompt, with transformers' `generate`.

    A completion ends at EOS or at the first stop string. With `keep_eos` the ending is kept as an
    EOS token (PPO trains on it: the policy learns when to stop); without, EOS and all after are cut.
    `synced_gpus`: under ZeRO-3 every process keeps stepping until all are done (each step gathers weights).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=gen_cfg.max_new_tokens, do_sample=gen_cfg.do_sample, pad_token_id=pad,
                  eos_token_id=eos, **({"synced_gpus": True} if synced_gpus else {}))
    if gen_cfg.do_sample:
        kwargs.update(temperature=gen_cfg.temperature, top_k=gen_cfg.top_k, top_p=gen_cfg.top_p)
    out: list[list[int]] = []
    task = _progress(progress, "generating", len(prompt_ids))
    with seeded(seed, device):
        for i in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[i: i + batch_size]
            input_ids = pad_left(chunk, pad).to(device)  # (B, P)
            attention_mask = pad_left([[1] * len(c) for c in chunk], 0).to(device)
            seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            for row in seqs[:, input_ids.shape[1]:].tolist():  # (B, new)
                ended = eos in row
                row = row[: row.index(eos)] if ended else row
                row, stopped = cut_at_stop(tokenizer, row, stop_sequences)
                out.append(row + [eos] if keep_eos and (ended or stopped) else row)
            if task is not None:
                progress.advance(task, len(chunk))
    if task is not None:
        progress.remove_task(task)
    model.train(was_training)
    return out


def warpers(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> LogitsProcessorList:
    """transformers' temperature, top-k and nucleus filters, in `generate`'s order (the identity ones left out)."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


class ILQLSteering:
    """Logits processor: log pi + beta * (min Q_target - V) from the ILQL heads on the step's final hidden
    state (trlx's ILQL generate); beta = 0 leaves the policy's log-probs."""

    def __init__(self, heads: ILQLHeads, beta: float):
        self.heads, self.beta = heads, beta

    def __call__(self, input_ids, scores: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        _, target_qs, v = self.heads(hidden_states)
        return steered_logits(scores, target_qs, v, self.beta)


def draw(probs: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) one token per row of (B, V) probabilities, by inverse CDF: one uniform number per row
    (torch.multinomial and Gumbel-max draw one per vocabulary entry, which costs more than a whole
    decode step of a small model on CPU). `right=True` never lands on a zero-probability token.
    `u`: the (B,) uniform numbers to use (default: drawn from the global RNG)."""
    cdf = probs.double().cumsum(-1)
    if u is None:
        u = torch.rand(probs.shape[0], device=probs.device, dtype=torch.float64)
    u = u.to(device=probs.device, dtype=torch.float64).unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def row_noise(keys: list[tuple[int, ...]], steps: int) -> torch.Tensor:
    """(len(keys), steps) uniform numbers, row i from its own generator seeded by `keys[i]` (like vLLM's
    per-request seed): a completion's randomness follows its key, whatever batch or process it is drawn in."""
    rows = []
    for key in keys:
        h = 0
        for k in key:  # a stable mix of the key's integers (Python's hash() of ints is too regular)
            h = (h * 1_000_003 + int(k) + 0x9E3779B9) % (2 ** 61 - 1)
        rows.append(torch.rand(steps, generator=torch.Generator().manual_seed(h), dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros(0, steps, dtype=torch.float64)


@dataclass
class Sampled:
    responses: list[list[int]]     # each ends with EOS when it ended (sampled or at a stop string)
    logprobs: list[torch.Tensor]   # (len,) per response: log-prob of each response token (untempered)
    values: list[torch.Tensor]     # (len,) per response: value of the state before each token (with a value head)


@dataclass
class _Steps:
    """Per decode step: the drawn tokens, their log-probs, EOS's log-prob and the values, each (B,)."""

    tokens: list
    logprobs: list
    eos_logprobs: list
    values: list


@torch.no_grad()
def sample(policy, tokenizer, prompt_ids: list[list[int]], gen_cfg, stop_sequences=(), value_head=None,
           processors: LogitsProcessorList | None = None, noise: torch.Tensor | None = None,
           repeats: int = 1) -> Sampled | None:
    """Sample a response for each prompt (left-padded, one batch), token by token with the KV cache.

    `processors` (default: `gen_cfg`'s temperature / top-k / top-p) turn the logits into the scores that
    are sampled (`do_sample`) or maximised; a processor whose `__call__` takes `hidden_states` gets the
    step's final hidden state. With `value_head`, the value of each state before a token comes along.
    `noise`: (B, max_new_tokens) uniform numbers, row b's draw at step t (`row_noise`): each row's sample
    then depends on its own numbers only, not on the batch it shares (default: the global RNG).
    `repeats`: sample that many responses of each prompt (rows b * repeats + j), the prompt run once and its
    keys/values shared (GRPO's groups: G times less prefill).
    None in the rare case that a stop string ends right at the last sampled token (the EOS put after it
    has no logits yet): the caller then scores the responses with a forward pass.
    """
    device = next(policy.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if processors is None:
        processors = warpers(gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p) if gen_cfg.do_sample else []
    hidden = value_head is not None or any(_wants_hidden(p) for p in processors)
    B = len(prompt_ids) * repeats
    ids = pad_left(prompt_ids, pad).to(device)
    mask = pad_left([[1] * len(p) for p in prompt_ids], 0).to(device)
    cache = new_cache(policy, reserve=gen_cfg.max_new_tokens)
    forward = forward_with_hidden if hidden else lambda model, **kw: (model(**kw), None)
    with tail_only(policy, 1):  # the prefill is read at its last position (and its keys/values)
        out, h = forward(policy, input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                         logits_to_keep=1, **with_cache(policy, cache))
    if repeats > 1:  # every repeat continues from the one prefill
        cache.batch_repeat_interleave(repeats)
        mask = mask.repeat_interleave(repeats, 0)
        out.logits = out.logits.repeat_interleave(repeats, 0)
        h = h.repeat_interleave(repeats, 0) if hidden else None
    pos = position_ids(mask)[:, -1:]
    steps = _Steps([], [], [], [])
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(gen_cfg.max_new_tokens):
        logits = out.logits[:, -1].float()
        h = h[:, -1] if hidden else None
        if value_head is not None:
            steps.values.append(value_head(h).squeeze(-1).float())
        logp = F.log_softmax(logits, -1)
        scores = processors(None, logits, hidden_states=h) if processors else logits
        nxt = draw(scores.softmax(-1), None if noise is None else noise[:, t]) if gen_cfg.do_sample else scores.argmax(-1)
        nxt = nxt.masked_fill(done, pad)
        steps.tokens.append(nxt)
        steps.logprobs.append(logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
        steps.eos_logprobs.append(logp[:, eos])
        done |= nxt == eos
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        pos = pos + 1
        out, h = forward(policy, input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=pos, use_cache=True,
                         **with_cache(policy, cache))
    return _finish(tokenizer, steps, stop_sequences, B)


def _wants_hidden(processor) -> bool:
    return "hidden_states" in inspect.signature(processor.__call__).parameters


def _finish(tokenizer, steps: _Steps, stop_sequences, B: int) -> Sampled | None:
    """Responses cut at EOS or a stop string (ending with EOS), with their log-probs and values."""
    eos = tokenizer.eos_token_id
    toks, lp, elp = (torch.stack(x, 1).cpu() for x in (steps.tokens, steps.logprobs, steps.eos_logprobs))
    val = torch.stack(steps.values, 1).cpu() if steps.values else torch.zeros_like(lp)
    n_steps = toks.shape[1]
    responses, out_lp, out_v = [], [], []
    for b in range(B):
        row = toks[b].tolist()
        ended = eos in row
        row = row[: row.index(eos)] if ended else row
        row, stopped = cut_at_stop(tokenizer, row, stop_sequences)
        n = len(row)
        row_lp, row_v = lp[b, :n], val[b, :n]
        if ended or stopped:
            if n >= n_steps:  # cut after the last sampled step: no logits for an EOS there
                return None
            row = row + [eos]
            # a sampled EOS is the token drawn at step n; an EOS put after a stop string is scored there too
            row_lp = torch.cat([row_lp, elp[b, n: n + 1]])
            row_v = val[b, : n + 1]
        responses.append(row)
        out_lp.append(row_lp)
        out_v.append(row_v)
    return Sampled(responses, out_lp, out_v)


def ilql_processors(heads: ILQLHeads, beta: float, temperature: float, top_k: int) -> LogitsProcessorList:
    """ILQL's sampling distribution: the steering, then the temperature and top-k (trlx's order)."""
    return LogitsProcessorList([ILQLSteering(heads, beta), *warpers(temperature, top_k)])


def ilql_generate(policy, heads: ILQLHeads, tokenizer, prompt_ids: list[list[int]], beta: float, gen_cfg,
                  top_k: int, batch_size: int, seed: int, progress=None) -> list[list[int]]:
    """Completions (without EOS) sampled with log pi + beta * (min Q_target - V), then top-k and the
    temperature, as trlx's ILQL generate. beta = 0 samples the policy."""
    device = next(policy.parameters()).device
    eos = tokenizer.eos_token_id
    processors = ilql_processors(heads, beta, gen_cfg.temperature, top_k)
    was = policy.training
    policy.eval()
    out: list[list[int]] = []
    task = _progress(progress, f"generating (beta {beta:g})", len(prompt_ids))
    with seeded(seed, device):
        for i in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[i: i + batch_size]
            s = sample(policy, tokenizer, chunk, gen_cfg, processors=processors)
            out += [r[:-1] if r and r[-1] == eos else r for r in s.responses]
            if task is not None:
                progress.advance(task, len(chunk))
    if task is not None:
        progress.remove_task(task)
    policy.train(was)
    return out


# --- scoring given responses -------------------------------------------------------------------------
@dataclass
class ResponseBatch:
    """Padded rollouts: prompts left-padded, responses right-padded, side by side in `input_ids`."""

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    responses: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R) float, 1 on real response tokens


def collate_responses(queries: list[list[int]], responses: list[list[int]], pad_id: int, device) -> ResponseBatch:
    q, r = pad_left(queries, pad_id), pad_right(responses, pad_id)
    qm = pad_left([[1] * len(x) for x in queries], 0)
    rm = pad_right([[1] * len(x) for x in responses], 0)
    return ResponseBatch(torch.cat([q, r], 1).to(device), torch.cat([qm, rm], 1).to(device), r.to(device),
                         rm.float().to(device))


def response_logits(model, b: ResponseBatch) -> torch.Tensor:
    """(B, R, V) logits of a causal LM predicting each response token."""
    R = b.responses.shape[1]
    with tail_only(model, R + 1):
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                     position_ids=position_ids(b.attention_mask), use_cache=False, logits_to_keep=R + 1).logits[:, :-1]


@torch.no_grad()
def sequence_logprobs(model, pad_id: int, queries, responses, batch_size: int, device) -> list[float]:
    """Per sample: the sum over its response tokens of log pi(token | prompt, earlier tokens)."""
    out: list[float] = []
    for i in range(0, len(queries), batch_size):
        b = collate_responses(queries[i: i + batch_size], responses[i: i + batch_size], pad_id, device)
        out += (token_logprobs(response_logits(model, b), b.responses) * b.mask).sum(1).tolist()
    return out


@torch.no_grad()
def steered_sequence_logprobs(policy, processors: LogitsProcessorList, pad_id: int, queries, responses,
                              batch_size: int, device) -> list[float]:
    """`sequence_logprobs` under the distribution a sampler with `processors` draws from (ILQL's steering, the
    temperature, top-k: `ilql_generate`'s): each response position's logits and final hidden state go through
    the same processors, then log-softmax. The KL of what was sampled, not of the LM under it."""
    out: list[float] = []
    for i in range(0, len(queries), batch_size):
        b = collate_responses(queries[i: i + batch_size], responses[i: i + batch_size], pad_id, device)
        R = b.responses.shape[1]
        o, hidden = forward_with_hidden(policy, input_ids=b.input_ids, attention_mask=b.attention_mask,
                                        position_ids=position_ids(b.attention_mask), use_cache=False)
        logits, hidden = o.logits[:, -R - 1:-1].float(), hidden[:, -R - 1:-1]
        scores = processors(None, logits.reshape(-1, logits.shape[-1]), hidden_states=hidden.reshape(-1, hidden.shape[-1]))
        lp = token_logprobs(scores.view_as(logits), b.responses)  # -inf past a padded row's end (top-k)
        out += lp.masked_fill(b.mask == 0, 0.0).sum(1).tolist()
    return out
