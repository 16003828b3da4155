"""The rollout engine of online RL (PPO today; every critic-free method next): prompts, reward sources,
KV-cached sampling of completions with their log-probs and values, scores, and the held-out eval
(reward, gold, KL to the reference, ROUGE) that online methods share.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SFTConfig
from ..data import formats
from ..data.sources import load_formatted
from ..data.tokenize import encode_prompt
from ..errors import UserError
from ..losses.ppo import token_logprobs
from ..models import load_trained_policy, max_positions
from ..rewards import columns_of, make_reward, make_weighted
from ..sampling import ResponseBatch, collate_responses, generate, row_noise, sample
from . import common, sft
from .loop import fit


# --- prompts -----------------------------------------------------------------------------------------
@dataclass
class PromptData:
    train: list[tuple[str, str | None]]  # (prompt, reference completion or None)
    eval: list[tuple[str, str | None]]
    fmt: str
    fingerprint: str
    notes: list[str]
    train_ids: list[list[int]] | None = None  # the train prompts tokenized once, before the loop
    train_columns: list[dict] | None = None  # each prompt's other data columns (e.g. `answer`), for reward fns
    eval_columns: list[dict] | None = None


def load_prompts(cfg) -> PromptData:
    """Prompts (and reference completions, for delta rewards and ROUGE) of any SFT-style dataset.

    Plain text (format text, e.g. movie reviews) gives prompts of its first `ppo.prompt_words` words.
    """
    split, fmt = load_formatted(cfg.data, kind="sft", seed=cfg.seed,
                                chat=common.chat_renderer(cfg, cfg.policy_source))

    def pairs(rows) -> tuple[list, list[dict]]:
        examples, _ = formats.sft_examples(rows, fmt)
        if fmt == "text":
            n = cfg.online.prompt_words
            kept = [e for e in examples if len(e.completion.split()) > n]
            return [(" ".join(e.completion.split()[:n]), None) for e in kept], [e.meta for e in kept]
        kept = [e for e in examples if e.prompt]
        return [(e.prompt, e.completion or None) for e in kept], [e.meta for e in kept]  # None: prompt-only data

    (train, train_cols), (held, held_cols) = pairs(split.train), pairs(split.eval)
    if cfg.data.max_examples:
        train, train_cols = train[: cfg.data.max_examples], train_cols[: cfg.data.max_examples]
    if not train:
        raise UserError(f"dataset '{cfg.data.source}' has no prompts for {cfg.stage}")
    return PromptData(train, held, fmt, split.fingerprint(), split.notes, None, train_cols, held_cols)


def load_policy(cfg, path: str):
    return load_trained_policy(cfg, path, "ppo")


def warm_up_tiny_policy(cfg, dest: Path, console) -> str:
    """SFT of a tiny policy on the data's text, `init_sft_steps` steps: PPO's starting point when
    no pretrained policy is given (trlx's sentiment example starts from gpt2-imdb)."""
    sft_cfg = SFTConfig(seed=cfg.seed, model=cfg.model, tokenizer=cfg.tokenizer, data=cfg.data,
                        train=cfg.train.model_copy(update={"max_steps": cfg.init_sft_steps, "learning_rate": 2e-3,
                                                           "batch_size": 32, "warmup_ratio": 0.05}),
                        eval=cfg.eval.model_copy(update={"at_start": False, "num_samples": 16}),
                        checkpoint=cfg.checkpoint.model_copy(update={"interval": 0}), output_dir=str(dest))
    console.print(f"ppo: the policy is 'tiny': first {cfg.init_sft_steps} SFT steps on {cfg.data.source} -> {dest}")
    fit(sft.SFTStage, sft_cfg, dest, resume=dest.exists(), console=console)
    return str(dest)


def make_reward_source(cfg, device):
    r = cfg.reward
    single = any((r.ckpt, r.fn, r.url, r.classifier))
    kw = dict(device=r.device or str(device), positive_label=r.positive_label, batch_size=r.batch_size,
              max_length=cfg.data.max_length, token_env=r.token_env, protocol=r.protocol, model_name=r.model_name,
              inputs=r.inputs, output=r.output, tokenizer=r.tokenizer, max_concurrency=r.max_concurrency)
    if r.sources is not None:
        if single:
            raise UserError("give the reward either as reward.sources or as one of reward.ckpt / fn / url / classifier, "
                            "not both")
        return make_weighted(r.sources, r.weights, **kw)
    if r.weights is not None:
        raise UserError("reward.weights weighs the entries of reward.sources, and there are none")
    if not single:
        raise UserError(f"{cfg.stage} needs a reward: pass --reward-ckpt runs/rm, --reward-fn module:function or --reward-url")
    return make_reward(r.ckpt, r.fn, r.url, classifier=r.classifier, **kw)


class Scorer:
    """Scores of completions; with `delta`, minus the score of the prompt's reference completion.

    Reference scores are computed once per prompt and cached (the reward of a fixed text never changes).
    """

    def __init__(self, source, delta: bool):
        self.source, self.delta = source, delta
        self._ref: dict[tuple[str, str], float] = {}
        self._parts: dict[str, list[float]] = {}  # each weighted source's scores since take_parts

    def raw(self, prompts, completions, refs, columns: list[dict] | None = None) -> list[float]:
        """The source's scores; the references and the data's other columns go along by name."""
        out = self.source.score(prompts, completions, references=list(refs), **columns_of(columns))
        for name, scores in getattr(self.source, "last", {}).items():
            self._parts.setdefault(name, []).extend(scores)
        return out

    def take_parts(self) -> dict[str, float]:
        """Mean score of each weighted source since the last call (empty for a single source)."""
        out = {name: sum(v) / len(v) for name, v in self._parts.items() if v}
        self._parts = {}
        return out

    def reference_scores(self, prompts, refs) -> list[float]:
        todo = sorted({(p, r) for p, r in zip(prompts, refs) if (p, r) not in self._ref})
        if todo:
            for key, s in zip(todo, self.source.score([p for p, _ in todo], [r for _, r in todo])):
                self._ref[key] = s
        return [self._ref[(p, r)] for p, r in zip(prompts, refs)]

    def __call__(self, prompts, completions, refs, columns: list[dict] | None = None) -> tuple[list[float], list[float]]:
        """(rewards used for training, raw scores)."""
        raw = self.raw(prompts, completions, refs, columns)
        if not self.delta:
            return raw, raw
        if any(r is None for r in refs):
            raise UserError("reward.delta needs a reference completion for every prompt, and this data has none; "
                            "set reward.delta=false")
        return [a - b for a, b in zip(raw, self.reference_scores(prompts, refs))], raw


# --- rollouts ----------------------------------------------------------------------------------------
def response_outputs(model, b: ResponseBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R, V) logits predicting each response token and (B, R) values of the state before it."""
    R = b.responses.shape[1]
    logits, values = model(b.input_ids, b.attention_mask, num_logits=R + 1)
    return logits[:, :-1], values[:, :-1]


def _pad_to(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[0])) for x in rows])


@dataclass
class Rollouts:
    queries: list[list[int]]
    responses: list[list[int]]
    logprobs: torch.Tensor  # (N, R) old policy
    ref_logprobs: torch.Tensor  # (N, R)
    values: torch.Tensor  # (N, R) old values
    mask: torch.Tensor  # (N, R)
    scores: torch.Tensor  # (N,) after delta, scaling and clipping
    raw_scores: list[float]
    texts: list[str]
    prompts: list[str]


def iteration_steps(cfg, world_size: int = 1) -> int:
    """Optimizer steps per PPO iteration: ppo_epochs passes over num_rollouts in minibatches."""
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    return cfg.online.passes * max(1, cfg.online.num_rollouts // (per_step * world_size))


def total_iterations(cfg, num_prompts: int, world_size: int = 1) -> int:
    """train.max_steps (optimizer steps, rounded up to whole iterations), else epochs over the prompts.
    `num_rollouts` counts the rollouts of one iteration over all processes; each collects its share."""
    if cfg.train.max_steps:
        return max(1, math.ceil(cfg.train.max_steps / iteration_steps(cfg, world_size)))
    per_prompt = getattr(cfg.online, "num_generations", 1)  # GRPO: G completions of each prompt
    return max(1, math.ceil(cfg.train.epochs * num_prompts * per_prompt / cfg.online.num_rollouts))


def check_batching(cfg, world_size: int = 1) -> None:
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world_size
    m, name = cfg.online, cfg.stage
    if m.num_rollouts < per_step:
        raise UserError(f"{name}.num_rollouts ({m.num_rollouts}) must be at least train.batch_size x "
                        f"gradient_accumulation_steps x processes ({per_step}), the rollouts of one optimizer step")
    if m.num_rollouts % world_size:
        raise UserError(f"{name}.num_rollouts ({m.num_rollouts}) must divide evenly over {world_size} processes")


def check_lengths(cfg, policy) -> None:
    limit = max_positions(policy)
    need = cfg.data.max_prompt_length + max(cfg.online.generation.max_new_tokens, cfg.eval.generation.max_new_tokens)
    if limit and need > limit:
        raise UserError(f"data.max_prompt_length + max_new_tokens ({need}) exceeds the model's {limit} positions")


@torch.no_grad()
def collect_rollouts(core, reference, tok, data, scorer, prompt_batches, state, cfg, device, timings,
                     progress, num_rollouts: int, synced: bool = False, repeats: int = 1,
                     keyed: bool = False) -> Rollouts:
    """This process's `num_rollouts` rollouts; every process scores its own (no rank-0 bottleneck).
    `repeats`: completions per prompt, side by side (GRPO's groups). Without a value head the values are 0;
    without a reference (None) so are its log-probs. `keyed`: each completion's sampling noise is seeded by
    (seed, prompt batch, prompt, repeat), so the rollouts do not depend on how prompts are split over
    processes or generate calls (not under ZeRO-3, where transformers' generate samples)."""
    ppo = cfg.online
    queries, responses, texts, prompts, raw, used = [], [], [], [], [], []
    lps, refs_lp, vals = [], [], []
    core.eval()
    task = progress.add_task("rollouts", total=num_rollouts, info="")
    while len(queries) < num_rollouts:
        idx = prompt_batches.indices(state["prompt_position"])[: (num_rollouts - len(queries)) // repeats]
        noise = row_noise([(cfg.seed, state["prompt_position"], i, j) for i in idx for j in range(repeats)],
                          ppo.generation.max_new_tokens) if keyed else None
        state["prompt_position"] += 1
        unique = [data.train_ids[i] for i in idx] if data.train_ids is not None else None
        idx = [i for i in idx for _ in range(repeats)]
        chunk = [data.train[i] for i in idx]
        q = ([data.train_ids[i] for i in idx] if data.train_ids is not None
             else [encode_prompt(tok, p, cfg.data.max_prompt_length)[0] for p, _ in chunk])
        t = time.perf_counter()
        # old log-probs and values come with the samples; under ZeRO-3 (every process steps until all
        # are done) HF generate samples and a forward pass scores
        shared = repeats > 1 and unique is not None  # a group's G samples share one prefill of its prompt
        s = None if synced else sample(core.policy, tok, unique if shared else q, ppo.generation, ppo.stop_sequences,
                                       core.value_head, noise=noise, repeats=repeats if shared else 1)
        r = s.responses if s is not None else generate(core.policy, tok, q, ppo.generation, len(q), None,
                                                       stop_sequences=ppo.stop_sequences, keep_eos=True,
                                                       synced_gpus=synced)
        timings["generate"] += time.perf_counter() - t
        txt = tok.batch_decode(r, skip_special_tokens=True)
        t = time.perf_counter()
        try:
            rewards, raw_scores = scorer([p for p, _ in chunk], txt, [ref for _, ref in chunk],
                                         [data.train_columns[i] for i in idx] if data.train_columns else None)
        except UserError as e:  # e.g. a NaN score: name where the run stopped (its last checkpoint is kept)
            raise UserError(f"at step {state['step']} (iteration {state['iteration'] + 1}): {e}") from None
        timings["score"] += time.perf_counter() - t
        t = time.perf_counter()
        b = collate_responses(q, r, tok.pad_token_id, device)
        R = b.responses.shape[1]
        if s is None:
            logits, values = response_outputs(core, b)
            lp = token_logprobs(logits, b.responses)
        ref = (token_logprobs(reference.logits(b.input_ids, b.attention_mask, R + 1)[:, :-1], b.responses)
               if reference is not None else torch.zeros(len(q), R, device=device))
        timings["forward"] += time.perf_counter() - t
        for j in range(len(q)):
            n = len(r[j])
            lps.append(s.logprobs[j].to(device) if s is not None else lp[j, :n].float())
            refs_lp.append(ref[j, :n].float())
            if core.value_head is None:
                vals.append(torch.zeros(n, device=device))
            else:
                vals.append(s.values[j].to(device) if s is not None else values[j, :n].float())
        queries += q
        responses += r
        texts += txt
        prompts += [p for p, _ in chunk]
        raw += raw_scores
        used += rewards
        progress.advance(task, len(q))
    progress.remove_task(task)
    core.train()
    width = max(len(r) for r in responses)
    mask = _pad_to([torch.ones(len(r), device=device) for r in responses], width)
    return Rollouts(queries, responses, _pad_to(lps, width), _pad_to(refs_lp, width), _pad_to(vals, width), mask,
                    torch.tensor(used, dtype=torch.float32), raw, texts, prompts)

