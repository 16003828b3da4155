"""ILQL (`rlhf ilql`): offline RL from (prompt, completion, reward) samples, trlx's AccelerateILQLTrainer.

Loop: for each optimizer step, 1. draw micro-batches of samples (the reward, normalised over the
data set, sits on the last completion token), 2. one forward pass gives logits, Q, target-Q and V
from the LM's final hidden state, 3. backward the ILQL loss (losses/ilql.py), clip and step,
4. every `steps_for_target_q_sync` optimizer steps Polyak-update the target Q heads. Eval samples
held-out prompts with logits + beta * (Q - V) for each beta of `gen_betas`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ck
from ..data import formats
from ..data.sources import load_formatted
from ..data.tokenize import collate_sft, encode_prompt, sft_features
from ..errors import UserError
from ..heads import ILQLHeads, PolicyWithILQLHeads, hidden_size, ilql_generate
from ..losses.ilql import ilql_loss, polyak_update
from ..models import check_policy_source, count_params, disable_dropout, load_trained_policy, max_positions
from . import common


@dataclass
class Samples:
    train: list[tuple[str, str, float]]  # (prompt, completion, reward)
    eval_prompts: list[tuple[str, str | None]]  # (prompt, reference completion)
    fmt: str
    fingerprint: str
    notes: list[str]


def load_samples(cfg) -> Samples:
    """Pairs -> +1 / -1 samples (trlx's ilql_hh) or, on synthetic data, gold-scored samples; rewarded rows as is."""
    split, fmt = load_formatted(cfg.data, kind="pairs", seed=cfg.seed)
    gold = cfg.ilql.rewards == "gold"

    def convert(rows) -> tuple[list[tuple[str, str, float]], list[tuple[str, str | None]]]:
        if fmt == "rewarded":
            out = []
            for r in rows:
                try:
                    out.append((r["prompt"], r["completion"], float(r["reward"])))
                except (TypeError, ValueError):
                    raise UserError(f"dataset '{cfg.data.source}' has a non-numeric reward: {r['reward']!r}") from None
            return out, [(p, None) for p, _, _ in out]
        if fmt not in ("comparisons", "hh"):
            raise UserError(f"ilql needs rewarded samples or preference pairs, but '{cfg.data.source}' is in "
                            f"{fmt} format")
        pairs, _, _ = formats.pair_examples(rows, fmt)
        out = []
        for e in pairs:
            if gold:
                if "gold_chosen" not in e.meta:
                    raise UserError("ilql.rewards: gold needs synthetic data (it has gold scores); use labels")
                out += [(e.prompt, e.chosen, e.meta["gold_chosen"]), (e.prompt, e.rejected, e.meta["gold_rejected"])]
            else:
                out += [(e.prompt, e.chosen, 1.0), (e.prompt, e.rejected, -1.0)]
        return out, [(e.prompt, e.chosen) for e in pairs if e.prompt]

    train, _ = convert(split.train)
    _, held = convert(split.eval)
    if cfg.data.max_examples:
        train = train[: cfg.data.max_examples]
    if not train:
        raise UserError(f"dataset '{cfg.data.source}' has no samples for ilql")
    return Samples(train, held, fmt, split.fingerprint(), split.notes)


def featurize(tok, samples, data_cfg) -> tuple[list[dict], torch.Tensor]:
    """SFT features of each sample (completion tokens are the actions, EOS included) and the
    rewards normalised over the data set (trlx: (r - mean) / std)."""
    feats = [sft_features(tok, p, c, data_cfg.max_length, data_cfg.max_prompt_length) for p, c, _ in samples]
    r = torch.tensor([s[2] for s in samples], dtype=torch.float32)
    r = (r - r.mean()) / (r.std() + 1e-8) if len(r) > 1 else r
    return feats, r


def batch_tensors(feats: list[dict], returns: torch.Tensor, pad_id: int, device) -> dict:
    """input_ids, attention_mask (B, T); actions, mask, rewards (B, T - 1) at the state slots."""
    b = collate_sft(feats, pad_id)
    actions = b["input_ids"][:, 1:]
    mask = (b["labels"][:, 1:] != -100).float()
    last = (torch.arange(mask.shape[1]) * mask).argmax(1)  # index of each sequence's last action
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(feats)), last] = returns
    return {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device),
            "actions": actions.to(device), "mask": mask.to(device), "rewards": rewards.to(device)}


