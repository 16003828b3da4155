"""Batched generation with the KV cache, left padding, and a fixed sampling seed."""

from __future__ import annotations

import torch

from ..data.tokenize import pad_left


def cut_at_stop(tokenizer, ids: list[int], stop_sequences: list[str]) -> tuple[list[int], bool]:
    """The tokens of `ids` before the first stop string, and whether one was found.

    Cuts on a token boundary: the kept tokens decode to text that ends before the stop string (a
    token straddling its start is dropped, and so is trailing whitespace), so the tokens that are
    trained on are exactly the ones that were sampled, never a re-tokenization of edited text.
    """
    if not stop_sequences or not ids:
        return ids, False
    text = tokenizer.decode(ids)
    starts = [i for i in (text.find(s) for s in stop_sequences if s) if i >= 0]
    if not starts:
        return ids, False
    stop = min(starts)
    keep = 0
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k])) > stop:
            break
        keep = k
    while keep and not tokenizer.decode(ids[keep - 1: keep]).strip():
        keep -= 1
    return ids[:keep], True


@torch.no_grad()  # not inference_mode: ZeRO-3 keeps gathered weights, which must stay usable by autograd
def generate(model, tokenizer, prompt_ids: list[list[int]], gen_cfg, batch_size: int, seed: int | None,
             progress=None, stop_sequences: list[str] = (), keep_eos: bool = False,
             synced_gpus: bool = False) -> list[list[int]]:
    """Completion token ids for each prompt (sampling with the KV cache, left padding).

    A completion ends at EOS or at the first stop string. With `keep_eos` the ending is kept as an
    EOS token (PPO trains on it: the policy learns when to stop); without, EOS and all after are cut.
    `seed`: the sampling noise comes from this seed inside a forked RNG, so evaluating mid-training
    neither depends on nor disturbs the training RNG; None draws from the global RNG (rollouts).
    `synced_gpus`: under ZeRO-3 every process keeps stepping until all are done (each step gathers weights).
    """
    import contextlib

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[int]] = []
    task = progress.add_task("generating", total=len(prompt_ids), info="") if progress is not None else None
    rng = (torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
           if seed is not None else contextlib.nullcontext())
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        for i in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[i: i + batch_size]
            input_ids = pad_left(chunk, pad).to(device)  # (B, P)
            attention_mask = pad_left([[1] * len(c) for c in chunk], 0).to(device)
            kwargs = dict(max_new_tokens=gen_cfg.max_new_tokens, do_sample=gen_cfg.do_sample,
                          pad_token_id=pad, eos_token_id=eos, **({"synced_gpus": True} if synced_gpus else {}))
            if gen_cfg.do_sample:
                kwargs.update(temperature=gen_cfg.temperature, top_k=gen_cfg.top_k, top_p=gen_cfg.top_p)
            seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            for row in seqs[:, input_ids.shape[1]:].tolist():  # (B, new)
                ended = eos in row
                row = row[: row.index(eos)] if ended else row
                row, stopped = cut_at_stop(tokenizer, row, stop_sequences)
                out.append(row + [eos] if keep_eos and (ended or stopped) else row)
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
