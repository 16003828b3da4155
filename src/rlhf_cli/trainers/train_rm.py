"""Reward-model training (`rlhf train-rm`): a sequence classifier with one output, trained on
preference pairs with the Bradley-Terry loss; the bottom blocks frozen (trlx: 70%).

Loop: for each optimizer step, 1. draw the micro-batches of pairs, 2. score chosen and rejected in
one forward pass, 3. backward the summed pair losses / pairs in the step, 4. clip and step.
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import torch

from .. import checkpoint as ck
from .. import lora
from .. import shared_prompt
from ..data import formats, synthetic
from ..data.sources import PairData, load_pair_data
from ..data.tokenize import collate_pairs, encode_prompt, sequence_parts
from ..errors import UserError
from ..heads import PooledReward
from ..losses.reward import pairwise_loss
from ..metrics import mean_and_stderr
from ..models import (build_tiny_reward, checkpoint_kind, count_params, freeze_bottom, frozen_block_count,
                      load_causal_lm, load_reward_model, load_tokenizer, max_positions, score_head, sequence_rewards,
                      train_tokenizer)
from ..sampling import generate
from . import common
from .stage import Micro, Stage, StepLoss


def featurize(tok, pairs: list[formats.PairExample], data_cfg) -> list[dict]:
    out = []
    for e in pairs:
        chosen, n = sequence_parts(tok, e.prompt, e.chosen, data_cfg.max_length, data_cfg.max_prompt_length)
        rejected, _ = sequence_parts(tok, e.prompt, e.rejected, data_cfg.max_length, data_cfg.max_prompt_length)
        out.append({"chosen": chosen, "rejected": rejected, "prompt_len": n,
                    "margin": float(e.meta["gold_chosen"] - e.meta["gold_rejected"]) if "gold_chosen" in e.meta
                    else float(e.meta.get("margin", 0.0))})
    return out


def pair_rewards(model, tok, chunk: list[dict], device, share: bool, pooled: bool = False):
    """(B,), (B,) rewards of chosen and rejected: the shared prompt once, then both completions on its
    keys/values (`share`), else one pass over chosen + rejected. `pooled`: `model` is a PooledReward."""
    s = shared_prompt.split([[f["chosen"], f["rejected"]] for f in chunk], [f["prompt_len"] for f in chunk],
                            tok.pad_token_id) if share and shared_prompt.usable(model) else None
    if s is not None:
        s = s.to(device)
        r = model(shared=s) if pooled else shared_prompt.completion_rewards(model, s)
        return r[0::2], r[1::2]
    b = collate_pairs([f["chosen"] for f in chunk], [f["rejected"] for f in chunk], tok.pad_token_id)
    ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
    r = model(ids, mask) if pooled else sequence_rewards(model, ids, mask)
    return r[: len(chunk)], r[len(chunk):]


def score_pairs(model, tok, feats: list[dict], batch_size: int, device,
                share: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,), (N,) rewards of chosen and rejected, no grad."""
    was_training = model.training
    model.eval()
    rc, rr = [], []
    with torch.no_grad():
        for i in range(0, len(feats), batch_size):
            c, r = pair_rewards(model, tok, feats[i: i + batch_size], device, share)
            rc.append(c)
            rr.append(r)
    model.train(was_training)
    return torch.cat(rc).cpu(), torch.cat(rr).cpu()


