"""`rlhf eval`: policies from any stage side by side on one held-out set.

For each checkpoint: sample completions for the same prompts with the same seed, then ROUGE against
the references, reward (mean ± standard error, and Δ against the reference completion's reward),
the gold score on synthetic data, the KL to a reference policy, and the mean response length.
ILQL checkpoints generate steered by `beta`. Writes report.json, report.md, samples.jsonl and plots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
import yaml
from transformers import AutoModelForCausalLM

from . import checkpoint as ck
from .config import DataConfig, GenerationConfig, load_config, to_dict
from .data import chat, formats
from .data.sources import load_formatted
from .data.tokenize import encode_prompt
from .errors import UserError
from .heads import ILQL_HEADS_FILE, ILQLHeads
from .metrics import (bootstrap_interval, gold_scores, length_controlled_win_rate, mean_and_stderr, rouge,
                      win_rate)
from .models import checkpoint_kind, expect_kind, load_pretrained, load_tokenizer, max_positions
from .rewards import columns_of, make_reward
from .sampling import generate, ilql_generate, ilql_processors, sequence_logprobs, steered_sequence_logprobs
from .tracking import read_metrics

COLUMNS = [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("reward", "reward"),
           ("reward_delta", "reward Δ"), ("gold", "gold"), ("win_rate", "win rate [95%]"),
           ("win_rate_lc", "LC win rate"), ("kl", "KL to ref"), ("response_length", "length")]


def load_eval_prompts(data_cfg, seed: int, num_samples: int, tokenizer_of: str | None = None,
                      with_columns: bool = False):
    """(prompt, reference) of the held-out split of any SFT-style data (pairs: the chosen completion);
    conversations rendered by the chat template of the checkpoint `tokenizer_of`. `with_columns`: also each
    row's other columns (e.g. `answer`, what a rule-based reward checks against)."""
    def renderer():
        return chat.from_tokenizer(load_tokenizer(tokenizer_of), tokenizer_of, data_cfg.chat_template)

    split, fmt = load_formatted(data_cfg, kind="sft", seed=seed, chat=renderer if tokenizer_of else None)
    examples, _ = formats.sft_examples(split.eval or split.train, fmt)
    kept = [e for e in examples if e.prompt][:num_samples]
    if not kept:
        raise UserError(f"dataset '{data_cfg.source}' has no held-out prompts to evaluate on")
    pairs = [(e.prompt, e.completion) for e in kept]
    return (pairs, [e.meta for e in kept]) if with_columns else pairs


def reference_policy(ckpts: list[str], ref: str | None) -> str:
    """--ref-ckpt, else the first checkpoint's parent when it is a local policy, else the first checkpoint."""
    if ref:
        return ref
    parent = ((ck.read_manifest(Path(ckpts[0])) or {}).get("parent") or {}).get("path")
    if parent and Path(parent).is_dir() and checkpoint_kind(Path(parent)) == "policy":
        return parent
    return ckpts[0]


