"""What every online-RL stage (PPO, the GRPO family) shares around its own math: the dry-run plan's data
rows, the start-from-a-policy check, the iteration count, the experience-then-minibatches step, the
iteration boundary, and the held-out eval with its sample history.
A method supplies `check` (its batching rules), `collect` (one iteration's experience, with `minibatches`)
and `loss`; see trainers/ppo.py and trainers/grpo.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..models import count_params, expect_kind
from ..rewards import weighted_names
from . import common
from .online_eval import evaluate, show_samples
from .rollouts import iteration_steps, load_policy, load_prompts, total_iterations
from .stage import Micro, Stage


def reward_label(cfg) -> str:
    r = cfg.reward
    if r.sources is not None:  # checked here too, so that --dry-run refuses a bad list
        return " + ".join(f"{w:g} x {n}" for n, w in weighted_names(r.sources, r.weights))
    src = r.ckpt or r.fn or r.url or r.classifier or "none given (pass --reward-ckpt / --reward-fn / --reward-url)"
    return f"{src}{' minus the reference completion' if r.delta else ''}"


def plan_rows(cfg, info: dict, world_size: int, counted: str) -> dict:
    """The dry run's data, iteration and model rows (`counted`: what an iteration's num_rollouts are)."""
    src = cfg.policy_source
    if common.plan_without_download(cfg, info, src):
        return info
    data = load_prompts(cfg)
    iters = total_iterations(cfg, len(data.train), world_size)
    info.update({"data": f"{cfg.data.source} ({data.fmt}): {len(data.train)} prompts, {len(data.eval)} held-out",
                 "data_notes": "; ".join(data.notes) or "none", "iterations": iters,
                 counted: iters * cfg.online.num_rollouts,
                 "optimizer_steps": iters * iteration_steps(cfg, world_size)})
    if src != "tiny":
        _, model = load_policy(cfg, src)
        info["model"] = f"{count_params(model) / 1e6:.2f}M parameters"
    return info


def minibatches(n: int, passes: int, size: int, group: int = 1) -> list[list[int]]:
    """Indices of the optimizer steps of one iteration: `passes` shuffled passes over n rollouts. With
    `group` > 1 the groups of that many consecutive rollouts are shuffled whole (GRPO: a micro-batch of whole
    groups runs each prompt once)."""
    out = []
    for _ in range(passes):
        perm = [p * group + j for p in torch.randperm(n // group).tolist() for j in range(group)]
        out += [perm[i: i + size] for i in range(0, n - size + 1, size)]
    return out


class OnlineStage(Stage):
    throughput = "episodes"
    best_metric, best_mode = "eval/reward", "max"

    @classmethod
    def precheck(cls, cfg) -> None:
        src = cfg.policy_source
        if src == "tiny" and not cfg.init_sft_steps:
            raise UserError(f"{cls.name} needs a trained policy to start from: pass --policy runs/sft "
                            "(or set init_sft_steps to warm up a tiny one)")
        if Path(src).expanduser().exists():
            expect_kind(Path(src).expanduser(), "policy", "--policy")

    @staticmethod
    def check(cfg, world_size: int) -> None:
        """The method's batching rules, refused in one sentence (also on --dry-run)."""

    def prepare_data(self) -> None:
        world_size = self.world[1]
        self.check(self.cfg, world_size)
        self.data = load_prompts(self.cfg)
        self.steps_per_iteration = iteration_steps(self.cfg, world_size)
        self.iterations = total_iterations(self.cfg, len(self.data.train), world_size)
        self.total_steps = self.iterations * self.steps_per_iteration
        self.history: list[dict] = []  # the first 8 eval samples of every eval: how the completions change
        self.experience = None

    def start(self, model, acc, state: dict) -> None:
        super().start(model, acc, state)
        self.core = acc.unwrap_model(model)
        rank, world_size = self.world
        self.prompt_batches = common.Batcher(len(self.data.train), self.cfg.online.chunk_size, self.cfg.seed, rank,
                                             world_size)

    def collect(self, state: dict):
        """One iteration's experience (rollouts, advantages, log, `minibatches`): the method's own (abstract,
        as Stage's hooks)."""
        raise NotImplementedError

    def next_step(self, state: dict) -> list[Micro]:
        if self.experience is None:
            self.experience = self.collect(state)
        idx = self.experience.minibatches.pop(0)
        b = self.cfg.train.batch_size
        return [self.micro(idx[i: i + b]) for i in range(0, len(idx), b)]

    def at_boundary(self, state: dict) -> bool:
        return self.experience is None  # eval and checkpoints only between iterations

    def end_iteration(self, state: dict) -> None:
        ro = self.experience.rollouts
        state["iteration"] += 1
        state["examples"] += len(ro.texts)
        state["tokens"] += int(ro.mask.sum())  # response tokens
        self.experience = None

    def evaluate(self, core, progress) -> tuple[dict, list[dict]]:
        metrics, samples = evaluate(core, self.reference, self.tokenizer, self.data, self.scorer, self.cfg,
                                    self.acc.device, progress, self.zero3)
        step = self.state["step"]
        show_samples(self.console, samples, step)
        self.history += [{"step": step, **x} for x in samples[:8]]
        return metrics, samples

    def extra_files(self, samples: list[dict]) -> dict[str, str]:
        return {"eval_samples.jsonl": common.jsonl(samples), "eval_samples_history.jsonl": common.jsonl(self.history)}