def evaluate(model, tok, feats: list[dict], pairs: list[formats.PairExample], cfg, device) -> dict:
    """Held-out pairwise accuracy (against the data's labels), margin, reward mean/std; on synthetic
    pairs also agreement with the gold scorer (labels without noise)."""
    feats, pairs = feats[: cfg.eval.num_samples], pairs[: cfg.eval.num_samples]
    if not feats:
        return {}
    rc, rr = score_pairs(model, tok, feats, cfg.eval.batch_size, device, cfg.share_prompt)
    out = pairwise_loss(rc, rr)
    acc_mean, acc_se = mean_and_stderr(out.accuracy.tolist())
    metrics = {
        "eval/loss": out.losses.mean().item(), "eval/accuracy": acc_mean, "eval/accuracy_stderr": acc_se,
        "eval/margin": out.margin.mean().item(),
        "eval/chosen_mean": rc.mean().item(), "eval/chosen_std": rc.std().item() if len(rc) > 1 else 0.0,
        "eval/rejected_mean": rr.mean().item(), "eval/rejected_std": rr.std().item() if len(rr) > 1 else 0.0,
    }
    if pairs and all("gold_chosen" in p.meta for p in pairs):
        gold_sign = torch.tensor([p.meta["gold_chosen"] > p.meta["gold_rejected"] for p in pairs])
        agree = ((rc > rr) == gold_sign).float().tolist()
        metrics["eval/gold_accuracy"], metrics["eval/gold_accuracy_stderr"] = mean_and_stderr(agree)
    return metrics


def sampled_comparisons(policy, tok, prompts: list[str], cfg, seed: int, progress=None) -> list[formats.PairExample]:
    """Stiennon et al.'s comparison data on synthetic prompts: `samples_per_prompt` completions of each prompt
    sampled from `policy`, every two of them compared by the gold scorer (the "human"), a `label_noise` share of
    the labels flipped, ties dropped. meta keeps both gold scores (eval/gold_accuracy: the noise-free label)."""
    pc = cfg.policy_comparisons
    ids = [encode_prompt(tok, p, cfg.data.max_prompt_length)[0] for p in prompts]
    runs = [generate(policy, tok, ids, pc.generation, pc.batch_size, seed + j, progress)
            for j in range(pc.samples_per_prompt)]  # one seeded pass per sample: the same data on every process
    rng, out = random.Random(seed), []
    for i, prompt in enumerate(prompts):
        texts = [tok.decode(run[i], skip_special_tokens=True) for run in runs]
        golds = [synthetic.gold_score(prompt, t) for t in texts]
        for a, b in itertools.combinations(range(len(texts)), 2):
            if golds[a] == golds[b]:
                continue
            hi, lo = (a, b) if golds[a] > golds[b] else (b, a)
            if rng.random() < cfg.data.synthetic.label_noise:
                hi, lo = lo, hi
            out.append(formats.PairExample(prompt, texts[hi], texts[lo], {"gold_chosen": golds[hi],
                                                                          "gold_rejected": golds[lo]}))
    rng.shuffle(out)
    return out


def _policy_comparisons(cfg, data: PairData, tok, console) -> PairData:
    """`data` with its pairs replaced by comparisons of the parent policy's samples on the same prompts."""
    policy = load_causal_lm(cfg.init_source, cfg.model).eval()  # the one way a policy loads
    with common.progress_bar(console, os.environ.get("RANK", "0") == "0") as progress:
        train, held = (sampled_comparisons(policy, tok, list(dict.fromkeys(e.prompt for e in split)), cfg, seed,
                                           progress) for split, seed in ((data.train, cfg.seed), (data.eval, cfg.seed + 10_000)))
    if not train:
        raise UserError(f"every sample of {cfg.init_source} ties with the others under the gold scorer: no comparison "
                        "to learn from (more policy_comparisons.samples_per_prompt or data.synthetic.num_train)")
    note = (f"comparisons of {cfg.policy_comparisons.samples_per_prompt} samples per prompt from {cfg.init_source}, "
            f"labelled by the gold scorer")
    notes = [*data.notes, note] + ([] if held else ["no held-out comparisons: every held-out prompt's samples tied"])
    return PairData(train, held, data.fmt, data.fingerprint, data.dropped_malformed, 0, notes)


