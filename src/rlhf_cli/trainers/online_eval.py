"""Held-out eval of an online-RL policy (PPO; every online method next): completions for a fixed set of
prompts, scored by the run's reward (and delta), the gold scorer on synthetic data, ROUGE against the
references, and the KL to the reference policy.
"""

from __future__ import annotations


from ..data.tokenize import encode_prompt
from ..metrics import gold_scores, mean_and_stderr, rouge, sequence_kls
from ..sampling import generate
from .rollouts import PromptData, Scorer


def evaluate(model, reference, tok, data: PromptData, scorer: Scorer, cfg, device, progress,
             synced: bool = False) -> tuple[dict, list]:
    """Generate for the fixed held-out prompts: reward (and delta), gold, ROUGE, KL to the reference."""
    pairs = data.eval[: cfg.eval.num_samples]
    if not pairs:
        return {}, []
    was = model.training
    model.eval()
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    queries = [encode_prompt(tok, p, cfg.data.max_prompt_length)[0] for p in prompts]
    responses = generate(model.policy, tok, queries, cfg.eval.generation, cfg.eval.batch_size, cfg.eval.seed,
                         progress, cfg.online.stop_sequences, keep_eos=True, synced_gpus=synced)
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    columns = (data.eval_columns or [])[: len(pairs)] or None
    scorer.take_parts()  # the eval's own per-source means below, not the rollouts'
    rewards, raw = scorer(prompts, texts, refs, columns) if scorer.delta else (None, scorer.raw(prompts, texts, refs,
                                                                                                 columns))
    m: dict = {}
    m["eval/reward"], m["eval/reward_stderr"] = mean_and_stderr(raw)
    m.update({f"eval/reward/{k}": v for k, v in scorer.take_parts().items()})
    if rewards is not None:
        m["eval/reward_delta"], m["eval/reward_delta_stderr"] = mean_and_stderr(rewards)
    gold = gold_scores(prompts, texts)
    if gold is not None:
        m["eval/gold"], m["eval/gold_stderr"] = mean_and_stderr(gold)
    kls = [None] * len(texts)  # no reference (GRPO with beta 0): no KL
    if reference is not None:
        kls = sequence_kls(model.policy, reference, tok.pad_token_id, queries, responses, cfg.eval.batch_size, device)
        m["eval/kl"], m["eval/kl_stderr"] = mean_and_stderr(kls)
    if all(r is not None for r in refs):
        m.update({f"eval/{k}": v for k, v in rouge(texts, refs, tok).items()})
    m["eval/response_length"] = sum(len(r) for r in responses) / len(responses)
    model.train(was)
    samples = [{"prompt": p, "completion": t, "reward": s, "kl": k, **({"reference": r} if r is not None else {}),
                **({"gold": g} if gold is not None else {})}
               for p, t, s, k, r, g in zip(prompts, texts, raw, kls, refs, gold or [None] * len(texts))]
    return m, samples


def mean_gold(prompts, texts) -> float | None:
    g = gold_scores(prompts, texts)
    return sum(g) / len(g) if g else None


def show_samples(console, samples: list[dict], step: int, n: int = 2) -> None:
    for s in samples[:n]:
        console.print(f"  [dim]step {step} sample:[/] ...{s['prompt'][-60:]!r} -> {s['completion'][:120]!r} "
                      f"(reward {s['reward']:.3f})", highlight=False)
