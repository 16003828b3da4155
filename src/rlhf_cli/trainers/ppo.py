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

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ck
from .. import sampling
from ..data import formats
from ..data.sources import load_formatted
from ..data.tokenize import encode_prompt, pad_left, pad_right
from ..errors import UserError
from ..eval.generation import generate
from ..heads import FrozenCopy, PolicyWithValueHead, Reference
from ..losses import ppo as L
from ..models import (count_params, disable_dropout, expect_kind, freeze_bottom, load_causal_lm, load_trained_policy,
                      max_positions, transformer_blocks)
from . import common


# --- prompts -----------------------------------------------------------------------------------------
@dataclass
class PromptData:
    train: list[tuple[str, str | None]]  # (prompt, reference completion or None)
    eval: list[tuple[str, str | None]]
    fmt: str
    fingerprint: str
    notes: list[str]
    train_ids: list[list[int]] | None = None  # the train prompts tokenized once, before the loop


def load_prompts(cfg) -> PromptData:
    """Prompts (and reference completions, for delta rewards and ROUGE) of any SFT-style dataset.

    Plain text (format text, e.g. movie reviews) gives prompts of its first `ppo.prompt_words` words.
    """
    split, fmt = load_formatted(cfg.data, kind="sft", seed=cfg.seed)

    def pairs(rows):
        examples, _ = formats.sft_examples(rows, fmt)
        if fmt == "text":
            n = cfg.ppo.prompt_words
            return [(" ".join(e.completion.split()[:n]), None) for e in examples if len(e.completion.split()) > n]
        return [(e.prompt, e.completion) for e in examples if e.prompt]

    train, held = pairs(split.train), pairs(split.eval)
    if cfg.data.max_examples:
        train = train[: cfg.data.max_examples]
    if not train:
        raise UserError(f"dataset '{cfg.data.source}' has no prompts for ppo")
    return PromptData(train, held, fmt, split.fingerprint(), split.notes)


# --- models ------------------------------------------------------------------------------------------
def _policy_source(cfg) -> str:
    return cfg.policy or cfg.model.name_or_path


def _load_policy(cfg, path: str):
    return load_trained_policy(cfg, path, "ppo")


def _freeze(policy, k: int) -> None:
    """Train only the top k blocks (plus what sits above them); -1 trains everything."""
    if k >= 0:
        n = len(transformer_blocks(policy))
        if k > n:
            raise UserError(f"ppo.num_layers_unfrozen is {k} but the model has only {n} blocks")
        freeze_bottom(policy, n - k)
        if k == 0:
            for block in transformer_blocks(policy):
                block.requires_grad_(False)


def warm_up_tiny_policy(cfg, dest: Path, console) -> str:
    """SFT of a tiny policy on the data's text, `init_sft_steps` steps: PPO's starting point when
    no pretrained policy is given (trlx's sentiment example starts from gpt2-imdb)."""
    from ..config import SFTConfig
    from . import sft

    sft_cfg = SFTConfig(seed=cfg.seed, model=cfg.model, tokenizer=cfg.tokenizer, data=cfg.data,
                        train=cfg.train.model_copy(update={"max_steps": cfg.init_sft_steps, "learning_rate": 2e-3,
                                                           "batch_size": 32, "warmup_ratio": 0.05}),
                        eval=cfg.eval.model_copy(update={"at_start": False, "num_samples": 16}),
                        checkpoint=cfg.checkpoint.model_copy(update={"interval": 0}), output_dir=str(dest))
    console.print(f"ppo: the policy is 'tiny': first {cfg.init_sft_steps} SFT steps on {cfg.data.source} -> {dest}")
    sft.run(sft_cfg, dest, resume=dest.exists(), console=console)
    return str(dest)


def make_reward_source(cfg, device):
    from ..rewards import make_reward

    r = cfg.reward
    if not any((r.ckpt, r.fn, r.url, r.classifier)):
        raise UserError("ppo needs a reward: pass --reward-ckpt runs/rm, --reward-fn module:function or --reward-url")
    return make_reward(r.ckpt, r.fn, r.url, device=r.device or str(device), classifier=r.classifier,
                       positive_label=r.positive_label, batch_size=r.batch_size, max_length=cfg.data.max_length,
                       token_env=r.token_env)


