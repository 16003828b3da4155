"""Direct preference optimisation (`rlhf dpo`): the policy learns from preference pairs directly,
tied to a frozen reference (the initial policy) by beta; no reward model, no sampling.

Loop: for each optimizer step, 1. draw the micro-batches of pairs, 2. one forward pass over chosen
and rejected (concatenated) gives the policy's summed response log-probs, 3. the reference's come
from a frozen copy or from the precomputed cache, 4. backward the mean DPO loss, clip and step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .. import checkpoint as ck
from .. import shared_prompt
from ..data.sources import PairData, load_pair_data
from ..data.tokenize import collate_sft, sft_features
from ..errors import UserError
from ..eval.generation import generation_metrics
from ..losses.dpo import DPOLoss, dpo_loss, sequence_logps
from ..models import check_policy_source, count_params, disable_dropout, load_trained_policy, max_positions
from . import common


def _policy_source(cfg) -> str:
    return cfg.policy or cfg.model.name_or_path


def featurize(tok, pairs, data_cfg) -> list[dict]:
    """Chosen and rejected as SFT features: prompt masked, EOS appended (its log-prob counts)."""
    def f(p, c):
        return sft_features(tok, p, c, data_cfg.max_length, data_cfg.max_prompt_length)
    return [{"chosen": f(e.prompt, e.chosen), "rejected": f(e.prompt, e.rejected)} for e in pairs]


def _prompt_len(f: dict) -> int:
    return next((i for i, x in enumerate(f["labels"]) if x != -100), len(f["labels"]))


def batch_logps(model, tok, chunk: list[dict], device,
                share: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) summed logps and (B,) token counts of chosen and of rejected: the shared prompt once, then
    both completions on its keys/values (`share`), else one pass over chosen + rejected concatenated."""
    if share:
        s = shared_prompt.split([[f["chosen"]["input_ids"], f["rejected"]["input_ids"]] for f in chunk],
                                [_prompt_len(f["chosen"]) for f in chunk], tok.pad_token_id)
        if s is not None:
            logps, n = shared_prompt.completion_logps(model, s.to(device))
            return logps[0::2], logps[1::2], n[0::2], n[1::2]
    b = collate_sft([f["chosen"] for f in chunk] + [f["rejected"] for f in chunk], tok.pad_token_id)
    logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
    logps, n = sequence_logps(logits, b["labels"].to(device))
    k = len(chunk)
    return logps[:k], logps[k:], n[:k], n[k:]


def reference_logps(ref, tok, feats: list[dict], batch_size: int, device, progress=None,
                    batches: list[list[int]] | None = None, share: bool = True) -> torch.Tensor:
    """(N, 2) reference log-probs [chosen, rejected] of every pair, no grad.

    `batches` (index lists) fixes which pairs share a forward pass: given the training run's own
    micro-batches, the values are bit-identical to what a frozen reference computes during training
    (a different padding changes them by ~1e-6, which 300 Adam steps amplify past 1e-4).
    """
    out = torch.zeros(len(feats), 2)
    covered = {i for b in batches or [] for i in b}
    rest = [i for i in range(len(feats)) if i not in covered]
    groups = list(batches or []) + [rest[i: i + batch_size] for i in range(0, len(rest), batch_size)]
    task = progress.add_task("reference log-probs", total=len(feats), info="") if progress is not None else None
    with torch.inference_mode():
        for idx in groups:
            c, r, _, _ = batch_logps(ref, tok, [feats[i] for i in idx], device, share)
            out[idx] = torch.stack([c, r], dim=-1).float().cpu()
            if task is not None:
                progress.advance(task, len(idx))
    if task is not None:
        progress.remove_task(task)
    return out


def cache_key(cfg, data: PairData, tok, policy_path: str, batching: str = "") -> str:
    """Changes when the data, the tokenizer, the reference weights, the truncation or the batching change."""
    h = hashlib.sha256()
    tok_json = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else str(tok.get_vocab())
    ref = ck.content_hash(Path(policy_path)) if Path(policy_path).exists() else policy_path
    for part in (data.fingerprint, json.dumps([len(data.train), len(data.eval)]), tok_json, str(ref),
                 json.dumps([cfg.data.max_length, cfg.data.max_prompt_length]), batching):
        h.update(part.encode())
        h.update(b"\0")
    h.update(json.dumps([(e.prompt, e.chosen, e.rejected) for e in data.eval]).encode())
    return h.hexdigest()[:32]


