"""Batched generation with the KV cache, left padding, and a fixed sampling seed."""

from __future__ import annotations

import torch

from ..data.tokenize import pad_left


@torch.inference_mode()
def generate(model, tokenizer, prompt_ids: list[list[int]], gen_cfg, batch_size: int, seed: int,
             progress=None) -> list[list[int]]:
    """Completion token ids (EOS and what follows cut off) for each prompt.

    The sampling noise is drawn from its own seed inside a forked RNG, so evaluating mid-training
    neither depends on nor disturbs the training RNG (a resumed run stays identical).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[int]] = []
    task = progress.add_task("generating", total=len(prompt_ids), info="") if progress is not None else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[i: i + batch_size]
            input_ids = pad_left(chunk, pad).to(device)  # (B, P)
            attention_mask = pad_left([[1] * len(c) for c in chunk], 0).to(device)
            kwargs = dict(max_new_tokens=gen_cfg.max_new_tokens, do_sample=gen_cfg.do_sample,
                          pad_token_id=pad, eos_token_id=eos)
            if gen_cfg.do_sample:
                kwargs.update(temperature=gen_cfg.temperature, top_k=gen_cfg.top_k, top_p=gen_cfg.top_p)
            seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            for row in seqs[:, input_ids.shape[1]:].tolist():  # (B, new)
                out.append(row[: row.index(eos)] if eos in row else row)
            if task is not None:
                progress.advance(task, len(chunk))
    if task is not None:
        progress.remove_task(task)
    model.train(was_training)
    return out


def generation_metrics(model, tokenizer, prompts: list[str], references: list[str], cfg, progress=None
                       ) -> tuple[dict, list[dict]]:
    """Generate for `prompts` with `cfg.eval.generation`: ROUGE-1/2/L against `references`, mean
    response length and, when every prompt is synthetic, the gold score; plus the samples."""
    from ..data.tokenize import encode_prompt
    from .metrics import gold_scores, mean_and_stderr, rouge

    if not prompts:
        return {}, []
    ev = cfg.eval
    ids = [encode_prompt(tokenizer, p, cfg.data.max_prompt_length)[0] for p in prompts]
    outs = generate(model, tokenizer, ids, ev.generation, ev.batch_size, ev.seed, progress)
    texts = tokenizer.batch_decode(outs, skip_special_tokens=True)
    metrics = {f"eval/{k}": v for k, v in rouge(texts, references).items()}
    metrics["eval/response_length"] = sum(len(o) for o in outs) / len(outs)
    gold = gold_scores(prompts, texts)
    if gold is not None:
        metrics["eval/gold"], metrics["eval/gold_stderr"] = mean_and_stderr(gold)
    samples = [{"prompt": p, "reference": r, "completion": t, **({"gold": g} if gold is not None else {})}
               for p, r, t, g in zip(prompts, references, texts, gold or [None] * len(texts))]
    return metrics, samples
