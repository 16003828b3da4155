"""Scores of generated text: ROUGE (rouge-score, offline), the synthetic gold score, mean ± standard
error, and the generation metrics SFT and DPO report at each eval."""

from __future__ import annotations

import math

from rouge_score import rouge_scorer

from .data import synthetic
from .data.tokenize import encode_prompt
from .sampling import generate


def rouge(predictions: list[str], references: list[str], tokenizer=None) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (stemmed), as `evaluate`'s rouge metric reports it, computed offline.
    With `tokenizer`, the references are read as the predictions were decoded (special tokens dropped): a
    chat template's end-of-turn (`<|im_end|>`) in a rendered reference is not a word a summary misses."""
    if tokenizer is not None:
        ids = tokenizer(list(references), add_special_tokens=False)["input_ids"]
        references = tokenizer.batch_decode(ids, skip_special_tokens=True)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for k in totals:
            totals[k] += scores[k].fmeasure
    n = max(1, len(predictions))
    return {k: v / n for k, v in totals.items()}


def mean_and_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(xs) / n
    if n == 1:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def gold_scores(prompts: list[str], completions: list[str]) -> list[float] | None:
    """Gold scores when every prompt is synthetic, else None."""
    if not prompts or not all(synthetic.is_synthetic_prompt(p) for p in prompts):
        return None
    return [synthetic.gold_score(p, c) for p, c in zip(prompts, completions)]


def generation_metrics(model, tokenizer, prompts: list[str], references: list[str], cfg, progress=None
                       ) -> tuple[dict, list[dict]]:
    """Generate for `prompts` with `cfg.eval.generation`: ROUGE-1/2/L against `references`, mean
    response length and, when every prompt is synthetic, the gold score; plus the samples."""
    if not prompts:
        return {}, []
    ev = cfg.eval
    ids = [encode_prompt(tokenizer, p, cfg.data.max_prompt_length)[0] for p in prompts]
    outs = generate(model, tokenizer, ids, ev.generation, ev.batch_size, ev.seed, progress)
    texts = tokenizer.batch_decode(outs, skip_special_tokens=True)
    metrics = {f"eval/{k}": v for k, v in rouge(texts, references, tokenizer).items()}
    metrics["eval/response_length"] = sum(len(o) for o in outs) / len(outs)
    gold = gold_scores(prompts, texts)
    if gold is not None:
        metrics["eval/gold"], metrics["eval/gold_stderr"] = mean_and_stderr(gold)
    samples = [{"prompt": p, "reference": r, "completion": t, **({"gold": g} if gold is not None else {})}
               for p, r, t, g in zip(prompts, references, texts, gold or [None] * len(texts))]
    return metrics, samples