def cached_reference(cfg, data, tok, policy, feats, feats_eval, device, console, progress, batcher):
    """Reference log-probs of train and held-out pairs, from the cache or computed once and stored.

    The training pairs are scored in the run's first-epoch micro-batches (see reference_logps).
    """
    from safetensors.torch import load_file, save_file

    batches = [batcher.indices(p) for p in range(batcher.batches_per_epoch)]
    batching = json.dumps([cfg.seed, cfg.train.batch_size, batcher.world_size, batcher.rank, cfg.train.group_by_length,
                           cfg.share_prompt])
    root = Path(cfg.ref_cache_dir or Path.home() / ".cache" / "rlhf_cli" / "ref_logps").expanduser()
    path = root / f"{cache_key(cfg, data, tok, _policy_source(cfg), batching)}.safetensors"
    if path.exists():
        t = load_file(str(path))
        if t["train"].shape[0] == len(feats) and t["eval"].shape[0] == len(feats_eval):
            console.print(f"  reference log-probs from the cache {path}")
            return t["train"], t["eval"]
    train = reference_logps(policy, tok, feats, cfg.eval.batch_size, device, progress, batches, cfg.share_prompt)
    held = reference_logps(policy, tok, feats_eval, cfg.eval.batch_size, device, progress,
                           [list(range(i, min(len(feats_eval), i + cfg.eval.batch_size)))
                            for i in range(0, len(feats_eval), cfg.eval.batch_size)], cfg.share_prompt)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"train": train, "eval": held}, str(tmp))
    os.replace(tmp, path)
    console.print(f"  reference log-probs computed once and cached in {path}")
    return train, held


def pair_metrics(prefix: str, out, pw, pl) -> dict:
    """TRL / AReaL metric names, means over the pairs."""
    return {
        f"{prefix}/loss": out.losses.mean().item(),
        f"{prefix}/rewards/chosen": out.chosen_rewards.mean().item(),
        f"{prefix}/rewards/rejected": out.rejected_rewards.mean().item(),
        # a tie (policy == reference) prefers neither: it counts half, so accuracy starts at 0.5
        f"{prefix}/rewards/accuracies": ((out.chosen_rewards > out.rejected_rewards).float()
                                         + 0.5 * (out.chosen_rewards == out.rejected_rewards).float()).mean().item(),
        f"{prefix}/rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
        f"{prefix}/logps/chosen": pw.detach().mean().item(),
        f"{prefix}/logps/rejected": pl.detach().mean().item(),
    }


def _loss(cfg, pw, pl, rw, rl, nw, nl):
    L = cfg.loss
    return dpo_loss(pw, pl, rw, rl, beta=L.beta, loss_type=L.loss_type, label_smoothing=L.label_smoothing,
                    chosen_lengths=nw, rejected_lengths=nl, rpo_alpha=L.rpo_alpha)


def evaluate(model, ref, ref_eval, tok, data: PairData, feats_eval, cfg, device, progress) -> tuple[dict, list]:
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
                    rw, rl, _, _ = batch_logps(ref, tok, chunk, device, cfg.share_prompt)
                for acc_, v in zip((pws, pls, rws, rls, nws, nls), (pw, pl, rw, rl, nw, nl)):
                    acc_.append(v)
        model.train(was)
        pw, pl, rw, rl, nw, nl = (torch.cat(v) for v in (pws, pls, rws, rls, nws, nls))
        metrics = pair_metrics("eval", _loss(cfg, pw, pl, rw, rl, nw, nl), pw, pl)
    pairs = [e for e in data.eval if e.prompt][: cfg.eval.num_samples]
    gen, samples = generation_metrics(model, tok, [e.prompt for e in pairs], [e.chosen for e in pairs], cfg, progress)
    metrics.update(gen)
    return metrics, samples


def _load_policy(cfg, path: str):
    return load_trained_policy(cfg, path, "dpo")