def evaluate_checkpoints(ckpts: list[str], pairs, gen_cfg, *, reward=None, ref: str | None = None,
                         beta: float | list[float] | None = None, top_k: int = 20, use_rouge: bool = True, batch_size: int = 32,
                         seed: int = 1234, max_prompt_length: int = 192, device=None, progress=None,
                         columns: list[dict] | None = None, win_rates: bool = False,
                         against: str | None = None, metrics: dict | None = None) -> tuple[list[dict], list[dict]]:
    """One result row per checkpoint, and one sample row per prompt with every model's output. `columns`:
    each prompt's other data columns, handed to the reward by name. `win_rates`: each checkpoint against the
    reference completions, or against the checkpoint `against`, judged by gold (synthetic) else the reward."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    if reward is not None:
        reward = _WithColumns(reward, refs, columns)
    ref_path = reference_policy(ckpts, ref)
    rows, samples = [], [{"prompt": p, "reference": r} for p, r in pairs]
    ref_scores = reward.score(prompts, refs) if reward is not None and all(refs) else None
    for s, r in zip(samples, ref_scores or []):
        s["reference_reward"] = r
    reference = _Reference(ref_path, device)
    betas = [beta] if isinstance(beta, (int, float)) else list(beta or [])
    for path in ckpts:
        if Path(path).exists():
            expect_kind(Path(path), "policy", "--ckpt")
        tok = load_tokenizer(path)
        model = load_pretrained(AutoModelForCausalLM, path, "model").to(device).eval()
        room = prompt_room(model, path, max_prompt_length, gen_cfg.max_new_tokens)
        queries = [encode_prompt(tok, p, room)[0] for p in prompts]
        heads = ILQLHeads.load(path).to(device) if betas and (Path(path) / ILQL_HEADS_FILE).is_file() else None
        for b in betas if heads is not None else [None]:  # an ILQL checkpoint: one row per steering beta
            outs = (ilql_generate(model, heads, tok, queries, b, gen_cfg, top_k, batch_size, seed, progress)
                    if b is not None else generate(model, tok, queries, gen_cfg, batch_size, seed, progress))
            name = path + (f" (beta {b:g})" if b is not None else "")
            steering = ilql_processors(heads, b, gen_cfg.temperature, top_k) if b is not None else None
            row = _row(name, model, tok, queries, outs, prompts, refs, reward, ref_scores, use_rouge, reference,
                       gen_cfg, batch_size, metrics, samples, steering)
            rows.append({**row, "ref_policy": ref_path})
        del model
    if win_rates:
        rows = add_win_rates(rows, samples, prompts, refs, against)
    return rows, samples


def _row(name, model, tok, queries, outs, prompts, refs, reward, ref_scores, use_rouge, reference, gen_cfg,
         batch_size, metrics, samples, steering=None) -> dict:
    """One evaluated model's row (ROUGE, reward, gold, KL, length, --metric values); its samples filled in.
    `steering`: an ILQL checkpoint's sampling processors (its KL is that of the steered sampler)."""
    texts = tok.batch_decode(outs, skip_special_tokens=True)
    row, scores = _scores(name, prompts, refs, texts, reward, ref_scores, use_rouge, tok)
    # KL(pi || ref) estimated on pi's own samples: mean over samples of sum_t log pi - log ref, pi being the
    # distribution the samples were drawn from (an ILQL checkpoint's: its LM steered by beta, then top-k)
    with_eos = [o + [tok.eos_token_id] if len(o) < gen_cfg.max_new_tokens else o for o in outs]
    row.update(reference.kl(model, tok, queries, with_eos, batch_size, steering))
    row["response_length"] = sum(len(o) for o in outs) / len(outs)
    if metrics and all(refs):
        row.update(metric_values(metrics, texts, refs))
    for i, s in enumerate(samples):
        s[name] = {"completion": texts[i], "length": len(outs[i]), **{k: v[i] for k, v in scores.items()}}
    return row