class Scorer:
    """Scores of completions; with `delta`, minus the score of the prompt's reference completion.

    Reference scores are computed once per prompt and cached (the reward of a fixed text never changes).
    """

    def __init__(self, source, delta: bool):
        self.source, self.delta = source, delta
        self._ref: dict[tuple[str, str], float] = {}

    def reference_scores(self, prompts, refs) -> list[float]:
        todo = sorted({(p, r) for p, r in zip(prompts, refs) if (p, r) not in self._ref})
        if todo:
            for key, s in zip(todo, self.source.score([p for p, _ in todo], [r for _, r in todo])):
                self._ref[key] = s
        return [self._ref[(p, r)] for p, r in zip(prompts, refs)]

    def __call__(self, prompts, completions, refs) -> tuple[list[float], list[float]]:
        """(rewards used for training, raw scores)."""
        raw = self.source.score(prompts, completions)
        if not self.delta:
            return raw, raw
        if any(r is None for r in refs):
            raise UserError("reward.delta needs a reference completion for every prompt; this data has none")
        return [a - b for a, b in zip(raw, self.reference_scores(prompts, refs))], raw


# --- rollouts ----------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Padded rollouts: prompts left-padded, responses right-padded, side by side in `input_ids`."""

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    responses: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R) float, 1 on real response tokens


def collate(queries: list[list[int]], responses: list[list[int]], pad_id: int, device) -> Batch:
    q, r = pad_left(queries, pad_id), pad_right(responses, pad_id)
    qm = pad_left([[1] * len(x) for x in queries], 0)
    rm = pad_right([[1] * len(x) for x in responses], 0)
    return Batch(torch.cat([q, r], 1).to(device), torch.cat([qm, rm], 1).to(device), r.to(device),
                 rm.float().to(device))


