"""Tokenization and collation. Notation: B = batch, T = padded sequence length.

Truncation keeps a prompt's separator: a long TL;DR post loses words from the end of the post,
never the trailing "TL;DR:" (trlx truncates the post, not the separator); a long dialogue loses
its oldest turns and keeps the final "\\n\\nAssistant:".
"""

from __future__ import annotations

import torch

from .formats import join_text

IGNORE_INDEX = -100  # label of a token that carries no loss (prompt, padding)
SEPARATORS = ("TL;DR:", "\n\nAssistant:")  # kept on truncation


def encode_prompt(tokenizer, prompt: str, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of `prompt`, at most `max_tokens`, keeping its separator; and whether it was cut."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return ids, False
    sep = next((s for s in SEPARATORS if prompt.rstrip().endswith(s)), None)
    if sep is None:
        return ids[:max_tokens], True
    cut = prompt.rstrip().rfind(sep)
    body, suffix = prompt[:cut], prompt[cut:]
    body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    room = max(0, max_tokens - len(suffix_ids))
    # Dialogues keep their latest turns; posts keep their beginning.
    body_ids = body_ids[len(body_ids) - room:] if sep.startswith("\n\nAssistant") else body_ids[:room]
    return (body_ids + suffix_ids)[-max_tokens:], True


def sft_features(tokenizer, prompt: str, completion: str, max_length: int, max_prompt_length: int) -> dict:
    """input_ids and labels of one example: the loss covers the completion and its EOS only.

    With an empty prompt (whole-text data) the loss covers every token.
    """
    prompt_ids, truncated = encode_prompt(tokenizer, prompt, max_prompt_length) if prompt else ([], False)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    completion_ids = completion_ids[: max_length - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        "prompt_truncated": truncated,
    }


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def pad_left(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s for s in seqs], dtype=torch.long)


def collate_sft(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest sequence of the batch (right side): (B, T) tensors."""
    ids = [f["input_ids"] for f in features]
    return {
        "input_ids": pad_right(ids, pad_id),
        "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
        "labels": pad_right([f["labels"] for f in features], IGNORE_INDEX),
    }


def sequence_ids(tokenizer, prompt: str, completion: str, max_length: int, max_prompt_length: int) -> list[int]:
    """Token ids of prompt + completion for scoring: the prompt truncated (separator kept), then
    the completion cut to fit `max_length`. No EOS: the score is read at the last real token."""
    return sequence_parts(tokenizer, prompt, completion, max_length, max_prompt_length)[0]


def sequence_parts(tokenizer, prompt: str, completion: str, max_length: int,
                   max_prompt_length: int) -> tuple[list[int], int]:
    """`sequence_ids` and how many of them are the prompt's."""
    if not prompt:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        return (ids[-max_length:] if completion.lstrip().startswith("Human:") else ids[:max_length]), 0
    completion = join_text(prompt, completion)[len(prompt):]
    prompt_ids, _ = encode_prompt(tokenizer, prompt, max_prompt_length)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return (prompt_ids + completion_ids)[:max_length], min(len(prompt_ids), max_length)


def collate_pairs(chosen: list[list[int]], rejected: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen then rejected rows in one right-padded batch (one forward pass scores both): (2B, T)."""
    ids = chosen + rejected
    return {"input_ids": pad_right(ids, pad_id), "attention_mask": pad_right([[1] * len(s) for s in ids], 0)}
