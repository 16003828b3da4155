"""GRPO family (`rlhf grpo`): critic-free online RL — GRPO (Shao et al. 2024), Dr. GRPO, DAPO, GSPO, RLOO,
REINFORCE++ — on PPO's rollout engine.

One iteration:
  1. rollouts: `num_rollouts` completions, G = `num_generations` of each prompt side by side (KV-cached
     sampling, old log-probs from the sampling pass); with beta > 0, the reference's log-probs;
  2. score them (reward model / function / URL, optionally minus the reference completion's score);
  3. advantages from each prompt's group (losses/grpo.py `group_advantages`): no value head, no GAE;
  4. `num_iterations` passes of the clipped loss (+ beta * k3 KL) over minibatches; the loss is a sum
     over the step's units (completions or tokens, by `loss_type`) that `fit` divides once per step.
The math is in losses/grpo.py; this file moves tensors between those functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ck
from .. import lora
from .. import shared_prompt
from ..data.tokenize import encode_prompt
from ..errors import UserError
from ..heads import FrozenCopy, PolicyOnly, Reference
from ..losses.grpo import group_advantages, grpo_loss, mask_truncated
from ..losses.ppo import entropy, token_logprobs
from ..models import count_params, disable_dropout, load_causal_lm
from ..sampling import collate_responses
from . import distributed, online, rollouts
from .online_eval import mean_gold
from .rollouts import (Scorer, check_lengths, collect_rollouts, load_policy, make_reward_source, response_outputs, warm_up_tiny_policy)
from .stage import Micro, StepLoss


def check_groups(cfg, world_size: int = 1) -> None:
    """G >= 2, and every process's share of an iteration (and every optimizer step) holds whole groups."""
    g, n = cfg.grpo.num_generations, cfg.grpo.num_rollouts
    if g < 2:
        raise UserError(f"grpo.num_generations is {g}; a group needs at least 2 completions of a prompt to compare")
    rollouts.check_batching(cfg, world_size)
    if n % (g * world_size):
        raise UserError(f"grpo.num_rollouts ({n}) must be a multiple of grpo.num_generations ({g}) x processes "
                        f"({world_size}): every prompt's group is sampled whole")


def plan(cfg, out: Path) -> dict:
    g = cfg.grpo
    info: dict = {"output_dir": str(out), "stage": "grpo", "preset": cfg.preset, "policy": cfg.policy_source,
                  "reward": online.reward_label(cfg),
                  "method": f"advantage {g.advantage} (scale {g.scale_rewards}), loss {g.loss_type}, G {g.num_generations}",
                  "reference": "none (beta 0)" if not g.beta else
                               ("the policy, LoRA adapters off" if lora.enabled(cfg) else "frozen copy")
                               + f", k3 KL x {g.beta}"}
    check_groups(cfg, cfg.distributed.num_processes)
    return online.plan_rows(cfg, info, cfg.distributed.num_processes, "completions")


@dataclass
class Experience:
    rollouts: rollouts.Rollouts
    advantages: torch.Tensor  # (N,) one per completion
    mask: torch.Tensor  # (N, R) response tokens that count in the loss (truncated ones masked if asked)
    log: dict
    minibatches: list[list[int]]
    t_train: float = 0.0


def group_stats(scores: torch.Tensor, g: int) -> dict:
    """TRL's reward diagnostics: mean std within groups, and the share of groups whose rewards are all equal
    (their advantages are 0: nothing to learn from them)."""
    std = scores.view(-1, g).std(dim=1)
    return {"rollout/reward_std_in_group": std.mean().item(),
            "rollout/frac_groups_zero_std": (std < 1e-6).float().mean().item()}


def whole_groups(idx: list[int], g: int) -> bool:
    """Whether `idx` is whole groups of g completions (each group's in order), as `online.minibatches` with
    `group` makes them when the micro-batch size is a multiple of g."""
    return len(idx) % g == 0 and all(idx[k] == idx[k - k % g] + k % g and idx[k - k % g] % g == 0
                                     for k in range(len(idx)))