def response_outputs(model, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
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


# --- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def sequence_kls(model, reference: Reference, tok, queries, responses, batch_size: int, device) -> list[float]:
    """Per-sample sum over response tokens of log pi - log pi_ref: an unbiased estimate of KL(pi || ref)."""
    out: list[float] = []
    policy = model.policy
    for i in range(0, len(queries), batch_size):
        b = collate(queries[i: i + batch_size], responses[i: i + batch_size], tok.pad_token_id, device)
        R = b.responses.shape[1]
        kw = dict(input_ids=b.input_ids, attention_mask=b.attention_mask,
                  position_ids=(b.attention_mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=False,
                  logits_to_keep=R + 1)
        lp = L.token_logprobs(policy(**kw).logits[:, :-1], b.responses)
        ref = L.token_logprobs(reference.logits(b.input_ids, b.attention_mask, R + 1)[:, :-1], b.responses)
        out += ((lp - ref) * b.mask).sum(1).tolist()
    return out


def evaluate(model, reference, tok, data: PromptData, scorer: Scorer, cfg, device, progress,
             synced: bool = False) -> tuple[dict, list]:
    """Generate for the fixed held-out prompts: reward (and delta), gold, ROUGE, KL to the reference."""
    from ..eval.metrics import gold_scores, mean_and_stderr, rouge

    pairs = data.eval[: cfg.eval.num_samples]
    if not pairs:
        return {}, []
    was = model.training
    model.eval()
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    queries = [encode_prompt(tok, p, cfg.data.max_prompt_length)[0] for p in prompts]
    responses = generate(model.policy, tok, queries, cfg.eval.generation, cfg.eval.batch_size, cfg.eval.seed,
                         progress, cfg.ppo.stop_sequences, keep_eos=True, synced_gpus=synced)
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    rewards, raw = scorer(prompts, texts, refs) if scorer.delta else (None, scorer.source.score(prompts, texts))
    m: dict = {}
    m["eval/reward"], m["eval/reward_stderr"] = mean_and_stderr(raw)
    if rewards is not None:
        m["eval/reward_delta"], m["eval/reward_delta_stderr"] = mean_and_stderr(rewards)
    gold = gold_scores(prompts, texts)
    if gold is not None:
        m["eval/gold"], m["eval/gold_stderr"] = mean_and_stderr(gold)
    kls = sequence_kls(model, reference, tok, queries, responses, cfg.eval.batch_size, device)
    m["eval/kl"], m["eval/kl_stderr"] = mean_and_stderr(kls)
    if all(r is not None for r in refs):
        m.update({f"eval/{k}": v for k, v in rouge(texts, refs).items()})
    m["eval/response_length"] = sum(len(r) for r in responses) / len(responses)
    model.train(was)
    samples = [{"prompt": p, "completion": t, "reward": s, "kl": k, **({"reference": r} if r is not None else {}),
                **({"gold": g} if gold is not None else {})}
               for p, t, s, k, r, g in zip(prompts, texts, raw, kls, refs, gold or [None] * len(texts))]
    return m, samples


# --- the stage ---------------------------------------------------------------------------------------
def iteration_steps(cfg, world_size: int = 1) -> int:
    """Optimizer steps per PPO iteration: ppo_epochs passes over num_rollouts in minibatches."""
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    return cfg.ppo.ppo_epochs * max(1, cfg.ppo.num_rollouts // (per_step * world_size))


def total_iterations(cfg, num_prompts: int, world_size: int = 1) -> int:
    """train.max_steps (optimizer steps, rounded up to whole iterations), else epochs over the prompts.
    `num_rollouts` counts the rollouts of one iteration over all processes; each collects its share."""
    if cfg.train.max_steps:
        return max(1, math.ceil(cfg.train.max_steps / iteration_steps(cfg, world_size)))
    return max(1, math.ceil(cfg.train.epochs * num_prompts / cfg.ppo.num_rollouts))


def _check_batching(cfg, world_size: int = 1) -> None:
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world_size
    if cfg.ppo.num_rollouts < per_step:
        raise UserError(f"ppo.num_rollouts ({cfg.ppo.num_rollouts}) must be at least train.batch_size x "
                        f"gradient_accumulation_steps x processes ({per_step}), the rollouts of one optimizer step")
    if cfg.ppo.num_rollouts % world_size:
        raise UserError(f"ppo.num_rollouts ({cfg.ppo.num_rollouts}) must divide evenly over {world_size} processes")


def _check_lengths(cfg, policy) -> None:
    limit = max_positions(policy)
    need = cfg.data.max_prompt_length + max(cfg.ppo.generation.max_new_tokens, cfg.eval.generation.max_new_tokens)
    if limit and need > limit:
        raise UserError(f"data.max_prompt_length + max_new_tokens ({need}) exceeds the model's {limit} positions")


def plan(cfg, out: Path, world_size: int = 1) -> dict:
    src = _policy_source(cfg)
    r = cfg.reward
    reward = r.ckpt or r.fn or r.url or r.classifier or "none given (pass --reward-ckpt / --reward-fn / --reward-url)"
    info: dict = {"output_dir": str(out), "stage": "ppo", "preset": cfg.preset, "policy": src,
                  "reward": f"{reward}{' minus the reference completion' if r.delta else ''}",
                  "kl": f"beta {cfg.ppo.init_kl_coef}, " + (f"adaptive to {cfg.ppo.target} nats" if cfg.ppo.target
                                                            else "fixed"),
                  "reference": "full frozen copy" if cfg.ppo.num_layers_unfrozen < 0 else
                               f"frozen trunk shared, top {cfg.ppo.num_layers_unfrozen} blocks copied"}
    _check_batching(cfg, world_size)
    if common.plan_without_download(cfg, info, src):
        return info
    data = load_prompts(cfg)
    iters = total_iterations(cfg, len(data.train), world_size)
    info.update({"data": f"{cfg.data.source} ({data.fmt}): {len(data.train)} prompts, {len(data.eval)} held-out",
                 "iterations": iters, "rollouts": iters * cfg.ppo.num_rollouts,
                 "optimizer_steps": iters * iteration_steps(cfg, world_size)})
    if src != "tiny":
        _, model = _load_policy(cfg, src)
        info["model"] = f"{count_params(model) / 1e6:.2f}M parameters"
    return info


def run(cfg, out: Path, resume: bool = False, overwrite: bool = False, console=None) -> dict:
    from rich.console import Console

    console = console or Console(stderr=True)
    resume_from = ck.prepare_output(out, resume, overwrite)
    src = _policy_source(cfg)
    if src == "tiny" and not cfg.init_sft_steps:
        raise UserError("ppo needs a trained policy to start from: pass --policy runs/sft "
                        "(or set init_sft_steps to warm up a tiny one)")
    if Path(src).expanduser().exists():
        expect_kind(Path(src).expanduser(), "policy", "--policy")
    acc = common.setup_accelerator(cfg)
    rank, world_size = common.world(acc)
    _check_batching(cfg, world_size)
    zero3 = common.zero_stage(acc) == 3
    torch.manual_seed(cfg.seed)
    P = cfg.ppo

    # 1. prompts, reward, policy (+ value head) and the reference (always the initial policy)
    data = load_prompts(cfg)
    steps_per_iter = iteration_steps(cfg, world_size)
    iterations = total_iterations(cfg, len(data.train), world_size)
    steps = iterations * steps_per_iter
    if (done := common.already_complete(out, resume_from, steps, console)) is not None:
        return done
    source = make_reward_source(cfg, acc.device)
    scorer = Scorer(source, cfg.reward.delta)
    run_ = common.Run(cfg, out, acc, resume_from)
    if src == "tiny":
        src = warm_up_tiny_policy(cfg, run_.partial / "init_policy", console)
        common.STOP.armed = True  # the warm-up's own run disarmed it on completion
    tok, policy = _load_policy(cfg, src)
    _check_lengths(cfg, policy)
    disable_dropout(policy)
    data.train_ids = [encode_prompt(tok, p, cfg.data.max_prompt_length)[0] for p, _ in data.train]
    _freeze(policy, P.num_layers_unfrozen)
    model = PolicyWithValueHead(policy)
    model.load_value_head(Path(src).expanduser())  # continuing from a PPO checkpoint keeps its value head
    model.to(acc.device)
    # the initial values of what trains, the rest shared; under ZeRO-3 (sharded weights) a whole copy
    reference = FrozenCopy(model.policy) if zero3 else Reference(model.policy)
    if resume_from is not None:
        resumed = load_causal_lm(str(resume_from), cfg.model)
        model.policy.load_state_dict(resumed.state_dict())
        model.load_value_head(resume_from)
        del resumed

    optimizer = common.make_optimizer(model, cfg.train)
    scheduler = common.make_scheduler(optimizer, cfg.train, steps)
    model, optimizer = acc.prepare(model, optimizer)
    core = acc.unwrap_model(model)
    state = {"step": 0, "iteration": 0, "prompt_position": 0, "rollouts": 0, "kl_coef": P.init_kl_coef,
             "moments": L.RunningMoments().state_dict(), "ref_std": None, "best_reward": None, "best_step": None}
    if resume_from is not None:
        state = common.load_resumed(resume_from, optimizer, scheduler)
        console.print(f"resuming from {resume_from} at step {state['step']} (iteration {state['iteration']})")
    moments = L.RunningMoments(**state["moments"])
    prompt_batches = common.Batcher(len(data.train), P.chunk_size, cfg.seed, rank, world_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    manifest = {"parent": ck.parent_info(src),
                "data": {"source": cfg.data.source, "format": data.fmt, "fingerprint": data.fingerprint,
                         "train_prompts": len(data.train), "eval_prompts": len(data.eval)},
                "reward": {"source": source.name, "delta": cfg.reward.delta},
                "value_head": "value_head.safetensors"}
    console.print(f"ppo: {len(data.train)} prompts ({data.fmt}), {iterations} iterations x {P.num_rollouts} rollouts, "
                  f"{steps} optimizer steps, reward {source.name}{' (delta)' if cfg.reward.delta else ''}, "
                  f"{trainable / 1e6:.2f}M trainable parameters (policy {count_params(core.policy) / 1e6:.2f}M, value head "
                  f"{count_params(core.value_head) / 1e6:.2f}M) -> {out}")
    for note in data.notes:
        console.print(f"  {note}")

    def save_best(metrics: dict, step: int) -> None:
        reward = metrics.get("eval/reward")
        if reward is None or (state["best_reward"] is not None and reward <= state["best_reward"]):
            return
        state["best_reward"], state["best_step"] = reward, step  # the same on every process: same eval prompts
        state_dict = acc.get_state_dict(model)  # every process takes part (ZeRO-3 gathers)
        if common.is_main(acc):
            with ck.atomic_dir(run_.partial / "best") as tmp:
                core.save_pretrained(tmp, state_dict=state_dict)
                tok.save_pretrained(tmp)
                ck.write_manifest(tmp, status="complete", stage="ppo", step=step, metrics=metrics,
                                  note="the best checkpoint by eval/reward; the parent directory holds the last")

    first_eval: dict = {}
    history: list[dict] = []  # the first 8 eval samples of every eval: how the completions change
    with common.progress_bar(console, common.is_main(acc)) as progress:
        if cfg.eval.at_start and state["step"] == 0:
            first_eval, first_samples = evaluate(core, reference, tok, data, scorer, cfg, acc.device, progress, zero3)
            run_.log(0, first_eval)
            history += [{"step": 0, **x} for x in first_samples[:8]]
        bar = progress.add_task("ppo", total=steps, completed=state["step"], info="")
        clock = common.LoopClock(state, "rollouts")
        while state["iteration"] < iterations:
            t0 = time.perf_counter()
            timings = {"generate": 0.0, "score": 0.0, "forward": 0.0}
            # 1-3. rollouts, scores, old log-probs / values / reference log-probs
            ro = collect_rollouts(core, reference, tok, data, scorer, prompt_batches, state, cfg, acc.device,
                                  timings, progress, P.num_rollouts // world_size, zero3)
            scores = ro.scores.clone()
            # the moments (and the first iteration's std) are of every process's scores, so all scale alike
            batch_mean, batch_std = moments.update(torch.tensor(common.all_gather(scores.tolist())))
            if P.scale_reward == "running":
                scores = scores / max(moments.std, 1e-8)
            elif P.scale_reward == "ref":
                if state["ref_std"] is None:
                    state["ref_std"] = max(batch_std, 1e-8)
                scores = scores / state["ref_std"]
            if P.cliprange_reward:
                scores = scores.clamp(-P.cliprange_reward, P.cliprange_reward)
            rewards, log_ratio = L.kl_penalized_rewards(scores.to(acc.device), ro.logprobs, ro.ref_logprobs,
                                                        ro.mask, state["kl_coef"])
            k1, k3 = L.sequence_kl(log_ratio, ro.mask)
            advantages, returns = L.gae(rewards, ro.values, ro.mask, P.gamma, P.lam)
            advantages = L.whiten(advantages, ro.mask)

            # 4. ppo_epochs over minibatches
            t_train = time.perf_counter()
            stats = ppo_update(model, acc, optimizer, scheduler, ro, advantages, returns, tok, cfg, state, progress, bar)
            timings["train"] = time.perf_counter() - t_train

            # 5. KL controller, logs, eval, checkpoint
            mean_kl = common.all_reduce(k3.mean().item())  # one coefficient on every process
            if P.target:
                state["kl_coef"] = L.adaptive_kl_coef(state["kl_coef"], mean_kl, P.target, P.horizon, P.num_rollouts)
            state["iteration"] += 1
            state["rollouts"] += len(ro.texts)
            state["tokens"] = state.get("tokens", 0) + int(ro.mask.sum())  # response tokens
            state["moments"] = moments.state_dict()
            step = state["step"]
            log = {"rollout/reward": batch_mean, "rollout/reward_std": batch_std,
                   "rollout/score_raw": common.all_reduce(sum(ro.raw_scores) / len(ro.raw_scores)),
                   "rollout/kl": mean_kl, "rollout/kl_k1": common.all_reduce(k1.mean().item()),
                   "rollout/response_length": common.all_reduce(ro.mask.sum(1).mean().item()),
                   "train/kl_coef": state["kl_coef"], "train/lr": scheduler.get_last_lr()[0],
                   "train/returns": L.masked_mean(returns, ro.mask).item(),
                   **stats, **{f"time/{k}": v for k, v in timings.items()},
                   "time/iteration": time.perf_counter() - t0}
            gold = _gold(ro.prompts, ro.texts)
            if gold is not None:
                log["rollout/gold"] = common.all_reduce(gold)
            run_.log(step, log)
            progress.update(bar, info=f"reward {batch_mean:.3f} kl {mean_kl:.2f}")
            last = state["iteration"] == iterations
            if not last and cfg.eval.interval and step // cfg.eval.interval != (step - steps_per_iter) // cfg.eval.interval:
                metrics, samples = evaluate(core, reference, tok, data, scorer, cfg, acc.device, progress, zero3)
                run_.log(step, metrics)
                _show_samples(console, samples, step)
                history += [{"step": step, **x} for x in samples[:8]]
                save_best(metrics, step)
            due = bool(cfg.checkpoint.interval) and \
                step // cfg.checkpoint.interval != (step - steps_per_iter) // cfg.checkpoint.interval
            if not last:
                run_.checkpoint(model, tok, optimizer, scheduler, state, manifest, due=due)
        clock.record(state, manifest, "episodes")
        last_eval, samples = evaluate(core, reference, tok, data, scorer, cfg, acc.device, progress, zero3)
        run_.log(steps, last_eval)
        _show_samples(console, samples, steps)
        history += [{"step": steps, **x} for x in samples[:8]]
        save_best(last_eval, steps)
    if not first_eval:
        first_eval = next((r for r in run_.metrics() if r["step"] == 0 and "eval/reward" in r), {})
    manifest["metrics"] = last_eval
    manifest["initial_metrics"] = {k: v for k, v in first_eval.items() if k.startswith("eval/")}
    manifest["best"] = {"dir": "best", "step": state["best_step"], "eval/reward": state["best_reward"]}
    extra_dirs = {"best": run_.partial / "best"} if (run_.partial / "best").exists() else {}
    run_.save_final(model, tok, optimizer, scheduler, state, manifest,
                    {"eval_samples.jsonl": common.jsonl(samples), "eval_samples_history.jsonl": common.jsonl(history)},
                    extra_dirs=extra_dirs)
    return {"initial": manifest["initial_metrics"], "final": last_eval, "output_dir": str(out), "steps": steps}


def _gold(prompts, texts) -> float | None:
    from ..eval.metrics import gold_scores

    g = gold_scores(prompts, texts)
    return sum(g) / len(g) if g else None


def _show_samples(console, samples: list[dict], step: int, n: int = 2) -> None:
    for s in samples[:n]:
        console.print(f"  [dim]step {step} sample:[/] ...{s['prompt'][-60:]!r} -> {s['completion'][:120]!r} "
                      f"(reward {s['reward']:.3f})", highlight=False)


@torch.no_grad()
def collect_rollouts(core, reference, tok, data, scorer, prompt_batches, state, cfg, device, timings,
                     progress, num_rollouts: int, synced: bool = False) -> Rollouts:
    """This process's `num_rollouts` rollouts; every process scores its own (no rank-0 bottleneck)."""
    P = cfg.ppo
    queries, responses, texts, prompts, raw, used = [], [], [], [], [], []
    lps, refs_lp, vals = [], [], []
    core.eval()
    task = progress.add_task("rollouts", total=num_rollouts, info="")
    while len(queries) < num_rollouts:
        idx = prompt_batches.indices(state["prompt_position"])[: num_rollouts - len(queries)]
        state["prompt_position"] += 1
        chunk = [data.train[i] for i in idx]
        q = ([data.train_ids[i] for i in idx] if data.train_ids is not None
             else [encode_prompt(tok, p, cfg.data.max_prompt_length)[0] for p, _ in chunk])
        t = time.perf_counter()
        # old log-probs and values come with the samples; under ZeRO-3 (every process steps until all
        # are done) HF generate samples and a forward pass scores
        s = None if synced else sampling.sample(core, tok, q, P.generation, P.stop_sequences)
        r = s.responses if s is not None else generate(core.policy, tok, q, P.generation, len(q), None,
                                                       stop_sequences=P.stop_sequences, keep_eos=True,
                                                       synced_gpus=synced)
        timings["generate"] += time.perf_counter() - t
        txt = tok.batch_decode(r, skip_special_tokens=True)
        t = time.perf_counter()
        try:
            rewards, raw_scores = scorer([p for p, _ in chunk], txt, [ref for _, ref in chunk])
        except UserError as e:  # e.g. a NaN score: name where the run stopped (its last checkpoint is kept)
            raise UserError(f"at step {state['step']} (iteration {state['iteration'] + 1}): {e}") from None
        timings["score"] += time.perf_counter() - t
        t = time.perf_counter()
        b = collate(q, r, tok.pad_token_id, device)
        R = b.responses.shape[1]
        if s is None:
            logits, values = response_outputs(core, b)
            lp = L.token_logprobs(logits, b.responses)
        ref = L.token_logprobs(reference.logits(b.input_ids, b.attention_mask, R + 1)[:, :-1], b.responses)
        timings["forward"] += time.perf_counter() - t
        for j in range(len(q)):
            n = len(r[j])
            lps.append(s.logprobs[j].to(device) if s is not None else lp[j, :n].float())
            refs_lp.append(ref[j, :n].float())
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


def ppo_update(model, acc, optimizer, scheduler, ro: Rollouts, advantages, returns, tok, cfg, state,
               progress, bar) -> dict:
    """`ppo_epochs` passes over the rollouts; the mean of each statistic over all minibatches."""
    P, T = cfg.ppo, cfg.train
    N = len(ro.queries)
    mb = T.batch_size * T.gradient_accumulation_steps
    sums: dict[str, float] = {}
    count = 0
    for _ in range(P.ppo_epochs):
        perm = torch.randperm(N).tolist()
        for start in range(0, N - mb + 1, mb):
            loss_total = 0.0
            for m in range(start, start + mb, T.batch_size):
                idx = perm[m: m + T.batch_size]
                b = collate([ro.queries[i] for i in idx], [ro.responses[i] for i in idx], tok.pad_token_id,
                            acc.device)
                R = b.responses.shape[1]
                old_lp, old_v = ro.logprobs[idx, :R], ro.values[idx, :R]
                adv, ret = advantages[idx, :R], returns[idx, :R]
                with acc.autocast():
                    logits, values = response_outputs(model, b)
                lp = L.token_logprobs(logits, b.responses)
                pl = L.policy_loss(lp, old_lp, adv, b.mask, P.cliprange)
                vl = L.value_loss(values, old_v, ret, b.mask, P.cliprange_value)
                loss = (pl.loss + P.vf_coef * vl.loss) / T.gradient_accumulation_steps
                common.backward(acc, loss, T.gradient_accumulation_steps, last=m + T.batch_size >= start + mb)
                loss_total += loss.item()
                with torch.no_grad():
                    stats = {"train/policy_loss": pl.loss.item(), "train/value_loss": vl.loss.item(),
                             "train/approx_kl": pl.approx_kl.item(), "train/clipfrac": pl.clipfrac.item(),
                             "train/vf_clipfrac": vl.clipfrac.item(), "train/value_error": vl.error.item(),
                             "train/entropy": L.entropy(logits.detach(), b.mask).item()}
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
            grad_norm = common.optimizer_step(acc, model, optimizer, scheduler, T.max_grad_norm, loss_total,
                                              state["step"] + 1)
            sums["train/grad_norm"] = sums.get("train/grad_norm", 0.0) + grad_norm * (mb // T.batch_size)
            state["step"] += 1
            progress.update(bar, advance=1)
    return {k: v / max(1, count) for k, v in sums.items()}