def add_win_rates(rows: list[dict], samples: list[dict], prompts, refs, against: str | None) -> list[dict]:
    """Win rate (ties half) of every checkpoint's completions against the references' (or against the
    checkpoint `against`), with a paired bootstrap 95% interval and the length-controlled view; judged by the
    gold scorer where the data has one, else by the reward; and the length-controlled win rate (at equal length,
    by a logistic fit on the length difference in words). With references, their own row is added."""
    judge = "gold" if all("gold" in s.get(rows[0]["checkpoint"], {}) for s in samples) else \
        "reward" if all("reward" in s.get(rows[0]["checkpoint"], {}) for s in samples) else None
    if judge is None:
        raise UserError("--win-rate needs a judge: synthetic data (the gold scorer) or a reward source (--reward)")
    if against is None:
        if not all(refs):
            raise UserError("--win-rate compares against the data's reference completions and some prompts have "
                            "none; pass --against CKPT for a head-to-head")
        base = gold_scores(prompts, refs) if judge == "gold" else [s["reference_reward"] for s in samples]
        base_words = [len(t.split()) for t in refs]
        ref_row = {"checkpoint": "reference completions", "n": len(refs), "ref_policy": rows[0]["ref_policy"]}
        ref_row[judge], ref_row[f"{judge}_stderr"] = mean_and_stderr(base)
        rows = [*rows, ref_row]
    else:
        name = next((r["checkpoint"] for r in rows if r["checkpoint"].split(" (beta")[0] == against), None)
        if name is None:
            raise UserError(f"--against {against} is not one of the evaluated checkpoints")
        base = [s[name][judge] for s in samples]
        base_words = [len(s[name]["completion"].split()) for s in samples]
    for r in rows:
        if r["checkpoint"] == "reference completions" or r["checkpoint"] == against:
            continue
        mine = [s[r["checkpoint"]][judge] for s in samples]
        words = [len(s[r["checkpoint"]]["completion"].split()) for s in samples]  # the same measure on both sides
        r["win_rate"] = win_rate(mine, base)
        r["win_rate_lo"], r["win_rate_hi"] = bootstrap_interval(mine, base)
        r["win_rate_lc"] = length_controlled_win_rate(mine, base, words, base_words)
        r["length_difference"] = (sum(words) - sum(base_words)) / len(words)  # words, mean
        r["win_rate_judge"], r["win_rate_against"] = judge, against or "reference completions"
    return rows


def load_metrics(names: list[str]) -> dict:
    """`evaluate` metrics by name (a hub metric, online) or path (a local metric script or folder, offline)."""
    import evaluate

    loaded = {}
    for name in names:
        try:
            loaded[name] = evaluate.load(name)
        except Exception as e:  # offline hub, a missing file, a script that does not import: all one sentence
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--metric {name} cannot be loaded ({why[:160]}); offline, give the path of a "
                            "local evaluate metric script") from None
    return loaded