class GRPOStage(online.OnlineStage):
    name, unit = "grpo", "completions"
    check = staticmethod(check_groups)

    def prepare_data(self) -> None:
        super().prepare_data()
        self.unit = "tokens" if self.cfg.grpo.loss_type in ("bnpo", "dapo") else "completions"

    def initial_state(self) -> dict:
        return {"iteration": 0, "prompt_position": 0}

    def build(self, acc):
        cfg, src = self.cfg, self.cfg.policy_source
        self.zero3 = distributed.zero_stage(acc) == 3
        self.source = make_reward_source(cfg, acc.device)
        self.scorer = Scorer(self.source, cfg.reward.delta)
        if src == "tiny":
            src = warm_up_tiny_policy(cfg, ck.partial_dir(self.out) / "init_policy", self.console)
        self.tokenizer, policy = load_policy(cfg, src)
        check_lengths(cfg, policy)
        disable_dropout(policy)
        self.data.train_ids = [encode_prompt(self.tokenizer, p, cfg.data.max_prompt_length)[0] for p, _ in self.data.train]
        model = PolicyOnly(policy).to(acc.device)
        self.reference = None  # beta 0: no reference model at all
        if cfg.grpo.beta:  # with LoRA the same weights with the adapters off: nothing copied
            self.reference = (lora.Reference(model.policy) if lora.enabled(cfg) else
                              FrozenCopy(model.policy) if self.zero3 else Reference(model.policy))
        if self.resume_from is not None and not lora.enabled(cfg):
            model.policy.load_state_dict(load_causal_lm(str(self.resume_from), cfg.model).state_dict())
        lora.attach(model.policy, cfg, self.resume_from, src)  # LoRA resumes its adapter, on the base again
        self.manifest = {"parent": ck.parent_info(src),
                         "data": {"source": cfg.data.source, "format": self.data.fmt,
                                  "fingerprint": self.data.fingerprint, "train_prompts": len(self.data.train),
                                  "eval_prompts": len(self.data.eval)},
                         "reward": {"source": self.source.name, "delta": cfg.reward.delta}}
        return model

    def describe(self) -> str:
        g = self.cfg.grpo
        return (f"grpo: {len(self.data.train)} prompts ({self.data.fmt}), {self.iterations} iterations x "
                f"{g.num_rollouts} completions ({g.num_generations} per prompt), {self.total_steps} optimizer steps, "
                f"advantage {g.advantage}, loss {g.loss_type}, reward {self.source.name}, "
                f"{count_params(self.core.policy) / 1e6:.2f}M parameters, "
                f"{'reference with beta ' + str(g.beta) if g.beta else 'no reference (beta 0)'} -> {self.out}"
                + "".join(f"\n  {n}" for n in self.data.notes))

    # --- 1-3. rollouts in groups, scores, group advantages -----------------------------------------------
    def collect(self, state: dict) -> Experience:
        cfg, g = self.cfg, self.cfg.grpo
        t0 = time.perf_counter()
        timings = {"generate": 0.0, "score": 0.0, "forward": 0.0}
        ro = collect_rollouts(self.core, self.reference, self.tokenizer, self.data, self.scorer, self.prompt_batches,
                              state, cfg, self.acc.device, timings, self.progress, g.num_rollouts // self.world[1],
                              self.zero3, repeats=g.num_generations, keyed=True)
        scores = ro.scores.to(self.acc.device)
        # advantages of every process's completions (as TRL gathers them): a group lives on one process, but
        # "batch" scaling and REINFORCE++'s whitening take the statistics of the whole iteration
        rank, n = self.world[0], len(scores)
        every = torch.tensor(distributed.all_gather(ro.scores.tolist()), device=scores.device)
        lengths = torch.tensor(distributed.all_gather(ro.mask.sum(1).tolist()), device=scores.device)
        advantages = group_advantages(every, g.num_generations, g.advantage, g.scale_rewards,
                                      lengths=lengths)[rank * n: (rank + 1) * n]
        mask = ro.mask
        if g.mask_truncated_completions:
            eos = self.tokenizer.eos_token_id
            truncated = torch.tensor([len(r) >= g.generation.max_new_tokens and r[-1] != eos for r in ro.responses],
                                     device=mask.device)
            mask = mask_truncated(mask, truncated)
        log = {"rollout/reward": distributed.all_reduce(scores.mean().item()),
               "rollout/score_raw": distributed.all_reduce(sum(ro.raw_scores) / len(ro.raw_scores)),
               **{k: distributed.all_reduce(v) for k, v in group_stats(scores, g.num_generations).items()},
               "rollout/response_length": distributed.all_reduce(ro.mask.sum(1).mean().item()),
               **{f"time/{k}": v for k, v in timings.items()}}
        log.update({f"rollout/reward/{k}": distributed.all_reduce(v) for k, v in self.scorer.take_parts().items()})
        gold = mean_gold(ro.prompts, ro.texts)
        if gold is not None:
            log["rollout/gold"] = distributed.all_reduce(gold)
        minibatches = online.minibatches(len(ro.queries), g.num_iterations,
                                         cfg.train.batch_size * cfg.train.gradient_accumulation_steps,
                                         group=g.num_generations)
        exp = Experience(ro, advantages, mask, log, minibatches, time.perf_counter())
        exp.log["time/experience"] = exp.t_train - t0
        return exp

    # --- 4. the clipped loss over minibatches (OnlineStage.next_step) -------------------------------------
    def micro(self, idx: list[int]) -> Micro:
        """Completions `idx`; units as the loss type aggregates (tokens for bnpo / dapo, else completions)."""
        units = int(self.experience.mask[idx].sum()) if self.unit == "tokens" else len(idx)
        return Micro(idx, units=units)  # episodes and tokens are counted once per iteration, in after_step

    def loss(self, model, micro: Micro) -> StepLoss:
        g, exp, idx = self.cfg.grpo, self.experience, micro.data
        ro = exp.rollouts
        b = collate_responses([ro.queries[i] for i in idx], [ro.responses[i] for i in idx],
                              self.tokenizer.pad_token_id, self.acc.device)
        R = b.responses.shape[1]
        logits = self.shared_logits(model, idx)
        if logits is None:
            logits, _ = response_outputs(model, b)
        lse = torch.logsumexp(logits.float(), dim=-1)
        logprobs = token_logprobs(logits, b.responses, lse)
        mask = exp.mask[idx, :R]
        out = grpo_loss(logprobs, ro.logprobs[idx, :R], ro.ref_logprobs[idx, :R] if self.reference is not None else None,
                        exp.advantages[idx], mask, loss_type=g.loss_type, epsilon=g.epsilon,
                        epsilon_high=g.epsilon_high, beta=g.beta, importance=g.importance,
                        max_completion_length=g.generation.max_new_tokens)
        # token statistics are logged as token means: weighted by this micro-batch's units like the loss
        per_token = micro.units / max(float(out.tokens), 1.0)
        stats = {"clip_low": out.clip_low * per_token, "clip_high": out.clip_high * per_token,
                 "kl": out.kl * per_token,
                 "entropy": entropy(logits.detach(), mask, lse.detach()) * micro.units}
        return StepLoss(out.loss_sum, {k: float(v) for k, v in stats.items()})

    def shared_logits(self, model, idx: list[int]) -> torch.Tensor | None:
        """(B, R, V) response logits with each group's prompt run once (P + G R tokens, not G (P + R)); None
        when the micro-batch is not whole groups or the model cannot share a cache (gradient checkpointing)."""
        g, ro = self.cfg.grpo.num_generations, self.experience.rollouts
        if not whole_groups(idx, g) or not shared_prompt.usable(model):
            return None
        groups = [[ro.queries[i] + ro.responses[i] for i in idx[k: k + g]] for k in range(0, len(idx), g)]
        s = shared_prompt.split(groups, [len(ro.queries[idx[k]]) for k in range(0, len(idx), g)],
                                self.tokenizer.pad_token_id)
        return None if s is None else model(shared=s.to(self.acc.device))[0]

    def after_step(self, state: dict) -> dict:
        exp = self.experience
        if exp.minibatches:
            return {}
        self.end_iteration(state)
        return {**exp.log, "time/train": time.perf_counter() - exp.t_train}
