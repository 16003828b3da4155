"""ILQL (`rlhf ilql`): offline RL from (prompt, completion, reward) samples, trlx's AccelerateILQLTrainer.

Loop: for each optimizer step, 1. draw micro-batches of samples (the reward, normalised over the
data set, sits on the last completion token), 2. one forward pass gives logits, Q, target-Q and V
from the LM's final hidden state, 3. backward the ILQL loss (losses/ilql.py), clip and step,
4. every `steps_for_target_q_sync` optimizer steps Polyak-update the target Q heads. Eval samples
held-out prompts with logits + beta * (Q - V) for each beta of `gen_betas`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ck
from .. import lora
from ..data import formats
from ..data.sources import load_formatted
from ..data.tokenize import collate_sft, encode_prompt, sft_features
from ..errors import UserError
from ..heads import ILQLHeads, PolicyWithILQLHeads, hidden_size
from ..losses.ilql import ilql_loss, polyak_update
from ..metrics import gold_scores, mean_and_stderr, rouge
from ..models import check_policy_source, count_params, disable_dropout, load_trained_policy, max_positions
from ..sampling import ilql_generate
from . import common
from .stage import Micro, Stage, StepLoss


@dataclass
class Samples:
    train: list[tuple[str, str, float]]  # (prompt, completion, reward)
    eval_prompts: list[tuple[str, str | None]]  # (prompt, reference completion)
    fmt: str
    fingerprint: str
    notes: list[str]


def _rewarded(rows, source: str) -> list[tuple[str, str, float]]:
    out = []
    for r in rows:
        try:
            out.append((r["prompt"], r["completion"], float(r["reward"])))
        except (TypeError, ValueError):
            raise UserError(f"dataset '{source}' has a non-numeric reward: {r['reward']!r}") from None
    return out


def _from_pairs(pairs, gold: bool) -> list[tuple[str, str, float]]:
    """Each pair as two samples: rewarded +1 / -1 (trlx's ilql_hh), or by their gold scores (synthetic)."""
    if gold and any("gold_chosen" not in e.meta for e in pairs):
        raise UserError("ilql.rewards: gold needs synthetic data (it has gold scores); use labels")
    out = []
    for e in pairs:
        good, bad = (e.meta["gold_chosen"], e.meta["gold_rejected"]) if gold else (1.0, -1.0)
        out += [(e.prompt, e.chosen, good), (e.prompt, e.rejected, bad)]
    return out


def load_samples(cfg) -> Samples:
    """(prompt, completion, reward) samples: rewarded rows as they are, or made from preference pairs;
    and the held-out prompts (with the chosen completion as reference)."""
    split, fmt = load_formatted(cfg.data, kind="pairs", seed=cfg.seed,
                                chat=common.chat_renderer(cfg, cfg.policy_source))
    if fmt == "rewarded":
        train, held = _rewarded(split.train, cfg.data.source), _rewarded(split.eval, cfg.data.source)
        held_prompts = [(p, None) for p, _, _ in held]
    elif fmt in ("comparisons", "hh"):
        train = _from_pairs(formats.pair_examples(split.train, fmt)[0], cfg.ilql.rewards == "gold")
        held_prompts = [(e.prompt, e.chosen) for e in formats.pair_examples(split.eval, fmt)[0] if e.prompt]
    else:
        raise UserError(f"ilql needs rewarded samples or preference pairs, but '{cfg.data.source}' is in {fmt} format")
    if cfg.data.max_examples:
        train = train[: cfg.data.max_examples]
    if not train:
        raise UserError(f"dataset '{cfg.data.source}' has no samples for ilql")
    return Samples(train, held_prompts, fmt, split.fingerprint(), split.notes)


def featurize(tok, samples, data_cfg) -> tuple[list[dict], torch.Tensor]:
    """SFT features of each sample (completion tokens are the actions, EOS included) and the
    rewards normalised over the data set (trlx: (r - mean) / std)."""
    feats = [sft_features(tok, p, c, data_cfg.max_length, data_cfg.max_prompt_length) for p, c, _ in samples]
    r = torch.tensor([s[2] for s in samples], dtype=torch.float32)
    r = (r - r.mean()) / (r.std() + 1e-8) if len(r) > 1 else r
    return feats, r


def batch_tensors(feats: list[dict], returns: torch.Tensor, pad_id: int) -> dict:
    """input_ids, attention_mask (B, T); actions, mask, rewards (B, T - 1) at the state slots."""
    b = collate_sft(feats, pad_id)
    actions = b["input_ids"][:, 1:]
    mask = (b["labels"][:, 1:] != -100).float()
    last = (torch.arange(mask.shape[1]) * mask).argmax(1)  # index of each sequence's last action
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(feats)), last] = returns
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "actions": actions, "mask": mask,
            "rewards": rewards}


def compute_loss(model, batch: dict, icfg):
    logits, qs, target_qs, v = model(batch["input_ids"], batch["attention_mask"])
    return ilql_loss(logits[:, :-1], [q[:, :-1] for q in qs], [q[:, :-1] for q in target_qs], v, batch["actions"],
                     batch["mask"], batch["rewards"], icfg.gamma, icfg.tau, icfg.cql_scale, icfg.awac_scale,
                     icfg.beta)


