"""PPO (`rlhf ppo`): online RLHF of a policy against a reward model or a reward function.

One iteration (Stiennon et al. 2020; trlx's AcceleratePPOTrainer):
  1. rollouts: sample completions for `num_rollouts` prompts, `chunk_size` per generate call
     (KV cache); cut at stop sequences, ending with EOS;
  2. score them (reward model / function / URL; optionally minus the reference completion's score),
     scale and clip the scores;
  3. one no-grad forward of the policy (log-probs, values) and of the reference (log-probs);
     rewards = -beta * log-ratio per token + score on the last token; GAE; whitened advantages;
  4. `ppo_epochs` passes of clipped policy + value loss over minibatches;
  5. adapt beta towards the KL target; log, evaluate, checkpoint at their intervals.
The math is in losses/ppo.py; this file moves tensors between those functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ck
from .. import lora
from ..data.tokenize import encode_prompt
from ..heads import FrozenCopy, PolicyWithValueHead, Reference
from ..losses.ppo import (RunningMoments, adaptive_kl_coef, entropy, gae, kl_penalized_rewards, masked_mean,
                          policy_loss, sequence_kl, token_logprobs, value_loss, whiten)
from ..models import (count_params, disable_dropout, load_causal_lm, train_top_blocks)
from ..sampling import collate_responses
from . import distributed, online, rollouts
from .online_eval import mean_gold
from .rollouts import (Scorer, check_batching, check_lengths, collect_rollouts, load_policy,
                       make_reward_source, response_outputs, warm_up_tiny_policy)
from .stage import Micro, StepLoss


def plan(cfg, out: Path) -> dict:
    info: dict = {"output_dir": str(out), "stage": "ppo", "preset": cfg.preset, "policy": cfg.policy_source,
                  "reward": online.reward_label(cfg),
                  "kl": f"beta {cfg.ppo.init_kl_coef}, " + (f"adaptive to {cfg.ppo.target} nats" if cfg.ppo.target
                                                            else "fixed"),
                  "reference": "the policy with its LoRA adapters off" if lora.enabled(cfg) else
                               "full frozen copy" if cfg.ppo.num_layers_unfrozen < 0 else
                               f"frozen trunk shared, top {cfg.ppo.num_layers_unfrozen} blocks copied"}
    check_batching(cfg, cfg.distributed.num_processes)
    return online.plan_rows(cfg, info, cfg.distributed.num_processes, "rollouts")


@dataclass
class Experience:
    """One iteration's rollouts with their advantages and returns, and the minibatches still to train on."""

    rollouts: rollouts.Rollouts
    advantages: torch.Tensor  # (N, R)
    returns: torch.Tensor  # (N, R)
    log: dict  # the iteration's rollout metrics
    sequence_kl: float  # mean k3 KL over every process, for the KL controller
    minibatches: list[list[int]]  # rollout indices of each remaining optimizer step
    t_train: float = 0.0