def _load(cfg, data: PairData, resume_from: Path | None):
    """(tokenizer, reward model): resumed, from --init-from / model.name_or_path, or tiny."""
    # resuming: its weights (LoRA: the base again, the adapter and score head come in build)
    name = str(resume_from) if resume_from is not None and not lora.enabled(cfg) else cfg.init_source
    if name == "tiny":
        texts = [formats.join_text(e.prompt, c) for e in data.train for c in (e.chosen, e.rejected)]
        tok = (load_tokenizer(str(resume_from)) if resume_from is not None else  # LoRA resumes on the tiny base
               load_tokenizer(cfg.tokenizer.name_or_path) if cfg.tokenizer.name_or_path
               else train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.model.tiny.n_positions))
        return tok, build_tiny_reward(cfg.model.tiny, tok, cfg.seed, cfg.model.fuse_gelu)
    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").exists():
        raise UserError(f"--init-from {name} is not a model checkpoint (no config.json)")
    tok = load_tokenizer(cfg.tokenizer.name_or_path or name, cfg.model.trust_remote_code, cfg.model.revision)
    return tok, load_reward_model(name, cfg.model, tok)


def plan(cfg, out: Path) -> dict:
    world_size = cfg.distributed.num_processes
    info: dict = {"output_dir": str(out), "stage": "train-rm", "preset": cfg.preset, "init_from": cfg.init_source}
    name = cfg.init_source
    if common.plan_without_download(cfg, info, name):
        return info
    data = load_pair_data(cfg, "train-rm", common.chat_renderer(cfg, cfg.init_source))
    tok, model = _load(cfg, data, None)
    frozen = frozen_block_count(model, cfg.freeze_fraction)
    feats = featurize(tok, data.train, cfg.data)
    steps, _ = common.total_steps(cfg.train, len(feats), world_size)
    mean_len = sum(len(f["chosen"]) + len(f["rejected"]) for f in feats) / len(feats)
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world_size
    info.update({
        "data_notes": "; ".join(data.notes) or "none",
        "data": f"{cfg.data.source} ({data.fmt}): {len(data.train)} train pairs, {len(data.eval)} held-out; "
                f"dropped {data.dropped_equal} with chosen == rejected, {data.dropped_malformed} malformed",
        "model": f"{count_params(model) / 1e6:.2f}M parameters; bottom {frozen} blocks frozen",
        "optimizer_steps": steps, "pairs_per_step": per_step,
        "estimated_tokens": int(steps * per_step * mean_len),
    })
    k = cfg.policy_comparisons.samples_per_prompt
    if k:  # sampled when the run starts: the counts above are the reference pairs'
        info["data"] += (f"; replaced at run time by comparisons of {k} samples per prompt from {name}: up to "
                         f"{k * (k - 1) // 2 * len(data.train)} pairs, ties dropped")
    return info