def evaluate(core, tok, data: Samples, cfg, progress, betas=None) -> tuple[dict, list[dict]]:
    """Steered generation on the held-out prompts for each beta: gold, ROUGE, length."""
    pairs = data.eval_prompts[: cfg.eval.num_samples]
    if not pairs:
        return {}, []
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    ids = [encode_prompt(tok, p, cfg.data.max_prompt_length)[0] for p in prompts]
    g = cfg.eval.generation
    metrics: dict = {}
    samples = [{"prompt": p, **({"reference": r} if r is not None else {})} for p, r in pairs]
    for beta in betas if betas is not None else cfg.ilql.gen_betas:
        outs = ilql_generate(core.policy, core.heads, tok, ids, beta, g, cfg.ilql.gen_top_k, cfg.eval.batch_size,
                             cfg.eval.seed, progress)
        texts = tok.batch_decode(outs, skip_special_tokens=True)
        key = f"eval/beta={beta:g}"
        gold = gold_scores(prompts, texts)
        if gold is not None:
            metrics[f"{key}/gold"], metrics[f"{key}/gold_stderr"] = mean_and_stderr(gold)
        if all(r is not None for r in refs):
            metrics[f"{key}/rouge1"] = rouge(texts, refs, tok)["rouge1"]
        metrics[f"{key}/response_length"] = sum(len(o) for o in outs) / len(outs)
        for s, t, gs in zip(samples, texts, gold or [None] * len(texts)):
            s[f"beta={beta:g}"] = t if gs is None else {"completion": t, "gold": gs}
    return metrics, samples


def _load(cfg, path: str):
    return load_trained_policy(cfg, path, "ilql")


def plan(cfg, out: Path) -> dict:
    world_size = cfg.distributed.num_processes
    src = cfg.policy_source
    info: dict = {"output_dir": str(out), "stage": "ilql", "preset": cfg.preset, "policy": src,
                  "heads": f"{'two Q heads' if cfg.ilql.two_qs else 'one Q head'} + targets + V",
                  "rewards": cfg.ilql.rewards}
    if common.plan_without_download(cfg, info, src):
        return info
    data = load_samples(cfg)
    steps, _ = common.total_steps(cfg.train, len(data.train), world_size)
    info.update({"data": f"{cfg.data.source} ({data.fmt}): {len(data.train)} samples, "
                         f"{len(data.eval_prompts)} held-out prompts", "optimizer_steps": steps,
                 "data_notes": "; ".join(data.notes) or "none"})
    return info


LOGGED = ("loss_q", "loss_v", "loss_cql", "loss_awac", "mean_q", "mean_v")


class ILQLStage(Stage):
    name, unit, throughput = "ilql", "actions", "samples"

    @classmethod
    def precheck(cls, cfg) -> None:
        check_policy_source(cfg.policy_source, "ilql")

    def prepare_data(self) -> None:
        cfg = self.cfg
        self.data = load_samples(cfg)
        # resuming: its weights (LoRA: the base again, the adapter comes in build)
        start = str(self.resume_from) if self.resume_from is not None and not lora.enabled(cfg) else cfg.policy_source
        self.tokenizer, self.policy = _load(cfg, start)
        limit = max_positions(self.policy)
        if limit and cfg.data.max_length > limit:
            raise UserError(f"data.max_length ({cfg.data.max_length}) exceeds the model's {limit} positions")
        disable_dropout(self.policy)
        self.feats, self.returns = featurize(self.tokenizer, self.data.train, cfg.data)
        self.total_steps, _ = common.total_steps(cfg.train, len(self.feats), self.world[1])

    def build(self, acc):
        """The policy and its heads; a resumed run reloads both from its checkpoint."""
        cfg, data, policy = self.cfg, self.data, self.policy
        vocab = policy.get_output_embeddings().weight.shape[0]
        heads = (ILQLHeads.load(self.resume_from) if self.resume_from is not None
                 else ILQLHeads(hidden_size(policy), vocab, cfg.ilql.two_qs))
        self.make_batcher([len(f["input_ids"]) for f in self.feats])
        lora.attach(policy, cfg, self.resume_from, cfg.policy_source)  # the heads train in full
        self.manifest = {"parent": ck.parent_info(cfg.policy_source),
                         "data": {"source": cfg.data.source, "format": data.fmt, "fingerprint": data.fingerprint,
                                  "train_samples": len(self.feats), "eval_prompts": len(data.eval_prompts)},
                         "heads": "ilql_heads.safetensors"}
        return PolicyWithILQLHeads(policy, heads.to(next(policy.parameters()).dtype))

    def describe(self) -> str:
        core = self.acc.unwrap_model(self.model)
        return (f"ilql: {len(self.feats)} samples ({self.data.fmt}, rewards: {self.cfg.ilql.rewards}), "
                f"{self.total_steps} optimizer steps, {count_params(core.policy) / 1e6:.2f}M policy + "
                f"{count_params(core.heads) / 1e6:.2f}M heads -> {self.out}")

    def micro(self, idx: list[int]) -> Micro:
        b = batch_tensors([self.feats[i] for i in idx], self.returns[idx], self.tokenizer.pad_token_id)
        return Micro(b, units=int(b["mask"].sum()), examples=len(idx), tokens=int(b["attention_mask"].sum()))

    def loss(self, model, micro: Micro) -> StepLoss:
        b = {k: v.to(self.acc.device) for k, v in micro.data.items()}
        out = compute_loss(model, b, self.cfg.ilql)
        n = micro.units  # the loss terms are means over this micro-batch's actions
        return StepLoss(out.loss * n, {k: getattr(out, k).item() * n for k in LOGGED})

    def after_step(self, state: dict) -> dict:
        if state["step"] % self.cfg.ilql.steps_for_target_q_sync == 0:
            heads = self.acc.unwrap_model(self.model).heads
            polyak_update(heads.target_qs, heads.qs, self.cfg.ilql.alpha)
        return {}

    def evaluate(self, core, progress) -> tuple[dict, list[dict]]:
        return evaluate(core, self.tokenizer, self.data, self.cfg, progress)