class PPOStage(online.OnlineStage):
    name, unit = "ppo", "response tokens"
    check = staticmethod(check_batching)

    def initial_state(self) -> dict:
        return {"iteration": 0, "prompt_position": 0, "kl_coef": self.cfg.ppo.init_kl_coef,
                "moments": RunningMoments().state_dict(), "ref_std": None}

    def build(self, acc):
        """Policy + value head; the reference is always the initial policy (also when resuming)."""
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
        if not lora.enabled(cfg):  # LoRA trains its adapters, every block's
            train_top_blocks(policy, cfg.ppo.num_layers_unfrozen)
        model = PolicyWithValueHead(policy)
        model.load_value_head(Path(src).expanduser())  # continuing from a PPO checkpoint keeps its value head
        model.to(acc.device)
        # the initial values of what trains, the rest shared; under ZeRO-3 (sharded weights) a whole copy
        # with LoRA the same weights with the adapters off: nothing copied
        self.reference = (lora.Reference(model.policy) if lora.enabled(cfg) else
                          FrozenCopy(model.policy) if self.zero3 else Reference(model.policy))
        if self.resume_from is not None and not lora.enabled(cfg):
            model.policy.load_state_dict(load_causal_lm(str(self.resume_from), cfg.model).state_dict())
        lora.attach(model.policy, cfg, self.resume_from, src)  # LoRA resumes its adapter, on the base again
        if self.resume_from is not None:
            model.load_value_head(self.resume_from)
        self.manifest = {"parent": ck.parent_info(src),
                         "data": {"source": cfg.data.source, "format": self.data.fmt,
                                  "fingerprint": self.data.fingerprint, "train_prompts": len(self.data.train),
                                  "eval_prompts": len(self.data.eval)},
                         "reward": {"source": self.source.name, "delta": cfg.reward.delta},
                         "value_head": "value_head.safetensors"}
        return model

    def start(self, model, acc, state: dict) -> None:
        super().start(model, acc, state)
        self.moments = RunningMoments(**state["moments"])

    def describe(self) -> str:
        cfg, core = self.cfg, self.core
        trainable = sum(p.numel() for p in core.parameters() if p.requires_grad)
        return (f"ppo: {len(self.data.train)} prompts ({self.data.fmt}), {self.iterations} iterations x "
                f"{cfg.ppo.num_rollouts} rollouts, {self.total_steps} optimizer steps, reward {self.source.name}"
                f"{' (delta)' if cfg.reward.delta else ''}, {trainable / 1e6:.2f}M trainable parameters (policy "
                f"{count_params(core.policy) / 1e6:.2f}M, value head {count_params(core.value_head) / 1e6:.2f}M) "
                f"-> {self.out}" + "".join(f"\n  {n}" for n in self.data.notes))

    # --- 1-3. the experience phase: rollouts, scores, KL-penalised rewards, GAE -------------------------
    def collect(self, state: dict) -> Experience:
        cfg, ppo, device = self.cfg, self.cfg.ppo, self.acc.device
        t0 = time.perf_counter()
        timings = {"generate": 0.0, "score": 0.0, "forward": 0.0}
        ro = collect_rollouts(self.core, self.reference, self.tokenizer, self.data, self.scorer,
                              self.prompt_batches, state, cfg, device, timings, self.progress,
                              ppo.num_rollouts // self.world[1], self.zero3)
        scores = self.scale(ro.scores.clone(), state)
        rewards, log_ratio = kl_penalized_rewards(scores.to(device), ro.logprobs, ro.ref_logprobs, ro.mask,
                                                    state["kl_coef"])
        k1, k3 = sequence_kl(log_ratio, ro.mask)
        advantages, returns = gae(rewards, ro.values, ro.mask, ppo.gamma, ppo.lam)
        advantages = whiten(advantages, ro.mask)
        mean_kl = distributed.all_reduce(k3.mean().item())  # one coefficient on every process
        log = {"rollout/reward": self.batch_mean, "rollout/reward_std": self.batch_std,
               "rollout/score_raw": distributed.all_reduce(sum(ro.raw_scores) / len(ro.raw_scores)),
               "rollout/kl": mean_kl, "rollout/kl_k1": distributed.all_reduce(k1.mean().item()),
               "rollout/response_length": distributed.all_reduce(ro.mask.sum(1).mean().item()),
               "train/returns": masked_mean(returns, ro.mask).item(),
               **{f"time/{k}": v for k, v in timings.items()}}
        log.update({f"rollout/reward/{k}": distributed.all_reduce(v) for k, v in self.scorer.take_parts().items()})
        gold = mean_gold(ro.prompts, ro.texts)
        if gold is not None:
            log["rollout/gold"] = distributed.all_reduce(gold)
        minibatches = online.minibatches(len(ro.queries), ppo.ppo_epochs,
                                         cfg.train.batch_size * cfg.train.gradient_accumulation_steps)
        exp = Experience(ro, advantages, returns, log, mean_kl, minibatches, time.perf_counter())
        exp.log["time/experience"] = exp.t_train - t0
        return exp

    def scale(self, scores: torch.Tensor, state: dict) -> torch.Tensor:
        """Scores divided by the running or the first iteration's std, then clipped, as configured."""
        ppo = self.cfg.ppo
        # the moments (and the first iteration's std) are of every process's scores, so all scale alike
        self.batch_mean, self.batch_std = self.moments.update(torch.tensor(distributed.all_gather(scores.tolist())))
        if ppo.scale_reward == "running":
            scores = scores / max(self.moments.std, 1e-8)
        elif ppo.scale_reward == "ref":
            if state["ref_std"] is None:
                state["ref_std"] = max(self.batch_std, 1e-8)
            scores = scores / state["ref_std"]
        if ppo.cliprange_reward:
            scores = scores.clamp(-ppo.cliprange_reward, ppo.cliprange_reward)
        return scores

    # --- 4. ppo_epochs over minibatches (OnlineStage.next_step) ------------------------------------------
    def micro(self, idx: list[int]) -> Micro:
        """Rollouts `idx` of the current experience; the units are their response tokens."""
        return Micro(idx, units=int(self.experience.rollouts.mask[idx].sum()))

    def loss(self, model, micro: Micro) -> StepLoss:
        ppo, exp, idx = self.cfg.ppo, self.experience, micro.data
        ro = exp.rollouts
        b = collate_responses([ro.queries[i] for i in idx], [ro.responses[i] for i in idx], self.tokenizer.pad_token_id,
                    self.acc.device)
        R = b.responses.shape[1]
        logits, values = response_outputs(model, b)
        lse = torch.logsumexp(logits.float(), dim=-1)  # one pass over the vocabulary, for both
        logprobs = token_logprobs(logits, b.responses, lse)
        pl = policy_loss(logprobs, ro.logprobs[idx, :R], exp.advantages[idx, :R], b.mask, ppo.cliprange)
        vl = value_loss(values, ro.values[idx, :R], exp.returns[idx, :R], b.mask, ppo.cliprange_value)
        n = micro.units  # the losses are means over this micro-batch's response tokens
        with torch.no_grad():
            stats = {"policy_loss": pl.loss, "value_loss": vl.loss, "approx_kl": pl.approx_kl,
                     "clipfrac": pl.clipfrac, "vf_clipfrac": vl.clipfrac, "value_error": vl.error,
                     "entropy": entropy(logits.detach(), b.mask, lse.detach())}
        return StepLoss((pl.loss + ppo.vf_coef * vl.loss) * n, {k: v.item() * n for k, v in stats.items()})

    # --- 5. KL controller; the iteration's metrics -------------------------------------------------------
    def after_step(self, state: dict) -> dict:
        exp, ppo = self.experience, self.cfg.ppo
        if exp.minibatches:
            return {}
        if ppo.target:
            state["kl_coef"] = adaptive_kl_coef(state["kl_coef"], exp.sequence_kl, ppo.target, ppo.horizon,
                                                  ppo.num_rollouts)
        state["moments"] = self.moments.state_dict()
        self.end_iteration(state)
        return {**exp.log, "train/kl_coef": state["kl_coef"], "time/train": time.perf_counter() - exp.t_train}