def plan(cfg, out: Path, world_size: int = 1) -> dict:
    src = _policy_source(cfg)
    info: dict = {"output_dir": str(out), "stage": "dpo", "preset": cfg.preset, "policy": src,
                  "loss": f"{cfg.loss.loss_type}, beta {cfg.loss.beta}",
                  "reference": "precomputed log-probs (cached)" if cfg.precompute_ref_logps else "frozen copy of the policy"}
    if common.plan_without_download(cfg, info, src):
        return info
    data = load_pair_data(cfg, "dpo")
    tok, model = _load_policy(cfg, src)
    feats = featurize(tok, data.train, cfg.data)
    steps, _ = common.total_steps(cfg.train, len(feats), world_size)
    mean_len = sum(len(f["chosen"]["input_ids"]) + len(f["rejected"]["input_ids"]) for f in feats) / len(feats)
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world_size
    info.update({"data": f"{cfg.data.source} ({data.fmt}): {len(data.train)} train pairs, {len(data.eval)} held-out",
                 "model": f"{count_params(model) / 1e6:.2f}M parameters", "optimizer_steps": steps,
                 "pairs_per_step": per_step, "estimated_tokens": int(steps * per_step * mean_len)})
    return info


def run(cfg, out: Path, resume: bool = False, overwrite: bool = False, console=None) -> dict:
    from rich.console import Console

    console = console or Console(stderr=True)
    src = _policy_source(cfg)
    check_policy_source(src, "dpo")
    resume_from = ck.prepare_output(out, resume, overwrite)
    acc = common.setup_accelerator(cfg)
    rank, world_size = common.world(acc)
    torch.manual_seed(cfg.seed)

    # 1. data, policy, reference (always the initial policy, also when resuming)
    data = load_pair_data(cfg, "dpo")
    tok, model = _load_policy(cfg, str(resume_from) if resume_from is not None else src)
    limit = max_positions(model)
    if limit and cfg.data.max_length > limit:
        raise UserError(f"data.max_length ({cfg.data.max_length}) exceeds the model's {limit} positions")
    if cfg.disable_dropout:
        disable_dropout(model)
    feats, feats_eval = featurize(tok, data.train, cfg.data), featurize(tok, data.eval, cfg.data)
    steps, _ = common.total_steps(cfg.train, len(feats), world_size)
    if (done := common.already_complete(out, resume_from, steps, console)) is not None:
        return done
    initial = model if resume_from is None else _load_policy(cfg, src)[1]
    ref = ref_train = ref_eval = None

    optimizer = common.make_optimizer(model, cfg.train)
    scheduler = common.make_scheduler(optimizer, cfg.train, steps)
    state = {"step": 0, "micro_step": 0, "examples": 0, "tokens": 0}
    run_ = common.Run(cfg, out, acc, resume_from)
    manifest = {"parent": ck.parent_info(src),
                "data": {"source": cfg.data.source, "format": data.fmt, "fingerprint": data.fingerprint,
                         "train_pairs": len(feats), "eval_pairs": len(feats_eval),
                         "dropped_equal": data.dropped_equal, "dropped_malformed": data.dropped_malformed},
                "reference": "precomputed" if cfg.precompute_ref_logps else "frozen copy"}
    console.print(f"dpo: {len(feats)} pairs ({data.fmt}), {steps} optimizer steps, {cfg.loss.loss_type} loss, "
                  f"beta {cfg.loss.beta}, {count_params(model) / 1e6:.2f}M parameters -> {out}")
    for note in data.notes:
        console.print(f"  {note}")
    first_eval: dict = {}
    batcher = common.Batcher(len(feats), cfg.train.batch_size, cfg.seed, rank, world_size,
                             [len(f["chosen"]["input_ids"]) + len(f["rejected"]["input_ids"]) for f in feats]
                             if cfg.train.group_by_length else None)
    with common.progress_bar(console, common.is_main(acc)) as progress:
        if cfg.precompute_ref_logps:
            initial.to(acc.device)
            ref_train, ref_eval = cached_reference(cfg, data, tok, initial.eval(), feats, feats_eval, acc.device,
                                                   console, progress, batcher)
        else:
            # the copy keeps requires_grad (it never gets gradients: it runs under inference_mode): a
            # weight's requires_grad picks torch's matmul path, and the same path as the policy's makes
            # the step-0 log-ratios exactly 0 (a tie), not ~1e-6
            ref = copy.deepcopy(initial).eval().to(acc.device)
        del initial
        model.train()
        model, optimizer = acc.prepare(model, optimizer)
        if resume_from is not None:
            state = common.load_resumed(resume_from, optimizer, scheduler)
            console.print(f"resuming from {resume_from} at step {state['step']}")
        if cfg.eval.at_start and state["step"] == 0:
            first_eval, _ = evaluate(acc.unwrap_model(model), ref, ref_eval, tok, data, feats_eval, cfg, acc.device, progress)
            run_.log(0, first_eval)
        bar = progress.add_task("dpo", total=steps, completed=state["step"], info="")
        t_last, pairs_last = time.perf_counter(), state["examples"]
        clock = common.LoopClock(state)
        while state["step"] < steps:
            # 1. micro-batches of pairs (indices, so cached reference rows line up)
            idx_batches = []
            for _ in range(cfg.train.gradient_accumulation_steps):
                idx_batches.append(batcher.indices(state["micro_step"]))
                state["micro_step"] += 1
            n_pairs = sum(len(b) for b in idx_batches)
            loss_total, logged = 0.0, []
            for j, idx in enumerate(idx_batches):
                chunk = [feats[i] for i in idx]
                # 2. policy log-probs: chosen and rejected in one forward pass
                with acc.autocast():
                    pw, pl, nw, nl = batch_logps(model, tok, chunk, acc.device, cfg.share_prompt)
                # 3. reference log-probs
                if ref_train is not None:
                    rw, rl = ref_train[idx, 0].to(acc.device), ref_train[idx, 1].to(acc.device)
                else:
                    with torch.inference_mode(), acc.autocast():
                        rw, rl, _, _ = batch_logps(ref, tok, chunk, acc.device, cfg.share_prompt)
                    rw, rl = rw.clone(), rl.clone()
                out_ = _loss(cfg, pw, pl, rw, rl, nw, nl)
                # 4. backward: mean over the pairs of the whole optimizer step
                loss = out_.losses.sum() / n_pairs
                common.backward(acc, loss, cfg.train.gradient_accumulation_steps, last=j == len(idx_batches) - 1)
                loss_total += loss.item()
                logged.append((out_, pw, pl))
            loss_total = common.all_reduce(loss_total)  # each process's mean over its equal share of pairs
            grad_norm = common.optimizer_step(acc, model, optimizer, scheduler, cfg.train.max_grad_norm,
                                              loss_total, state["step"] + 1)
            state["step"] += 1
            state["examples"] += n_pairs
            state["tokens"] = state.get("tokens", 0) + sum(
                len(feats[i][k]["input_ids"]) for idx in idx_batches for i in idx for k in ("chosen", "rejected"))
            step = state["step"]
            progress.update(bar, advance=1, info=f"loss {loss_total:.3f}")
            if step % cfg.train.log_interval == 0 or step == steps:
                cat = [torch.cat(v) for v in zip(*[(o.losses.detach(), o.chosen_rewards, o.rejected_rewards, w, lo)
                                                  for o, w, lo in logged])]
                # every process holds an equal share of pairs: the mean of their means is the global mean
                m = {k: common.all_reduce(v) for k, v in pair_metrics("train", DPOLoss(*cat[:3]), cat[3], cat[4]).items()}
                dt = time.perf_counter() - t_last
                run_.log(step, {**m, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                                "train/pairs_per_s": (state["examples"] - pairs_last) / max(dt, 1e-9)})
                t_last, pairs_last = time.perf_counter(), state["examples"]
            if cfg.eval.interval and step % cfg.eval.interval == 0 and step != steps:
                run_.log(step, evaluate(acc.unwrap_model(model), ref, ref_eval, tok, data, feats_eval, cfg, acc.device, progress)[0])
            run_.checkpoint(model, tok, optimizer, scheduler, state, manifest,
                            due=bool(cfg.checkpoint.interval) and step % cfg.checkpoint.interval == 0 and step != steps)
        clock.record(state, manifest, "pairs")
        last_eval, samples = evaluate(acc.unwrap_model(model), ref, ref_eval, tok, data, feats_eval, cfg, acc.device, progress)
        run_.log(steps, last_eval)
    if not first_eval:
        first_eval = next((r for r in run_.metrics() if r["step"] == 0 and "eval/loss" in r), {})
    manifest["metrics"] = last_eval
    manifest["initial_metrics"] = {k: v for k, v in first_eval.items() if k.startswith("eval/")}
    run_.save_final(model, tok, optimizer, scheduler, state, manifest, {"eval_samples.jsonl": common.jsonl(samples)})
    return {"initial": manifest["initial_metrics"], "final": last_eval, "output_dir": str(out), "steps": steps}