def compute_loss(model, batch: dict, icfg):
    logits, qs, target_qs, v = model(batch["input_ids"], batch["attention_mask"])
    return ilql_loss(logits[:, :-1], [q[:, :-1] for q in qs], [q[:, :-1] for q in target_qs], v, batch["actions"],
                     batch["mask"], batch["rewards"], icfg.gamma, icfg.tau, icfg.cql_scale, icfg.awac_scale,
                     icfg.beta)


def evaluate(core, tok, data: Samples, cfg, progress, betas=None) -> tuple[dict, list[dict]]:
    """Steered generation on the held-out prompts for each beta: gold, ROUGE, length."""
    from ..eval.metrics import gold_scores, mean_and_stderr, rouge

    pairs = data.eval_prompts[: cfg.eval.num_samples]
    if not pairs:
        return {}, []
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    ids = [encode_prompt(tok, p, cfg.data.max_prompt_length)[0] for p in prompts]
    g = cfg.eval.generation
    metrics: dict = {}
    samples = [{"prompt": p, **({"reference": r} if r is not None else {})} for p, r in pairs]
    for beta in betas if betas is not None else cfg.ilql.gen_betas:
        outs = ilql_generate(core.policy, core.heads, tok, ids, beta, g.max_new_tokens, cfg.ilql.gen_top_k,
                             g.temperature, cfg.eval.batch_size, cfg.eval.seed, progress)
        texts = tok.batch_decode(outs, skip_special_tokens=True)
        key = f"eval/beta={beta:g}"
        gold = gold_scores(prompts, texts)
        if gold is not None:
            metrics[f"{key}/gold"], metrics[f"{key}/gold_stderr"] = mean_and_stderr(gold)
        if all(r is not None for r in refs):
            metrics[f"{key}/rouge1"] = rouge(texts, refs)["rouge1"]
        metrics[f"{key}/response_length"] = sum(len(o) for o in outs) / len(outs)
        for s, t, gs in zip(samples, texts, gold or [None] * len(texts)):
            s[f"beta={beta:g}"] = t if gs is None else {"completion": t, "gold": gs}
    return metrics, samples


def _policy_source(cfg) -> str:
    return cfg.policy or cfg.model.name_or_path


def _load(cfg, path: str):
    return load_trained_policy(cfg, path, "ilql")


def plan(cfg, out: Path, world_size: int = 1) -> dict:
    src = _policy_source(cfg)
    info: dict = {"output_dir": str(out), "stage": "ilql", "preset": cfg.preset, "policy": src,
                  "heads": f"{'two Q heads' if cfg.ilql.two_qs else 'one Q head'} + targets + V",
                  "rewards": cfg.ilql.rewards}
    if common.plan_without_download(cfg, info, src):
        return info
    data = load_samples(cfg)
    steps, _ = common.total_steps(cfg.train, len(data.train), world_size)
    info.update({"data": f"{cfg.data.source} ({data.fmt}): {len(data.train)} samples, "
                         f"{len(data.eval_prompts)} held-out prompts", "optimizer_steps": steps})
    return info


