"""Scores of generated text: ROUGE (rouge-score, offline), the synthetic gold score, mean ± standard
error, and the generation metrics SFT and DPO report at each eval."""

from __future__ import annotations

import math

import torch

from rouge_score import rouge_scorer

from .data import synthetic
from .data.tokenize import encode_prompt
from .losses.ppo import token_logprobs
from .sampling import collate_responses, generate, response_logits


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


def win_rate(a: list[float], b: list[float]) -> float:
    """How often a beats b, pair by pair, a tie counting half (Stiennon et al.'s preference rate)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"win_rate needs two equal, non-empty lists of scores, got {len(a)} and {len(b)}")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def bootstrap_interval(a: list[float], b: list[float], stat=win_rate, n: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of stat(a, b) over the pairs resampled with replacement (paired: each
    draw keeps a prompt's two scores together)."""
    import random

    rng = random.Random(seed)
    k = len(a)
    draws = sorted(stat([a[i] for i in idx], [b[i] for i in idx])
                   for idx in ([rng.randrange(k) for _ in range(k)] for _ in range(n)))
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return draws[int(lo * (n - 1))], draws[int(math.ceil(hi * (n - 1)))]


def length_controlled_win_rate(a: list[float], b: list[float], a_lengths: list[int], b_lengths: list[int],
                               ridge: float = 1e-3) -> float:
    """The win rate a would have at equal length (AlpacaEval's length control, Dubois et al. 2024): a logistic
    regression of each pair's outcome (1 win, 0.5 tie, 0 loss) on the length difference d = len(a) - len(b),
    scaled by its root mean square but not centred, p = sigmoid(theta + phi * d); the answer is sigmoid(theta),
    the prediction at d = 0. A policy that wins by writing more gets its wins credited to phi, not theta.
    Fitted by Newton's method with a small ridge; without any length difference it is the plain win rate."""
    y = [1.0 if x > z else 0.5 if x == z else 0.0 for x, z in zip(a, b)]
    d = [float(p - q) for p, q in zip(a_lengths, b_lengths)]
    scale = math.sqrt(sum(v * v for v in d) / len(d))
    if scale == 0:
        return sum(y) / len(y)
    x = [v / scale for v in d]
    theta = phi = 0.0
    for _ in range(100):
        p = [1 / (1 + math.exp(-(theta + phi * xi))) for xi in x]
        g0 = sum(pi - yi for pi, yi in zip(p, y)) + ridge * theta  # gradient of the penalised log-loss
        g1 = sum((pi - yi) * xi for pi, yi, xi in zip(p, y, x)) + ridge * phi
        w = [pi * (1 - pi) for pi in p]
        h00, h01 = sum(w) + ridge, sum(wi * xi for wi, xi in zip(w, x))
        h11 = sum(wi * xi * xi for wi, xi in zip(w, x)) + ridge
        det = h00 * h11 - h01 * h01
        step0, step1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        theta, phi = theta - step0, phi - step1
        if abs(step0) + abs(step1) < 1e-10:
            break
    return 1 / (1 + math.exp(-theta))


def gold_scores(prompts: list[str], completions: list[str]) -> list[float] | None:
    """Gold scores when every prompt is synthetic, else None."""
    if not prompts or not all(synthetic.is_synthetic_prompt(p) for p in prompts):
        return None
    return [synthetic.gold_score(p, c) for p, c in zip(prompts, completions)]


@torch.no_grad()
def sequence_kls(policy, reference, pad_id: int, queries, responses, batch_size: int, device) -> list[float]:
    """Per-sample sum over response tokens of log pi - log pi_ref: an unbiased estimate of KL(pi || ref) on
    pi's own samples. `reference`: anything with `logits(input_ids, attention_mask, num_logits)`."""
    out: list[float] = []
    for i in range(0, len(queries), batch_size):
        b = collate_responses(queries[i: i + batch_size], responses[i: i + batch_size], pad_id, device)
        n = b.responses.shape[1]
        lp = token_logprobs(response_logits(policy, b), b.responses)
        ref = token_logprobs(reference.logits(b.input_ids, b.attention_mask, n + 1)[:, :-1], b.responses)
        out += ((lp - ref) * b.mask).sum(1).tolist()
    return out


def generation_metrics(model, tokenizer, prompts: list[str], references: list[str], cfg, progress=None,
                       reference=None) -> tuple[dict, list[dict]]:
    """Generate for `prompts` with `cfg.eval.generation`: ROUGE-1/2/L against `references`, mean
    response length and, when every prompt is synthetic, the gold score; with a `reference` policy (DPO's)
    the KL to it, as the online methods report it; plus the samples."""
    if not prompts:
        return {}, []
    ev = cfg.eval
    ids = [encode_prompt(tokenizer, p, cfg.data.max_prompt_length)[0] for p in prompts]
    outs = generate(model, tokenizer, ids, ev.generation, ev.batch_size, ev.seed, progress, keep_eos=reference is not None)
    texts = tokenizer.batch_decode(outs, skip_special_tokens=True)
    metrics = {f"eval/{k}": v for k, v in rouge(texts, references, tokenizer).items()}
    metrics["eval/response_length"] = sum(len(o) for o in outs) / len(outs)
    gold = gold_scores(prompts, texts)
    if gold is not None:
        metrics["eval/gold"], metrics["eval/gold_stderr"] = mean_and_stderr(gold)
    kls = [None] * len(texts)
    if reference is not None:
        device = next(model.parameters()).device
        kls = sequence_kls(model, reference, tokenizer.pad_token_id, ids, outs, ev.batch_size, device)
        metrics["eval/kl"], metrics["eval/kl_stderr"] = mean_and_stderr(kls)
    samples = [{"prompt": p, "reference": r, "completion": t, **({"gold": g} if gold is not None else {}),
                **({"kl": k} if k is not None else {})}
               for p, r, t, g, k in zip(prompts, references, texts, gold or [None] * len(texts), kls)]
    return metrics, samples