def metric_values(metrics: dict, texts: list[str], refs: list[str]) -> dict:
    """Each metric's numeric results on completions against references, as metric/NAME/KEY."""
    out = {}
    for name, metric in metrics.items():
        try:
            result = metric.compute(predictions=texts, references=refs) or {}
        except Exception as e:
            raise UserError(f"--metric {name} failed on the completions: {type(e).__name__}: {e}") from None
        label = Path(name).stem if Path(name).suffix == ".py" else name
        out.update({f"metric/{label}/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))})
    return out


def prompt_room(model, path: str, max_prompt_length: int, max_new_tokens: int) -> int:
    """Prompt tokens that fit beside `max_new_tokens` in the model's positions (at most max_prompt_length)."""
    limit = max_positions(model) or max_prompt_length + max_new_tokens
    if max_new_tokens >= limit:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the {limit} positions "
                        f"of {path}")
    return min(max_prompt_length, limit - max_new_tokens)


def _scores(name: str, prompts, refs, texts, reward, ref_scores, use_rouge: bool, tok) -> tuple[dict, dict]:
    """A checkpoint's row of ROUGE, reward (and delta) and gold; and its per-sample reward and gold."""
    row: dict = {"checkpoint": name, "n": len(texts)}
    per_sample: dict = {}
    if use_rouge and all(refs):
        row.update(rouge(texts, refs, tok))
    if reward is not None:
        per_sample["reward"] = scores = reward.score(prompts, texts)
        row["reward"], row["reward_stderr"] = mean_and_stderr(scores)
        if ref_scores is not None:
            row["reward_delta"], row["reward_delta_stderr"] = mean_and_stderr(
                [a - b for a, b in zip(scores, ref_scores)])
    gold = gold_scores(prompts, texts)
    if gold is not None:
        per_sample["gold"] = gold
        row["gold"], row["gold_stderr"] = mean_and_stderr(gold)
    return row, per_sample


class _WithColumns:
    """A reward source that gets the eval prompts' references and data columns with every call."""

    def __init__(self, source, refs, columns):
        self.source, self.name = source, source.name
        self.meta = {"references": list(refs), **columns_of(columns)}

    def score(self, prompts, completions, **metadata):
        return self.source.score(prompts, completions, **{**self.meta, **metadata})


class _Reference:
    """The KL column's reference policy, loaded on first use."""

    def __init__(self, path: str, device):
        self.path, self.device, self.model, self.tokenizer = path, device, None, None

    def kl(self, model, tok, queries, responses, batch_size: int, steering=None) -> dict:
        if self.model is None:
            self.tokenizer = load_tokenizer(self.path)
            self.model = load_pretrained(AutoModelForCausalLM, self.path, "model").to(self.device).eval()
        if len(self.tokenizer) != len(tok):
            return {}
        lp = (sequence_logprobs(model, tok.pad_token_id, queries, responses, batch_size, self.device)
              if steering is None else
              steered_sequence_logprobs(model, steering, tok.pad_token_id, queries, responses, batch_size, self.device))
        lr = sequence_logprobs(self.model, tok.pad_token_id, queries, responses, batch_size, self.device)
        kl, se = mean_and_stderr([a - b for a, b in zip(lp, lr)])
        return {"kl": kl, "kl_stderr": se}


def _fmt(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "—"
    if f"{key}_lo" in row:
        return f"{v:.3f} [{row[f'{key}_lo']:.2f}, {row[f'{key}_hi']:.2f}]"
    se = row.get(f"{key}_stderr")
    return f"{v:.3f}" + (f" ± {se:.3f}" if se is not None and se == se else "")


def columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(key, title) of the table: the known columns the rows have, then each --metric's values."""
    extra = sorted({k for r in rows for k in r if k.startswith("metric/")})
    return [(k, t) for k, t in COLUMNS if any(k in r for r in rows)] + [(k, k.removeprefix("metric/")) for k in extra]


def markdown(rows: list[dict]) -> str:
    cols = columns(rows)
    lines = ["| checkpoint | " + " | ".join(t for _, t in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + r["checkpoint"] + " | " + " | ".join(_fmt(r, k) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def short_name(name: str) -> str:
    """runs/tiny/ppo (beta 4) -> ppo (beta 4): the table's column header."""
    path, _, rest = name.partition(" ")
    return (Path(path).name or path) + (f" {rest}" if rest else "")


def table(rows: list[dict], title: str):
    """Metrics down, checkpoints across (trlx's SFT-vs-PPO layout): fits a terminal for a handful of models."""
    from rich.table import Table

    cols = columns(rows)
    t = Table(title=title)
    t.add_column("metric")
    for r in rows:
        t.add_column(short_name(r["checkpoint"]), justify="right", no_wrap=True)
    for k, name in cols:
        t.add_row(name, *(_fmt(r, k) for r in rows))
    return t


def plots(rows: list[dict], samples: list[dict], out: Path) -> list[str]:
    """reward (or gold) against KL for every checkpoint; the distribution of each model's scores."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the headless backend

    written = []
    key = "reward" if any("reward" in r for r in rows) else "gold" if any("gold" in r for r in rows) else None
    if key is None:
        return written
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, r in enumerate(rows):
        color = f"C{i}"
        if key in r:
            ax.errorbar(r.get("kl", 0.0), r[key], yerr=r.get(f"{key}_stderr") or 0, fmt="o", capsize=3, color=color,
                        label=f"{short_name(r['checkpoint'])}: {key}")
        if key != "gold" and "gold" in r:  # the true score beside the learned one: over-optimisation shows
            ax.errorbar(r.get("kl", 0.0), r["gold"], yerr=r.get("gold_stderr") or 0, fmt="s", mfc="none", capsize=3,
                        color=color, label=f"{short_name(r['checkpoint'])}: gold")
    ax.set_xlabel("KL to the reference policy (nats)")
    ax.set_ylabel(f"mean {key}" + (" / gold" if any("gold" in r for r in rows) and key != "gold" else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{key}_vs_kl.png", dpi=120)
    plt.close(fig)
    written.append(f"{key}_vs_kl.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in rows:
        vals = [s[r["checkpoint"]].get(key) for s in samples if isinstance(s.get(r["checkpoint"]), dict)]
        vals = [v for v in vals if v is not None]
        if vals:
            ax.hist(vals, bins=30, alpha=0.5, label=short_name(r["checkpoint"]))
    ax.set_xlabel(key)
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{key}_distribution.png", dpi=120)
    plt.close(fig)
    written.append(f"{key}_distribution.png")
    return written


NOTE = ("mean ± standard error; win rates: ties count half, [95% paired bootstrap interval], LC = length-controlled: "
        "the win rate at equal length, from a logistic fit of the outcome on the length difference in words")


def training_curve(ckpt: str) -> list[dict]:
    """A checkpoint's held-out evals along its training (its metrics.jsonl): step, KL to its reference, proxy
    reward, gold and length at each eval that measured the KL (online methods; DPO with a held reference)."""
    curve = []
    for r in read_metrics(Path(ckpt) / ck.METRICS):
        if isinstance(r.get("eval/kl"), (int, float)):
            curve.append({"step": r.get("step"), "kl": r["eval/kl"], "reward": r.get("eval/reward"),
                          "gold": r.get("eval/gold"), "length": r.get("eval/response_length")})
    return curve


def curve_plots(curves: dict[str, list[dict]], ckpts: list[str], out: Path) -> list[str]:
    """Gao et al.'s figure: proxy reward (solid) and gold (dashed) against sqrt(KL) along training, one colour
    per checkpoint; and DPO's training signature (loss from ln 2, reward accuracy from 0.5, margin, chosen and
    rejected implicit rewards) for the DPO checkpoints."""
    matplotlib.use("Agg")
    import math

    import matplotlib.pyplot as plt

    written = []
    drawn = {c: pts for c, pts in curves.items() if len(pts) >= 2}
    if drawn:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (c, pts) in enumerate(drawn.items()):
            x = [math.sqrt(max(p["kl"], 0.0)) for p in pts]
            for key, style in (("reward", "-o"), ("gold", "--s")):
                ys = [p[key] for p in pts]
                if all(isinstance(y, (int, float)) for y in ys):
                    ax.plot(x, ys, style, color=f"C{i}", ms=3, label=f"{short_name(c)}: {'proxy' if key == 'reward' else key}")
        ax.set_xlabel("sqrt(KL to the reference), nats^1/2")
        ax.set_ylabel("held-out score")
        ax.set_title("proxy reward and gold along training", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "overoptimization.png", dpi=120)
        plt.close(fig)
        written.append("overoptimization.png")
    dpo = {c: [r for r in read_metrics(Path(c) / ck.METRICS) if "train/rewards/margins" in r] for c in ckpts
           if (ck.read_manifest(Path(c)) or {}).get("stage") == "dpo"}
    dpo = {c: rs for c, rs in dpo.items() if rs}
    if dpo:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for i, (c, rs) in enumerate(dpo.items()):
            steps = [r["step"] for r in rs]
            axes[0].plot(steps, [r["train/loss"] for r in rs], color=f"C{i}", label=short_name(c))
            axes[1].plot(steps, [r["train/rewards/accuracies"] for r in rs], color=f"C{i}")
            for key, style in (("margins", "-"), ("chosen", "--"), ("rejected", ":")):
                axes[2].plot(steps, [r[f"train/rewards/{key}"] for r in rs], style, color=f"C{i}",
                             label=f"{short_name(c)}: {key}")
        axes[0].axhline(math.log(2), color="grey", lw=0.8)
        axes[1].axhline(0.5, color="grey", lw=0.8)
        for ax, title in zip(axes, ("loss (starts at ln 2)", "reward accuracy (starts at 0.5)",
                                    "implicit rewards: margin, chosen, rejected")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
        axes[2].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "dpo_training.png", dpi=120)
        plt.close(fig)
        written.append("dpo_training.png")
    return written


def write_report(rows: list[dict], samples: list[dict], out: Path, settings: dict) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    ckpts = settings.get("checkpoints") or []
    curves = {c: training_curve(c) for c in ckpts}
    (out / "report.json").write_text(json.dumps({"settings": settings, "results": rows, "curves": curves}, indent=2))
    (out / "report.md").write_text(f"# rlhf eval\n\n{markdown(rows)}\nReference policy for KL: "
                                   f"{rows[0]['ref_policy'] if rows else '-'}; {settings.get('num_samples')} "
                                   f"held-out prompts; {NOTE}.\n")
    (out / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    figures = plots(rows, samples, out) + curve_plots(curves, ckpts, out)
    (out / "report.html").write_text(html_report(rows, samples, settings, [out / f for f in figures]))
    return ["report.json", "report.md", "report.html", "samples.jsonl", *figures]


def html_report(rows: list[dict], samples: list[dict], settings: dict, figures: list[Path], shown: int = 24) -> str:
    """One self-contained page (opens offline, nothing fetched): the table, every figure embedded as a data
    URI, and the first `shown` prompts with each checkpoint's completion side by side."""
    import base64
    import html

    esc = html.escape
    cols = columns(rows)
    head = "".join(f"<th>{esc(short_name(r['checkpoint']))}</th>" for r in rows)
    body = "".join(f"<tr><td>{esc(t)}</td>" + "".join(f"<td>{esc(_fmt(r, k))}</td>" for r in rows) + "</tr>"
                   for k, t in cols)
    images = "".join(f'<figure><img alt="{esc(f.stem)}" src="data:image/png;base64,'
                     f'{base64.b64encode(f.read_bytes()).decode()}"><figcaption>{esc(f.stem)}</figcaption></figure>'
                     for f in figures)
    names = [r["checkpoint"] for r in rows if r["checkpoint"] != "reference completions"]
    cards = []
    for s in samples[:shown]:
        cells = [f"<td><b>reference</b><br>{esc(s.get('reference') or '—')}</td>"]
        for n in names:
            c = s.get(n) or {}
            score = ", ".join(f"{k} {c[k]:.3f}" for k in ("gold", "reward") if isinstance(c.get(k), (int, float)))
            cells.append(f"<td><b>{esc(short_name(n))}</b> <small>{esc(score)}</small><br>"
                         f"{esc(c.get('completion', ''))}</td>")
        cards.append(f"<tr><td class=p>{esc(s['prompt'][-400:])}</td>{''.join(cells)}</tr>")
    style = ("body{font:14px sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px "
             "solid #ccc;padding:4px 8px;vertical-align:top}td.p{white-space:pre-wrap;max-width:30em;color:#555}"
             "figure{display:inline-block;margin:0 1em}img{max-width:480px}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>rlhf eval</title><style>{style}</style></head>"
            f"<body><h1>rlhf eval</h1><p>{esc(str(settings.get('num_samples')))} held-out prompts of "
            f"{esc(str((settings.get('data') or {}).get('source', '')))}; KL to "
            f"{esc(str(rows[0].get('ref_policy', '-') if rows else '-'))}; {esc(NOTE)}.</p>"
            f"<table><tr><th>metric</th>{head}</tr>{body}</table>{images}"
            f"<h2>Samples</h2><table><tr><th>prompt</th><th colspan={len(names) + 1}>completions</th></tr>"
            f"{''.join(cards)}</table></body></html>\n")


# --- `rlhf eval` end to end: data, cache check, evaluation, files ---------------------------------------
@dataclass
class EvalRequest:
    """What `rlhf eval` was asked for (its flags)."""

    ckpts: list[str]
    data: str | None = None  # data source of the held-out prompts (default: the first checkpoint's)
    config: Path | None = None  # a stage config whose data section to use
    rouge: bool = True
    reward: bool = False
    reward_ckpt: str | None = None
    reward_fn: str | None = None
    reward_url: str | None = None
    ref_ckpt: str | None = None
    beta: list[float] | None = None  # ILQL: one row per steering beta (a sweep)
    num_samples: int = 256
    max_new_tokens: int = 32
    temperature: float = 1.0
    batch_size: int = 64
    seed: int = 1234
    output_dir: Path = Path("runs/eval")
    win_rate: bool = False
    against: str | None = None  # head-to-head: win rates against this checkpoint instead of the references
    metrics: list[str] | None = None  # `evaluate` metrics: hub names or local script paths


@dataclass
class EvalResult:
    rows: list[dict]
    title: str
    files: list[str] | None  # None: an up-to-date report was reused


def eval_data(req: EvalRequest) -> DataConfig:
    """The data section: from --config, else the first checkpoint's own, else --data (default synthetic:tldr)."""
    if req.config is not None:
        raw = yaml.safe_load(req.config.read_text()) if req.config.is_file() else None
        data_cfg = load_config(req.config, (raw or {}).get("stage", "sft") if isinstance(raw, dict) else "sft").data
    else:
        saved = ((ck.read_manifest(Path(req.ckpts[0])) or {}).get("config") or {}).get("data")
        data_cfg = DataConfig(**saved) if saved and not req.data else DataConfig(source=req.data or "synthetic:tldr")
    if data_cfg.source.startswith("synthetic:"):
        data_cfg = data_cfg.model_copy(update={"synthetic": data_cfg.synthetic.model_copy(
            update={"num_eval": max(req.num_samples, data_cfg.synthetic.num_eval)})})
    return data_cfg


POLICY_STAGES = ("sft", "ppo", "grpo", "dpo", "ilql")  # sft first: the baseline column


def fill_request(req: EvalRequest, runs: Path = Path("runs")) -> list[str]:
    """What `rlhf eval` takes when not told, each said in a note: no --ckpt, the complete policy checkpoints
    under runs/ (SFT first); --reward without a source, the reward model a checkpoint's manifest names,
    else runs/rm."""
    notes = []
    if not req.ckpts:
        found = [p for p in sorted(runs.iterdir()) if p.is_dir()] if runs.is_dir() else []
        stage = {p: (ck.read_manifest(p) or {}).get("stage") for p in found if ck.is_complete(p)}
        req.ckpts = [str(p) for s in POLICY_STAGES for p in found if stage.get(p) == s]
        if not req.ckpts:
            raise UserError(f"no --ckpt given and no complete policy checkpoint under {runs}/ (train one with rlhf sft)")
        notes.append(f"no --ckpt: {', '.join(req.ckpts)} (the policies under {runs}/)")
    if req.reward and not any((req.reward_ckpt, req.reward_fn, req.reward_url)):
        named = [((ck.read_manifest(Path(c)) or {}).get("config") or {}).get("reward", {}).get("ckpt") for c in req.ckpts]
        rm = next((n for n in named if n and Path(n).is_dir()), None)
        rm = rm or (str(runs / "rm") if (ck.read_manifest(runs / "rm") or {}).get("stage") == "train-rm" else None)
        if rm is None:
            raise UserError("--reward needs --reward-ckpt, --reward-fn or --reward-url (no checkpoint names a "
                            f"reward model, and {runs}/rm holds none)")
        req.reward_ckpt = rm
        notes.append(f"--reward: the reward model {rm}")
    return notes


def run_eval(req: EvalRequest, progress) -> EvalResult:
    """Evaluate `req.ckpts` and write the report, or reuse a report made with the same checkpoints and settings."""
    if req.against is not None:
        req.win_rate = True
        if not [c for c in req.ckpts if c != req.against]:
            raise UserError(f"--against {req.against} needs another --ckpt to compare with it")
        if req.against not in req.ckpts:
            req.ckpts = [*req.ckpts, req.against]
    for c in req.ckpts:
        if not Path(c).exists():
            raise UserError(f"checkpoint {c} does not exist")
    if req.reward and not any((req.reward_ckpt, req.reward_fn, req.reward_url)):
        raise UserError("--reward needs --reward-ckpt, --reward-fn or --reward-url")
    data_cfg = eval_data(req)
    pairs, columns = load_eval_prompts(data_cfg, 42, req.num_samples, req.ckpts[0] if req.ckpts else None,
                                       with_columns=True)
    title = f"rlhf eval: {len(pairs)} held-out prompts of {data_cfg.source}"
    settings = {"checkpoints": req.ckpts, "content_hashes": [ck.content_hash(Path(c)) for c in req.ckpts],
                "data": to_dict(data_cfg), "num_samples": len(pairs), "seed": req.seed, "rouge": req.rouge,
                "max_new_tokens": req.max_new_tokens, "temperature": req.temperature, "beta": req.beta,
                "ref_ckpt": req.ref_ckpt, "reward": [req.reward_ckpt, req.reward_fn, req.reward_url] if req.reward else None,
                "reward_hash": ck.content_hash(Path(req.reward_ckpt)) if req.reward and req.reward_ckpt else None,
                "win_rate": req.win_rate, "against": req.against, "metrics": req.metrics}
    saved = req.output_dir / "report.json"
    if saved.is_file() and json.loads(saved.read_text()).get("settings") == settings:
        return EvalResult(json.loads(saved.read_text())["results"], title, None)
    metrics = load_metrics(req.metrics or [])  # before any sampling: a metric that cannot load is said at once
    source = make_reward(req.reward_ckpt, req.reward_fn, req.reward_url, batch_size=req.batch_size) if req.reward else None
    gen = GenerationConfig(max_new_tokens=req.max_new_tokens, do_sample=req.temperature > 0,
                           temperature=req.temperature or 1.0)
    if progress is not None:
        progress.console.print(f"{title}: sampling from {len(req.ckpts)} checkpoint(s)")
    rows, samples = evaluate_checkpoints(req.ckpts, pairs, gen, reward=source, ref=req.ref_ckpt, beta=req.beta,
                                         use_rouge=req.rouge, batch_size=req.batch_size, seed=req.seed,
                                         max_prompt_length=data_cfg.max_prompt_length, progress=progress,
                                         columns=columns, win_rates=req.win_rate, against=req.against,
                                         metrics=metrics)
    return EvalResult(rows, title, write_report(rows, samples, req.output_dir, settings))


def score_file(data: Path, source, delta: bool = False, output: Path | None = None) -> list[float]:
    """`rlhf score`: the scores of a JSONL file's {prompt, completion[, reference]} rows by `source`
    (written beside each row to `output` when given)."""
    if not data.is_file():
        raise UserError(f"data file {data} does not exist")
    try:
        rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{data} is not JSONL text: {e}") from None
    if not rows:
        raise UserError(f"data file {data} has no rows")
    missing = next((c for c in ("prompt", "completion") if c not in rows[0]), None)
    if missing:
        raise UserError(f"{data} has no column '{missing}' (columns: {', '.join(rows[0])})")
    meta = {"references": [r.get("reference", "") for r in rows]} if delta else {}
    scores = source.score([r["prompt"] for r in rows], [r["completion"] for r in rows], **meta)
    if output:
        output.write_text("".join(json.dumps({**r, "score": s}) + "\n" for r, s in zip(rows, scores)))
    return scores