def run(cfg, out: Path, resume: bool = False, overwrite: bool = False, console=None) -> dict:
    from rich.console import Console

    console = console or Console(stderr=True)
    src = _policy_source(cfg)
    check_policy_source(src, "ilql")
    resume_from = ck.prepare_output(out, resume, overwrite)
    acc = common.setup_accelerator(cfg)
    rank, world_size = common.world(acc)
    torch.manual_seed(cfg.seed)
    I = cfg.ilql

    # 1. samples, policy and heads (a resumed run reloads both from its checkpoint)
    data = load_samples(cfg)
    tok, policy = _load(cfg, str(resume_from) if resume_from is not None else src)
    limit = max_positions(policy)
    if limit and cfg.data.max_length > limit:
        raise UserError(f"data.max_length ({cfg.data.max_length}) exceeds the model's {limit} positions")
    disable_dropout(policy)
    vocab = policy.get_output_embeddings().weight.shape[0]
    heads = ILQLHeads.load(resume_from) if resume_from is not None else ILQLHeads(hidden_size(policy.config), vocab,
                                                                                   I.two_qs)
    model = PolicyWithILQLHeads(policy, heads.to(next(policy.parameters()).dtype))
    feats, returns = featurize(tok, data.train, cfg.data)
    steps, _ = common.total_steps(cfg.train, len(feats), world_size)
    if (done := common.already_complete(out, resume_from, steps, console)) is not None:
        return done
    optimizer = common.make_optimizer(model, cfg.train)
    scheduler = common.make_scheduler(optimizer, cfg.train, steps)
    model, optimizer = acc.prepare(model, optimizer)
    core = acc.unwrap_model(model)
    batcher = common.Batcher(len(feats), cfg.train.batch_size, cfg.seed, rank, world_size,
                             [len(f["input_ids"]) for f in feats] if cfg.train.group_by_length else None)
    state = {"step": 0, "micro_step": 0, "examples": 0}
    run_ = common.Run(cfg, out, acc, resume_from)
    if resume_from is not None:
        state = common.load_resumed(resume_from, optimizer, scheduler)
        console.print(f"resuming from {resume_from} at step {state['step']}")
    manifest = {"parent": ck.parent_info(src),
                "data": {"source": cfg.data.source, "format": data.fmt, "fingerprint": data.fingerprint,
                         "train_samples": len(feats), "eval_prompts": len(data.eval_prompts)},
                "heads": "ilql_heads.safetensors"}
    console.print(f"ilql: {len(feats)} samples ({data.fmt}, rewards: {I.rewards}), {steps} optimizer steps, "
                  f"{count_params(core.policy) / 1e6:.2f}M policy + {count_params(core.heads) / 1e6:.2f}M heads -> {out}")
    first_eval: dict = {}
    with common.progress_bar(console, common.is_main(acc)) as progress:
        if cfg.eval.at_start and state["step"] == 0:
            first_eval, _ = evaluate(core, tok, data, cfg, progress)
            run_.log(0, first_eval)
        bar = progress.add_task("ilql", total=steps, completed=state["step"], info="")
        model.train()
        t_last, n_last = time.perf_counter(), state["examples"]
        while state["step"] < steps:
            idx_batches = []
            for _ in range(cfg.train.gradient_accumulation_steps):
                idx_batches.append(batcher.indices(state["micro_step"]))
                state["micro_step"] += 1
            loss_total, parts = 0.0, []
            for j, idx in enumerate(idx_batches):
                b = batch_tensors([feats[i] for i in idx], returns[idx], tok.pad_token_id, acc.device)
                with acc.autocast():
                    out_ = compute_loss(model, b, I)
                loss = out_.loss / len(idx_batches)
                common.backward(acc, loss, cfg.train.gradient_accumulation_steps, last=j == len(idx_batches) - 1)
                loss_total += loss.item()
                parts.append(out_)
            grad_norm = common.optimizer_step(acc, model, optimizer, scheduler, cfg.train.max_grad_norm, loss_total,
                                              state["step"] + 1)
            state["step"] += 1
            state["examples"] += sum(len(i) for i in idx_batches)
            step = state["step"]
            if step % I.steps_for_target_q_sync == 0:
                polyak_update(core.heads.target_qs, core.heads.qs, I.alpha)
            progress.update(bar, advance=1, info=f"loss {loss_total:.3f}")
            if step % cfg.train.log_interval == 0 or step == steps:
                dt = time.perf_counter() - t_last
                log = {f"train/{k}": common.all_reduce(sum(getattr(p, k).item() for p in parts) / len(parts))
                       for k in ("loss", "loss_q", "loss_v", "loss_cql", "loss_awac", "mean_q", "mean_v")}
                run_.log(step, {**log, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                                "train/samples_per_s": (state["examples"] - n_last) / max(dt, 1e-9)})
                t_last, n_last = time.perf_counter(), state["examples"]
            if cfg.eval.interval and step % cfg.eval.interval == 0 and step != steps:
                run_.log(step, evaluate(core, tok, data, cfg, progress)[0])
            run_.checkpoint(model, tok, optimizer, scheduler, state, manifest,
                            due=bool(cfg.checkpoint.interval) and step % cfg.checkpoint.interval == 0 and step != steps)
        last_eval, samples = evaluate(core, tok, data, cfg, progress)
        run_.log(steps, last_eval)
    if not first_eval:
        first_eval = next((r for r in run_.metrics() if r["step"] == 0 and any(k.startswith("eval/") for k in r)), {})
    manifest["metrics"] = last_eval
    manifest["initial_metrics"] = {k: v for k, v in first_eval.items() if k.startswith("eval/")}
    run_.save_final(model, tok, optimizer, scheduler, state, manifest, {"eval_samples.jsonl": common.jsonl(samples)})
    return {"initial": manifest["initial_metrics"], "final": last_eval, "output_dir": str(out), "steps": steps}