class RewardModelStage(Stage):
    name, unit, throughput = "train-rm", "pairs", "pairs"
    best_metric, best_mode = "eval/accuracy", "max"

    @classmethod
    def precheck(cls, cfg) -> None:
        init = cfg.init_source
        if init != "tiny" and Path(init).expanduser().is_dir() and checkpoint_kind(Path(init).expanduser()) is None:
            raise UserError(f"--init-from {init} is neither a policy nor a reward-model checkpoint")
        k = cfg.policy_comparisons.samples_per_prompt
        if k == 1:
            raise UserError("policy_comparisons.samples_per_prompt is 0 (the data's pairs) or at least 2 (a "
                            "comparison needs two samples)")
        if k and not (Path(init).expanduser().is_dir() and checkpoint_kind(Path(init).expanduser()) == "policy"):
            raise UserError(f"policy_comparisons samples the parent policy, but --init-from {init} is not a local "
                            "policy checkpoint (e.g. runs/sft)")
        if k and cfg.data.source.removeprefix("synthetic:") not in synthetic.TASKS:
            raise UserError(f"policy_comparisons labels the samples with the gold scorer, which only synthetic data "
                            f"has (data.source is {cfg.data.source}); for real data, have your policy's samples "
                            "compared and pass them as pairs")

    def prepare_data(self) -> None:
        cfg = self.cfg
        self.data = load_pair_data(cfg, "train-rm", common.chat_renderer(cfg, cfg.init_source))
        self.tokenizer, self._model = _load(cfg, self.data, self.resume_from)
        if cfg.policy_comparisons.samples_per_prompt:
            if self.resume_from is not None and self.resume_from == self.out:  # complete: nothing left to train
                self.feats = self.feats_eval = []
                self.total_steps = (ck.read_progress(self.out) or {}).get("step", 0)
                return
            self.data = _policy_comparisons(cfg, self.data, self.tokenizer, self.console)
        limit = max_positions(self._model)
        if limit and cfg.data.max_length > limit:
            raise UserError(f"data.max_length ({cfg.data.max_length}) exceeds the model's {limit} positions")
        self.feats = featurize(self.tokenizer, self.data.train, cfg.data)
        self.feats_eval = featurize(self.tokenizer, self.data.eval, cfg.data)
        self.total_steps, _ = common.total_steps(cfg.train, len(self.feats), self.world[1])

    def build(self, acc):
        cfg, data = self.cfg, self.data
        self.frozen = frozen_block_count(self._model, cfg.freeze_fraction)
        if lora.enabled(cfg):  # adapters on every block instead; the score head trains in full
            self.frozen = 0
            head = next(n for n, m in self._model.named_children() if m is score_head(self._model))
            lora.attach(self._model, cfg, self.resume_from, cfg.init_source, full=(head,))
        else:
            freeze_bottom(self._model, self.frozen)
        self.make_batcher([max(len(f["chosen"]), len(f["rejected"])) for f in self.feats])
        self.manifest = {
            "parent": ck.parent_info(cfg.init_source),
            "data": {"source": cfg.data.source, "format": data.fmt, "fingerprint": data.fingerprint,
                     "train_pairs": len(self.feats), "eval_pairs": len(self.feats_eval),
                     "dropped_equal": data.dropped_equal, "dropped_malformed": data.dropped_malformed},
            "frozen_blocks": self.frozen,
        }
        return PooledReward(self._model)  # DDP / DeepSpeed wrap the pooled forward, score head included

    def describe(self) -> str:
        data = self.data
        trainable = sum(p.numel() for p in self._model.parameters() if p.requires_grad)
        notes = data.notes + ([f"dropped {data.dropped_equal} pairs with chosen == rejected"] if data.dropped_equal else [])
        return (f"train-rm: {len(self.feats)} pairs ({data.fmt}), {self.total_steps} optimizer steps, "
                f"{count_params(self._model) / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable, bottom "
                f"{self.frozen} blocks frozen) -> {self.out}" + "".join(f"\n  {n}" for n in notes))

    def micro(self, idx: list[int]) -> Micro:
        chunk = [self.feats[i] for i in idx]
        return Micro(chunk, units=len(chunk), examples=len(chunk),
                     tokens=sum(len(f["chosen"]) + len(f["rejected"]) for f in chunk))

    def loss(self, model, micro: Micro) -> StepLoss:
        chunk, device = micro.data, self.acc.device
        rc, rr = pair_rewards(model, self.tokenizer, chunk, device, self.cfg.share_prompt, pooled=True)
        margin = torch.tensor([f["margin"] for f in chunk], device=device) if self.cfg.loss.use_margin else None
        out = pairwise_loss(rc, rr, margin, self.cfg.loss.center_coef)
        return StepLoss(out.losses.sum(), {"accuracy": out.accuracy.sum().item(), "margin": out.margin.sum().item()})

    def evaluate(self, core, progress) -> tuple[dict, list[dict]]:
        return evaluate(core.model, self.tokenizer, self.feats_eval, self.data.eval, self.cfg, self.acc.device), []

