"""Supervised fine-tuning: causal-LM loss on the completion (prompt tokens masked), or on the whole
text for single-text data; periodic eval of ROUGE-1/2/L and, on synthetic data, the gold score.

Loop: for each optimizer step, 1. draw the accumulation micro-batches, 2. count their label
tokens, 3. backward sum-NLL / tokens, 4. clip and step; eval and checkpoint at their intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ck
from .. import lora
from ..data import formats
from ..data.sources import load_formatted
from ..data.tokenize import chat_features, collate_sft, sft_features
from ..errors import UserError
from ..losses.sft import sft_loss
from ..metrics import generation_metrics
from ..models import count_params, load_policy, max_positions
from . import common
from .stage import Micro, Stage, StepLoss


@dataclass
class SFTData:
    train: list[formats.SFTExample]
    eval: list[formats.SFTExample]
    dropped: int
    fmt: str
    fingerprint: str
    notes: list[str]
    chat_template: str | None = None  # the template conversational rows were rendered by


def load_sft_data(cfg) -> SFTData:
    chat = common.chat_renderer(cfg, cfg.model.name_or_path)
    split, fmt = load_formatted(cfg.data, kind="sft", seed=cfg.seed, chat=chat)
    if fmt == "prompt":
        raise UserError(f"sft needs completions to imitate, but '{cfg.data.source}' holds prompts only")
    train, dropped = formats.sft_examples(split.train, fmt)
    held, dropped_eval = formats.sft_examples(split.eval, fmt)
    if cfg.data.max_examples:
        train = train[: cfg.data.max_examples]
    if not train:
        raise UserError(f"dataset '{cfg.data.source}' has no usable examples ({dropped} rows were empty)")
    return SFTData(train, held, dropped + dropped_eval, fmt, split.fingerprint(), split.notes, chat.template)


def load_sft_policy(cfg, data: SFTData):
    """The policy to train and its tokenizer, which keeps the chat template its data was rendered by."""
    tok, model = load_policy(cfg, [e.text for e in data.train])
    if data.chat_template:
        tok.chat_template = data.chat_template
    return tok, model


def label_nll(model, input_ids, attention_mask, labels):
    """`sft_loss` with LM-head logits only from the first position that predicts a label on: on
    prompt/completion data the prompt's logits are never used, and the head is a tenth of the step.
    Not `models.tail_only` here: the float rounding it brings redraws the tiny SFT (a late phase change),
    and every tiny recipe downstream with it."""
    has_label = (labels != -100).any(0)
    first = max(0, int(has_label.float().argmax()) - 1) if bool(has_label.any()) else 0
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=labels.shape[1] - first).logits
    return sft_loss(logits, labels[:, first:])


def featurize(tokenizer, examples, data_cfg) -> tuple[list[dict], int]:
    feats = [chat_features(tokenizer, e.segments, data_cfg.max_length) if e.segments else
             sft_features(tokenizer, e.prompt, e.completion, data_cfg.max_length, data_cfg.max_prompt_length)
             for e in examples]
    return feats, sum(f["prompt_truncated"] for f in feats)


def evaluate(model, tokenizer, data: SFTData, feats_eval: list[dict], cfg, progress) -> tuple[dict, list[dict]]:
    """Held-out loss, and ROUGE / gold of generated completions for `eval.num_samples` prompts."""
    ev = cfg.eval
    device = next(model.parameters()).device
    metrics: dict[str, float] = {}
    if feats_eval:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, min(len(feats_eval), ev.num_samples), ev.batch_size):
                b = {k: v.to(device) for k, v in collate_sft(feats_eval[i: i + ev.batch_size],
                                                             tokenizer.pad_token_id).items()}
                out = label_nll(model, b["input_ids"], b["attention_mask"], b["labels"])
                total, count = total + out.loss_sum.item(), count + out.num_tokens.item()
        model.train()
        metrics["eval/loss"] = total / max(1, count)
    examples = [e for e in data.eval if e.prompt][: ev.num_samples]
    gen, samples = generation_metrics(model, tokenizer, [e.prompt for e in examples],
                                      [e.completion for e in examples], cfg, progress)
    metrics.update(gen)
    return metrics, samples


def plan(cfg, out: Path) -> dict:
    """Validate config, data and model without training; what `--dry-run` prints."""
    world_size = cfg.distributed.num_processes
    info: dict = {"output_dir": str(out), "stage": "sft", "preset": cfg.preset}
    if common.plan_without_download(cfg, info, cfg.model.name_or_path):
        return info
    data = load_sft_data(cfg)
    name = cfg.model.name_or_path
    tok, model = load_sft_policy(cfg, data)
    feats, truncated = featurize(tok, data.train, cfg.data)
    steps, _ = common.total_steps(cfg.train, len(feats), world_size)
    mean_len = sum(len(f["input_ids"]) for f in feats) / len(feats)
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world_size
    info.update({
        "data_notes": "; ".join(data.notes) or "none",
        "model": f"{name}: {count_params(model) / 1e6:.2f}M parameters, vocabulary {len(tok)}",
        "sequence": f"mean {mean_len:.0f} tokens, max {max(len(f['input_ids']) for f in feats)}; "
                    f"{truncated} prompts truncated to {cfg.data.max_prompt_length}",
        "optimizer_steps": steps,
        "examples_per_step": per_step,
        "estimated_tokens": int(steps * per_step * mean_len),
        "dropped_rows": data.dropped,
    })
    return info


class SFTStage(Stage):
    name, unit, throughput = "sft", "tokens", "examples"
    best_metric, best_mode = "eval/loss", "min"

    def prepare_data(self) -> None:
        self.data = load_sft_data(self.cfg)
        # the tokenizer (trained on the data for 'tiny', else the model's) fixes the features
        if self.resume_from is not None:  # its weights (LoRA: the base again, the adapter comes in build)
            rcfg = self.cfg.model_copy(deep=True)
            rcfg.tokenizer.name_or_path = str(self.resume_from)
            if not lora.enabled(self.cfg):
                rcfg.model.name_or_path = str(self.resume_from)
            self.tokenizer, self._model = load_policy(rcfg)
        else:
            self.tokenizer, self._model = load_sft_policy(self.cfg, self.data)
        limit = max_positions(self._model)
        if limit and self.cfg.data.max_length > limit:
            raise UserError(f"data.max_length ({self.cfg.data.max_length}) exceeds the model's {limit} positions")
        self.feats, truncated = featurize(self.tokenizer, self.data.train, self.cfg.data)
        self.feats_eval, _ = featurize(self.tokenizer, self.data.eval, self.cfg.data)
        self.total_steps, _ = common.total_steps(self.cfg.train, len(self.feats), self.world[1])
        self.manifest = {
            "parent": ck.parent_info(self.cfg.model.name_or_path),
            "data": {"source": self.cfg.data.source, "format": self.data.fmt, "fingerprint": self.data.fingerprint,
                     "train_examples": len(self.feats), "eval_examples": len(self.feats_eval),
                     "prompts_truncated": truncated, "rows_dropped": self.data.dropped},
        }

    def build(self, acc):
        self.make_batcher([len(f["input_ids"]) for f in self.feats])
        lora.attach(self._model, self.cfg, self.resume_from, self.cfg.model.name_or_path)
        return self._model

    def describe(self) -> str:
        notes = "".join(f"\n  {n}" for n in self.data.notes)
        return (f"sft: {len(self.feats)} examples ({self.data.fmt}), {self.total_steps} optimizer steps, "
                f"{count_params(self._model) / 1e6:.2f}M parameters{lora.summary(self._model)} -> {self.out}{notes}")

    def micro(self, idx: list[int]) -> Micro:
        """The micro-batch of examples `idx`; its units are the label tokens."""
        b = collate_sft([self.feats[i] for i in idx], self.tokenizer.pad_token_id)
        return Micro(b, units=int((b["labels"][:, 1:] != -100).sum()), examples=len(idx),
                     tokens=int(b["attention_mask"].sum()))

    def loss(self, model, micro: Micro) -> StepLoss:
        b = {k: v.to(self.acc.device) for k, v in micro.data.items()}
        return StepLoss(label_nll(model, b["input_ids"], b["attention_mask"], b["labels"]).loss_sum, {})

    def evaluate(self, core, progress) -> tuple[dict, list[dict]]:
        return evaluate(core, self.tokenizer, self.data, self.feats_eval, self.cfg, progress)

