"""Scores of generated text: ROUGE (rouge-score, offline) and the synthetic gold score."""

from __future__ import annotations

import math

from ..data import synthetic


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (stemmed), as `evaluate`'s rouge metric reports it, computed offline."""
    from rouge_score import rouge_scorer

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
