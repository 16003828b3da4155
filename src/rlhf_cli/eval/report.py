"""`rlhf eval`: policies from any stage side by side on one held-out set.

For each checkpoint: sample completions for the same prompts with the same seed, then ROUGE against
the references, reward (mean ± standard error, and Δ against the reference completion's reward),
the gold score on synthetic data, the KL to a reference policy, and the mean response length.
ILQL checkpoints generate steered by `beta`. Writes report.json, report.md, samples.jsonl and plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from .metrics import gold_scores, mean_and_stderr, rouge

COLUMNS = [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("reward", "reward"),
           ("reward_delta", "reward Δ"), ("gold", "gold"), ("kl", "KL to ref"), ("response_length", "length")]


def load_eval_prompts(data_cfg, seed: int, num_samples: int) -> list[tuple[str, str | None]]:
    """(prompt, reference) of the held-out split of any SFT-style data (pairs: the chosen completion)."""
    from ..data import formats
    from ..data.sources import load_formatted

    split, fmt = load_formatted(data_cfg, kind="sft", seed=seed)
    examples, _ = formats.sft_examples(split.eval or split.train, fmt)
    pairs = [(e.prompt, e.completion) for e in examples if e.prompt]
    if not pairs:
        raise UserError(f"dataset '{data_cfg.source}' has no held-out prompts to evaluate on")
    return pairs[:num_samples]


def reference_policy(ckpts: list[str], ref: str | None) -> str:
    """--ref-ckpt, else the first checkpoint's parent when it is a local policy, else the first checkpoint."""
    from .. import checkpoint as ck
    from ..models import checkpoint_kind

    if ref:
        return ref
    parent = ((ck.read_manifest(Path(ckpts[0])) or {}).get("parent") or {}).get("path")
    if parent and Path(parent).is_dir() and checkpoint_kind(Path(parent)) == "policy":
        return parent
    return ckpts[0]


@torch.no_grad()
def _sequence_logps(model, tok, queries, responses, batch_size: int, device) -> list[float]:
    from ..losses.ppo import token_logprobs
    from ..trainers.ppo import collate

    out: list[float] = []
    for i in range(0, len(queries), batch_size):
        b = collate(queries[i: i + batch_size], responses[i: i + batch_size], tok.pad_token_id, device)
        R = b.responses.shape[1]
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                       position_ids=(b.attention_mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=False,
                       logits_to_keep=R + 1).logits[:, :-1]
        out += (token_logprobs(logits, b.responses) * b.mask).sum(1).tolist()
    return out


def evaluate_checkpoints(ckpts: list[str], pairs, gen_cfg, *, reward=None, ref: str | None = None,
                         beta: float | None = None, top_k: int = 20, use_rouge: bool = True, batch_size: int = 32,
                         seed: int = 1234, max_prompt_length: int = 192, device=None, progress=None
                         ) -> tuple[list[dict], list[dict]]:
    """One result row per checkpoint, and one sample row per prompt with every model's output."""
    from transformers import AutoModelForCausalLM

    from ..data.tokenize import encode_prompt
    from ..eval.generation import generate
    from ..heads import ILQL_HEADS_FILE, ILQLHeads, ilql_generate
    from ..models import _pretrained, expect_kind, load_tokenizer

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    ref_path = reference_policy(ckpts, ref)
    ref_model = ref_tok = None
    rows, samples = [], [{"prompt": p, "reference": r} for p, r in pairs]
    ref_scores = reward.score(prompts, refs) if reward is not None and all(refs) else None
    for s, r in zip(samples, ref_scores or []):
        s["reference_reward"] = r
    for path in ckpts:
        if Path(path).exists():
            expect_kind(Path(path), "policy", "--ckpt")
        tok = load_tokenizer(path)
        model = _pretrained(AutoModelForCausalLM, path, "model").to(device).eval()
        queries = [encode_prompt(tok, p, max_prompt_length)[0] for p in prompts]
        ilql = (Path(path) / ILQL_HEADS_FILE).is_file()
        if ilql and beta is not None:
            heads = ILQLHeads.load(path).to(device)
            outs = ilql_generate(model, heads, tok, queries, beta, gen_cfg.max_new_tokens, top_k, gen_cfg.temperature,
                                 batch_size, seed, progress)
        else:
            outs = generate(model, tok, queries, gen_cfg, batch_size, seed, progress)
        texts = tok.batch_decode(outs, skip_special_tokens=True)
        name = path + (f" (beta {beta:g})" if ilql and beta is not None else "")
        row: dict = {"checkpoint": name, "n": len(texts)}
        if use_rouge and all(refs):
            row.update(rouge(texts, refs))
        if reward is not None:
            scores = reward.score(prompts, texts)
            row["reward"], row["reward_stderr"] = mean_and_stderr(scores)
            if ref_scores is not None:
                row["reward_delta"], row["reward_delta_stderr"] = mean_and_stderr(
                    [a - b for a, b in zip(scores, ref_scores)])
        gold = gold_scores(prompts, texts)
        if gold is not None:
            row["gold"], row["gold_stderr"] = mean_and_stderr(gold)
        # KL(pi || ref) estimated on pi's own samples: mean over samples of sum_t log pi - log ref
        with_eos = [o + [tok.eos_token_id] if len(o) < gen_cfg.max_new_tokens else o for o in outs]
        if ref_model is None:
            ref_tok = load_tokenizer(ref_path)
            ref_model = _pretrained(AutoModelForCausalLM, ref_path, "model").to(device).eval()
        if len(ref_tok) == len(tok):
            lp = _sequence_logps(model, tok, queries, with_eos, batch_size, device)
            lr = _sequence_logps(ref_model, tok, queries, with_eos, batch_size, device)
            row["kl"], row["kl_stderr"] = mean_and_stderr([a - b for a, b in zip(lp, lr)])
        row["response_length"] = sum(len(o) for o in outs) / len(outs)
        rows.append(row)
        for i, s in enumerate(samples):
            s[name] = {"completion": texts[i], **({"reward": scores[i]} if reward is not None else {}),
                       **({"gold": gold[i]} if gold is not None else {})}
        del model
    for r in rows:
        r["ref_policy"] = ref_path
    return rows, samples


def _fmt(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "—"
    se = row.get(f"{key}_stderr")
    return f"{v:.3f}" + (f" ± {se:.3f}" if se is not None and se == se else "")


def markdown(rows: list[dict]) -> str:
    cols = [(k, t) for k, t in COLUMNS if any(k in r for r in rows)]
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

    cols = [(k, t) for k, t in COLUMNS if any(k in r for r in rows)]
    t = Table(title=title)
    t.add_column("metric")
    for r in rows:
        t.add_column(short_name(r["checkpoint"]), justify="right", no_wrap=True)
    for k, name in cols:
        t.add_row(name, *(_fmt(r, k) for r in rows))
    return t


def plots(rows: list[dict], samples: list[dict], out: Path) -> list[str]:
    """reward (or gold) against KL for every checkpoint; the distribution of each model's scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def write_report(rows: list[dict], samples: list[dict], out: Path, settings: dict) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"settings": settings, "results": rows}, indent=2))
    (out / "report.md").write_text(f"# rlhf eval\n\n{markdown(rows)}\nReference policy for KL: "
                                   f"{rows[0]['ref_policy'] if rows else '-'}; {settings.get('num_samples')} "
                                   "held-out prompts; mean ± standard error.\n")
    (out / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    return ["report.json", "report.md", "samples.jsonl", *plots(rows, samples, out)]
