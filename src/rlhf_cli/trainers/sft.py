"""Supervised fine-tuning: causal-LM loss on the completion (prompt tokens masked), or on the whole
text for single-text data; periodic eval of ROUGE-1/2/L and, on synthetic data, the gold score.

Loop: for each optimizer step, 1. draw the accumulation micro-batches, 2. count their label
tokens, 3. backward sum-NLL / tokens, 4. clip and step; eval and checkpoint at their intervals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ck
from ..data import formats
from ..data.sources import load_formatted
from ..data.tokenize import collate_sft, sft_features
from ..errors import UserError
from ..eval.generation import generation_metrics
from ..losses.sft import sft_loss
from ..models import count_params, load_policy, max_positions
from . import common


@dataclass
class SFTData:
    train: list[formats.SFTExample]
    eval: list[formats.SFTExample]
    dropped: int
    fmt: str
    fingerprint: str
    notes: list[str]
    synthetic_task: str | None


def load_sft_data(cfg) -> SFTData:
    split, fmt = load_formatted(cfg.data, kind="sft", seed=cfg.seed)
    train, dropped = formats.sft_examples(split.train, fmt)
    held, dropped_eval = formats.sft_examples(split.eval, fmt)
    if cfg.data.max_examples:
        train = train[: cfg.data.max_examples]
    if not train:
        raise UserError(f"dataset '{cfg.data.source}' has no usable examples ({dropped} rows were empty)")
    return SFTData(train, held, dropped + dropped_eval, fmt, split.fingerprint(), split.notes, split.synthetic_task)


def featurize(tokenizer, examples, data_cfg) -> tuple[list[dict], int]:
    feats = [sft_features(tokenizer, e.prompt, e.completion, data_cfg.max_length, data_cfg.max_prompt_length)
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
                b = collate_sft(feats_eval[i: i + ev.batch_size], tokenizer.pad_token_id)
                logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
                out = sft_loss(logits, b["labels"].to(device))
                total, count = total + out.loss_sum.item(), count + out.num_tokens.item()
        model.train()
        metrics["eval/loss"] = total / max(1, count)
    examples = [e for e in data.eval if e.prompt][: ev.num_samples]
    gen, samples = generation_metrics(model, tokenizer, [e.prompt for e in examples],
                                      [e.completion for e in examples], cfg, progress)
    metrics.update(gen)
    return metrics, samples


def plan(cfg, out: Path, world_size: int = 1) -> dict:
    """Validate config, data and model without training; what `--dry-run` prints."""
    info: dict = {"output_dir": str(out), "stage": "sft", "preset": cfg.preset}
    if common.plan_without_download(cfg, info, cfg.model.name_or_path):
        return info
    data = load_sft_data(cfg)
    name = cfg.model.name_or_path
    tok, model = load_policy(cfg, [e.prompt + e.completion for e in data.train])
    feats, truncated = featurize(tok, data.train, cfg.data)
    steps, _ = common.total_steps(cfg.train, len(feats), world_size)
    mean_len = sum(len(f["input_ids"]) for f in feats) / len(feats)
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world_size
    info.update({
        "model": f"{name}: {count_params(model) / 1e6:.2f}M parameters, vocabulary {len(tok)}",
        "sequence": f"mean {mean_len:.0f} tokens, max {max(len(f['input_ids']) for f in feats)}; "
                    f"{truncated} prompts truncated to {cfg.data.max_prompt_length}",
        "optimizer_steps": steps,
        "examples_per_step": per_step,
        "estimated_tokens": int(steps * per_step * mean_len),
        "dropped_rows": data.dropped,
    })
    return info


def run(cfg, out: Path, resume: bool = False, overwrite: bool = False, console=None) -> dict:
    from rich.console import Console

    console = console or Console(stderr=True)
    resume_from = ck.prepare_output(out, resume, overwrite)
    acc = common.setup_accelerator(cfg)
    rank, world_size = common.world(acc)
    torch.manual_seed(cfg.seed)

    # 1. data and model (a resumed run reloads both from its checkpoint)
    data = load_sft_data(cfg)
    if resume_from is not None:
        rcfg = cfg.model_copy(deep=True)
        rcfg.model.name_or_path, rcfg.tokenizer.name_or_path = str(resume_from), str(resume_from)
        tok, model = load_policy(rcfg)
    else:
        tok, model = load_policy(cfg, [e.prompt + e.completion for e in data.train])
    limit = max_positions(model)
    if limit and cfg.data.max_length > limit:
        raise UserError(f"data.max_length ({cfg.data.max_length}) exceeds the model's {limit} positions")
    feats, truncated = featurize(tok, data.train, cfg.data)
    feats_eval, _ = featurize(tok, data.eval, cfg.data)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    steps, _ = common.total_steps(cfg.train, len(feats), world_size)
    if (done := common.already_complete(out, resume_from, steps, console)) is not None:
        return done

    optimizer = common.make_optimizer(model, cfg.train)
    scheduler = common.make_scheduler(optimizer, cfg.train, steps)
    model, optimizer = acc.prepare(model, optimizer)
    batcher = common.Batcher(len(feats), cfg.train.batch_size, cfg.seed, rank, world_size,
                             [len(f["input_ids"]) for f in feats] if cfg.train.group_by_length else None)
    progress_state = {"step": 0, "micro_step": 0, "examples": 0, "tokens": 0}
    run_ = common.Run(cfg, out, acc, resume_from)
    if resume_from is not None:
        progress_state = common.load_resumed(resume_from, optimizer, scheduler)
        console.print(f"resuming from {resume_from} at step {progress_state['step']}")
        changed = common.config_changes(cfg, resume_from)
        if changed:
            console.print(f"[yellow]warning:[/] the config differs from the checkpoint's in {', '.join(changed)}")

    manifest = {
        "parent": ck.parent_info(cfg.model.name_or_path),
        "data": {"source": cfg.data.source, "format": data.fmt, "fingerprint": data.fingerprint,
                 "train_examples": len(feats), "eval_examples": len(feats_eval),
                 "prompts_truncated": truncated, "rows_dropped": data.dropped},
    }
    console.print(f"sft: {len(feats)} examples ({data.fmt}), {steps} optimizer steps, "
                  f"{count_params(model) / 1e6:.2f}M parameters -> {out}")
    for note in data.notes:
        console.print(f"  {note}")

    first_eval: dict = {}
    last_eval: dict = {}
    samples: list[dict] = []
    with common.progress_bar(console, common.is_main(acc)) as progress:
        if cfg.eval.at_start and progress_state["step"] == 0:
            first_eval, _ = evaluate(acc.unwrap_model(model), tok, data, feats_eval, cfg, progress)
            run_.log(0, first_eval)
        bar = progress.add_task("sft", total=steps, completed=progress_state["step"], info="")
        model.train()
        accum = cfg.train.gradient_accumulation_steps
        t_last, tokens_last = time.perf_counter(), progress_state["tokens"]
        clock = common.LoopClock(progress_state)
        while progress_state["step"] < steps:
            # 1. the micro-batches of this optimizer step
            batches = []
            for _ in range(accum):
                idx = batcher.indices(progress_state["micro_step"])
                progress_state["micro_step"] += 1
                batches.append(collate_sft([feats[i] for i in idx], tok.pad_token_id))
            # 2. the loss is normalised by the label tokens of the whole accumulated batch
            # over every process: gradients are averaged across processes, hence the world_size factor,
            # so N processes compute exactly the step of one process with N times the batch
            n_tokens = common.all_reduce(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), "sum")
            loss_total = 0.0
            for j, b in enumerate(batches):
                b = {k: v.to(acc.device) for k, v in b.items()}
                with acc.autocast():
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                out_ = sft_loss(logits, b["labels"])
                loss = out_.loss_sum * world_size / max(1, n_tokens)
                # 3. backward
                common.backward(acc, loss, cfg.train.gradient_accumulation_steps, last=j == len(batches) - 1)
                loss_total += out_.loss_sum.item() / max(1, n_tokens)
            loss_total = common.all_reduce(loss_total, "sum")
            # 4. clip and step
            grad_norm = common.optimizer_step(acc, model, optimizer, scheduler, cfg.train.max_grad_norm,
                                              loss_total, progress_state["step"] + 1)
            progress_state["step"] += 1
            progress_state["examples"] += sum(len(b["input_ids"]) for b in batches)
            progress_state["tokens"] += sum(int(b["attention_mask"].sum()) for b in batches)
            step = progress_state["step"]
            progress.update(bar, advance=1, info=f"loss {loss_total:.3f}")

            if step % cfg.train.log_interval == 0 or step == steps:
                dt = time.perf_counter() - t_last
                run_.log(step, {"train/loss": loss_total, "train/lr": scheduler.get_last_lr()[0],
                                "train/grad_norm": grad_norm,
                                "train/tokens_per_s": (progress_state["tokens"] - tokens_last) / max(dt, 1e-9),
                                "train/epoch": progress_state["micro_step"] / batcher.batches_per_epoch})
                t_last, tokens_last = time.perf_counter(), progress_state["tokens"]
            if cfg.eval.interval and step % cfg.eval.interval == 0 and step != steps:
                metrics, _ = evaluate(acc.unwrap_model(model), tok, data, feats_eval, cfg, progress)
                run_.log(step, metrics)
            run_.checkpoint(model, tok, optimizer, scheduler, progress_state, manifest,
                            due=bool(cfg.checkpoint.interval) and step % cfg.checkpoint.interval == 0 and step != steps)

        clock.record(progress_state, manifest, "examples")
        last_eval, samples = evaluate(acc.unwrap_model(model), tok, data, feats_eval, cfg, progress)
        run_.log(steps, last_eval)
    if not first_eval:
        first_eval = next((r for r in run_.metrics() if r["step"] == 0 and "eval/loss" in r), {})
    final = {k: v for k, v in last_eval.items()}
    manifest["metrics"] = final
    manifest["initial_metrics"] = {k: v for k, v in first_eval.items() if k.startswith("eval/")}
    run_.save_final(model, tok, optimizer, scheduler, progress_state, manifest,
                    {"eval_samples.jsonl": common.jsonl(samples)})
    return {"initial": manifest["initial_metrics"], "final": final, "output_dir": str(out), "steps": steps}
