"""Summed response log-probs of preference pairs (DPO): the policy's in one forward pass per
micro-batch (the shared prompt once), and the reference's, from a frozen copy or computed once and
cached on disk (`precompute_ref_logps`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import checkpoint as ck
from .. import shared_prompt
from ..data.sources import PairData
from ..data.tokenize import collate_sft
from ..losses.dpo import sequence_logps


def _prompt_len(f: dict) -> int:
    return next((i for i, x in enumerate(f["labels"]) if x != -100), len(f["labels"]))


def batch_logps(model, tok, chunk: list[dict], device,
                share: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) summed logps and (B,) token counts of chosen and of rejected: the shared prompt once, then
    both completions on its keys/values (`share`), else one pass over chosen + rejected concatenated."""
    if share and shared_prompt.usable(model):
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


def _read_cache(path: Path) -> dict | None:
    """A cache file's tensors; a missing, truncated or unreadable file is a miss (it is computed again)."""
    try:
        return load_file(str(path)) if path.exists() else None
    except Exception:
        return None


def cached_reference(cfg, data, tok, policy, feats, feats_eval, device, console, progress, batcher):
    """Reference log-probs of train and held-out pairs, from the cache or computed once and stored.

    The training pairs are scored in the run's first-epoch micro-batches (see reference_logps).
    """

    batches = [batcher.indices(p) for p in range(batcher.batches_per_epoch)]
    batching = json.dumps([cfg.seed, cfg.train.batch_size, batcher.world_size, batcher.rank, cfg.train.group_by_length,
                           cfg.share_prompt])
    root = Path(cfg.ref_cache_dir or Path.home() / ".cache" / "rlhf_cli" / "ref_logps").expanduser()
    path = root / f"{cache_key(cfg, data, tok, cfg.policy_source, batching)}.safetensors"
    t = _read_cache(path)
    if t is not None and {"train", "eval"} <= t.keys() and (len(t["train"]), len(t["eval"])) == (len(feats), len(feats_eval)):
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
