"""The stage registry: one name per stage — the `rlhf` subcommand, the config's `stage:` and the
manifest's — with its config class, its trainer (a `Stage` that `fit` runs), its dry-run plan and the
kind of checkpoint it writes. A new method is one entry here, one trainer file and its pure loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import CONFIGS, StageConfig
from .errors import UserError
from .trainers import dpo, grpo, ilql, ppo, sft, train_rm
from .trainers.stage import Stage


@dataclass(frozen=True)
class StageSpec:
    name: str  # the CLI's subcommand, the config's `stage:`, the manifest's `stage`
    config: type[StageConfig]
    trainer: type[Stage]
    plan: Callable[..., dict]  # (cfg, output dir) -> what `--dry-run` prints
    writes: str  # the checkpoint kind: "policy" (a causal LM) or "reward" (a sequence classifier)
    summary: str


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("sft", CONFIGS["sft"], sft.SFTStage, sft.plan, "policy",
              "Supervised fine-tuning of a causal LM on prompt/completion (or plain text) data."),
    StageSpec("train-rm", CONFIGS["train-rm"], train_rm.RewardModelStage, train_rm.plan, "reward",
              "Train a reward model (scalar head, Bradley-Terry loss) on preference pairs."),
    StageSpec("dpo", CONFIGS["dpo"], dpo.DPOStage, dpo.plan, "policy",
              "Direct preference optimisation of a policy on preference pairs (no reward model)."),
    StageSpec("ppo", CONFIGS["ppo"], ppo.PPOStage, ppo.plan, "policy",
              "Online RLHF with PPO: sample, score with a reward model or function, update the policy under a "
              "KL penalty."),
    StageSpec("ilql", CONFIGS["ilql"], ilql.ILQLStage, ilql.plan, "policy",
              "Offline RL with ILQL: Q/V heads learned from rewarded samples steer generation."),
    StageSpec("grpo", CONFIGS["grpo"], grpo.GRPOStage, grpo.plan, "policy",
              "Critic-free online RL (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++): G completions per prompt, "
              "advantages relative to the group."),
)}
assert set(STAGES) == set(CONFIGS) and all(s.trainer.name == n for n, s in STAGES.items())


def get(name: str) -> StageSpec:
    if name not in STAGES:
        raise UserError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    return STAGES[name]
