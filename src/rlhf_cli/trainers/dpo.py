"""Direct preference optimisation (`rlhf dpo`): the policy learns from preference pairs directly,
tied to a frozen reference (the initial policy) by beta; no reward model, no sampling.

Loop: for each optimizer step, 1. draw the micro-batches of pairs, 2. one forward pass over chosen
and rejected (concatenated) gives the policy's summed response log-probs, 3. the reference's come
from a frozen copy or from the precomputed cache, 4. backward the mean DPO loss, clip and step.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from .. import checkpoint as ck
from .. import lora
from ..data.sources import PairData, load_pair_data
from ..data.tokenize import sft_features
from ..errors import UserError
from ..heads import Held
from ..losses.dpo import dpo_loss
from ..metrics import generation_metrics
from ..models import check_policy_source, count_params, disable_dropout, load_trained_policy, max_positions
from . import common, distributed
from .pair_logps import batch_logps, cached_reference
from .stage import Micro, Stage, StepLoss


def featurize(tok, pairs, data_cfg) -> list[dict]:
    """Chosen and rejected as SFT features: prompt masked, EOS appended (its log-prob counts)."""
    def f(p, c):
        return sft_features(tok, p, c, data_cfg.max_length, data_cfg.max_prompt_length)
    return [{"chosen": f(e.prompt, e.chosen), "rejected": f(e.prompt, e.rejected)} for e in pairs]


def pair_sums(out, pw, pl) -> dict:
    """TRL / AReaL metric names, summed over the pairs (divided by the pairs when logged)."""
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    return {
        "loss": out.losses.detach().sum().item(),
        "rewards/chosen": chosen.sum().item(),
        "rewards/rejected": rejected.sum().item(),
        # a tie (policy == reference) prefers neither: it counts half, so accuracy starts at 0.5
        "rewards/accuracies": ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).sum().item(),
        "rewards/margins": (chosen - rejected).sum().item(),
        "logps/chosen": pw.detach().sum().item(),
        "logps/rejected": pl.detach().sum().item(),
    }


def _loss(cfg, pw, pl, rw, rl, nw, nl):
    opts = cfg.loss
    return dpo_loss(pw, pl, rw, rl, beta=opts.beta, loss_type=opts.loss_type, label_smoothing=opts.label_smoothing,
                    chosen_lengths=nw, rejected_lengths=nl, rpo_alpha=opts.rpo_alpha)


def evaluate(model, ref, ref_eval, tok, data: PairData, feats_eval, cfg, device, progress,
             reference=contextlib.nullcontext, kl_reference=None) -> tuple[dict, list]:
    """Held-out DPO metrics on `eval.num_samples` pairs, and generation (ROUGE vs chosen, gold) on their prompts."""
    n = min(len(feats_eval), cfg.eval.num_samples)
    metrics: dict = {}
    if n:
        was = model.training
        model.eval()
        pws, pls, rws, rls, nws, nls = [], [], [], [], [], []
        with torch.no_grad():
            for i in range(0, n, cfg.eval.batch_size):
                chunk = feats_eval[i: min(n, i + cfg.eval.batch_size)]
                pw, pl, nw, nl = batch_logps(model, tok, chunk, device, cfg.share_prompt)
                if ref_eval is not None:
                    rw, rl = ref_eval[i: i + len(chunk), 0].to(device), ref_eval[i: i + len(chunk), 1].to(device)
                else:
                    with reference():
                        rw, rl, _, _ = batch_logps(ref, tok, chunk, device, cfg.share_prompt)
                for acc_, v in zip((pws, pls, rws, rls, nws, nls), (pw, pl, rw, rl, nw, nl)):
                    acc_.append(v)
        model.train(was)
        pw, pl, rw, rl, nw, nl = (torch.cat(v) for v in (pws, pls, rws, rls, nws, nls))
        metrics = {f"eval/{k}": v / len(pw) for k, v in pair_sums(_loss(cfg, pw, pl, rw, rl, nw, nl), pw, pl).items()}
    pairs = [e for e in data.eval if e.prompt][: cfg.eval.num_samples]
    gen, samples = generation_metrics(model, tok, [e.prompt for e in pairs], [e.chosen for e in pairs], cfg, progress,
                                      kl_reference)
    metrics.update(gen)
    return metrics, samples


def _load_policy(cfg, path: str):
    return load_trained_policy(cfg, path, "dpo")


def plan(cfg, out: Path) -> dict:
    world_size = cfg.distributed.num_processes
    src = cfg.policy_source
    info: dict = {"output_dir": str(out), "stage": "dpo", "preset": cfg.preset, "policy": src,
                  "loss": f"{cfg.loss.loss_type}, beta {cfg.loss.beta}",
                  "reference": "precomputed log-probs (cached)" if cfg.precompute_ref_logps else "frozen copy of the policy"}
    if common.plan_without_download(cfg, info, src):
        return info
    data = load_pair_data(cfg, "dpo", common.chat_renderer(cfg, cfg.policy_source))
    tok, model = _load_policy(cfg, src)
    feats = featurize(tok, data.train, cfg.data)
    steps, _ = common.total_steps(cfg.train, len(feats), world_size)
    mean_len = sum(len(f["chosen"]["input_ids"]) + len(f["rejected"]["input_ids"]) for f in feats) / len(feats)
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world_size
    info.update({"data": f"{cfg.data.source} ({data.fmt}): {len(data.train)} train pairs, {len(data.eval)} held-out",
                 "data_notes": "; ".join(data.notes) or "none",
                 "model": f"{count_params(model) / 1e6:.2f}M parameters", "optimizer_steps": steps,
                 "pairs_per_step": per_step, "estimated_tokens": int(steps * per_step * mean_len)})
    return info


class DPOStage(Stage):
    name, unit, throughput = "dpo", "pairs", "pairs"
    best_metric, best_mode = "eval/loss", "min"

    @classmethod
    def precheck(cls, cfg) -> None:
        check_policy_source(cfg.policy_source, "dpo")

    def prepare_data(self) -> None:
        cfg = self.cfg
        self.data = load_pair_data(cfg, "dpo", common.chat_renderer(cfg, cfg.policy_source))
        # resuming: its weights (LoRA: the base again, the adapter comes in build)
        start = str(self.resume_from) if self.resume_from is not None and not lora.enabled(cfg) else cfg.policy_source
        self.tokenizer, self._model = _load_policy(cfg, start)
        limit = max_positions(self._model)
        if limit and cfg.data.max_length > limit:
            raise UserError(f"data.max_length ({cfg.data.max_length}) exceeds the model's {limit} positions")
        if cfg.disable_dropout:
            disable_dropout(self._model)
        self.feats = featurize(self.tokenizer, self.data.train, cfg.data)
        self.feats_eval = featurize(self.tokenizer, self.data.eval, cfg.data)
        self.total_steps, _ = common.total_steps(cfg.train, len(self.feats), self.world[1])

    def build(self, acc):
        """The policy trains; the reference is always the initial policy, also when resuming."""
        cfg, data = self.cfg, self.data
        self.make_batcher([len(f["chosen"]["input_ids"]) + len(f["rejected"]["input_ids"]) for f in self.feats])
        initial = self._model if self.resume_from is None or lora.enabled(cfg) else _load_policy(cfg, cfg.policy_source)[1]
        self.ref = self.ref_train = self.ref_eval = None
        if cfg.precompute_ref_logps:
            with common.progress_bar(self.console, distributed.is_main(acc)) as progress:
                self.ref_train, self.ref_eval = cached_reference(
                    cfg, data, self.tokenizer, initial.to(acc.device).eval(), self.feats, self.feats_eval, acc.device,
                    self.console, progress, self.batcher)
        elif lora.enabled(cfg):
            self.ref = self._model  # with its adapters off (see reference()): no second copy of the base weights
        else:
            # the copy keeps requires_grad (it never gets gradients: it runs under inference_mode): a
            # weight's requires_grad picks torch's matmul path, and the same path as the policy's makes
            # the step-0 log-ratios exactly 0 (a tie), not ~1e-6
            self.ref = copy.deepcopy(initial).eval().to(acc.device)
        lora.attach(self._model, cfg, self.resume_from, cfg.policy_source)
        self.manifest = {"parent": ck.parent_info(cfg.policy_source),
                         "data": {"source": cfg.data.source, "format": data.fmt, "fingerprint": data.fingerprint,
                                  "train_pairs": len(self.feats), "eval_pairs": len(self.feats_eval),
                                  "dropped_equal": data.dropped_equal, "dropped_malformed": data.dropped_malformed},
                         "reference": "precomputed" if cfg.precompute_ref_logps else
                         "the policy with its LoRA adapters off" if lora.enabled(cfg) else "frozen copy"}
        return self._model.train()

    def describe(self) -> str:
        return (f"dpo: {len(self.feats)} pairs ({self.data.fmt}), {self.total_steps} optimizer steps, "
                f"{self.cfg.loss.loss_type} loss, beta {self.cfg.loss.beta}, {count_params(self._model) / 1e6:.2f}M "
                f"parameters{lora.summary(self._model)} -> {self.out}" + "".join(f"\n  {n}" for n in self.data.notes))

    def micro(self, idx: list[int]) -> Micro:
        tokens = sum(len(self.feats[i][k]["input_ids"]) for i in idx for k in ("chosen", "rejected"))
        return Micro(idx, units=len(idx), examples=len(idx), tokens=tokens)

    def loss(self, model, micro: Micro) -> StepLoss:
        idx, device, share = micro.data, self.acc.device, self.cfg.share_prompt
        chunk = [self.feats[i] for i in idx]
        # policy log-probs of chosen and rejected in one forward pass; the reference's cached or frozen
        pw, pl, nw, nl = batch_logps(model, self.tokenizer, chunk, device, share)
        if self.ref_train is not None:
            rw, rl = self.ref_train[idx, 0].to(device), self.ref_train[idx, 1].to(device)
        else:
            with torch.inference_mode(), self.reference():
                rw, rl, _, _ = batch_logps(self.ref, self.tokenizer, chunk, device, share)
            rw, rl = rw.clone(), rl.clone()
        out = _loss(self.cfg, pw, pl, rw, rl, nw, nl)
        sums = pair_sums(out, pw, pl)
        del sums["loss"]
        return StepLoss(out.losses.sum(), sums)

    def reference(self):
        """Where the reference's log-probs are computed: LoRA's policy without adapters, else a frozen copy."""
        return lora.adapters_off(self.ref) if lora.enabled(self.cfg) else contextlib.nullcontext()

    def evaluate(self, core, progress) -> tuple[dict, list[dict]]:
        # the KL of the policy's samples to the reference, as the online methods log it (none with the cache:
        # the reference model is not held)
        kl_reference = (lora.Reference(self.ref) if lora.enabled(self.cfg) else
                        Held(self.ref) if self.ref is not None else None)
        return evaluate(core, self.ref, self.ref_eval, self.tokenizer, self.data, self.feats_eval, self.cfg,
                        self.acc.device, progress, self.reference, kl_reference)

