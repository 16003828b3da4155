"""Tokenization and collation. Notation: B = batch, T = padded sequence length.

Truncation keeps a prompt's separator: a long TL;DR post loses words from the end of the post,
never the trailing "TL;DR:" (trlx truncates the post, not the separator); a long dialogue loses
its oldest turns and keeps the final "\n\nAssistant:", and a chat prompt its template's generation
prompt (and its BOS).

BOS as the tokenizer defines it: a tokenizer that starts every sequence with BOS (Llama's) gets it once at
the start of each prompt or text, and a text a chat template rendered with BOS already in it gets no second.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .formats import join_text

IGNORE_INDEX = -100  # label of a token that carries no loss (prompt, padding)
SEPARATORS = ("TL;DR:", "\n\nAssistant:")  # kept on truncation


@lru_cache(maxsize=16)
def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos] \
        and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def leading_bos(tokenizer, text: str) -> list[int]:
    """[BOS] where the tokenizer starts sequences with it and `text` does not hold it already."""
    if not _adds_bos(tokenizer) or (tokenizer.bos_token and text.startswith(tokenizer.bos_token)):
        return []
    return [tokenizer.bos_token_id]


@lru_cache(maxsize=16)
def _generation_suffix(template: str, specials: tuple) -> str:
    from .chat import Renderer

    try:
        return Renderer(template, dict(specials), "the tokenizer").generation_suffix()
    except Exception:  # a template that cannot render a bare user turn: no separator to keep
        return ""


def separators(tokenizer) -> tuple[str, ...]:
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return SEPARATORS
    specials = tuple(sorted((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)))
    suffix = _generation_suffix(template, specials)
    return SEPARATORS + ((suffix,) if suffix.strip() else ())


def encode_prompt(tokenizer, prompt: str, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of `prompt`, at most `max_tokens`, keeping its separator (and BOS); and whether it was cut."""
    head = leading_bos(tokenizer, prompt)
    if tokenizer.bos_token and tokenizer.bos_token_id is not None and prompt.startswith(tokenizer.bos_token):
        head, prompt = [tokenizer.bos_token_id], prompt[len(tokenizer.bos_token):]  # a chat template's BOS
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    room = max(0, max_tokens - len(head))
    if len(ids) <= room:
        return head + ids, False
    text = prompt.rstrip()
    sep = next((s for s in separators(tokenizer) if text.endswith(s.rstrip())), None)
    if sep is None:
        return head + ids[:room], True
    cut = text.rfind(sep.rstrip())
    body, suffix = prompt[:cut], prompt[cut:]
    body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    rest = max(0, room - len(suffix_ids))
    # Dialogues and chats keep their latest turns; posts keep their beginning.
    body_ids = body_ids[len(body_ids) - rest:] if sep != "TL;DR:" else body_ids[:rest]
    return head + (body_ids + suffix_ids)[-room:], True


def _ends_with_eos(tokenizer, text: str) -> bool:
    return bool(tokenizer.eos_token) and text.rstrip().endswith(tokenizer.eos_token)


def sft_features(tokenizer, prompt: str, completion: str, max_length: int, max_prompt_length: int) -> dict:
    """input_ids and labels of one example: the loss covers the completion and its EOS only (a completion
    a chat template ended with EOS gets no second).

    With an empty prompt (whole-text data) the loss covers every token (but a BOS).
    """
    prompt_ids, truncated = encode_prompt(tokenizer, prompt, max_prompt_length) if prompt else (
        leading_bos(tokenizer, completion), False)
    eos = [] if _ends_with_eos(tokenizer, completion) else [tokenizer.eos_token_id]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
    completion_ids = completion_ids[: max_length - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        "prompt_truncated": truncated,
    }


def chat_features(tokenizer, segments: list[tuple[str, bool]], max_length: int) -> dict:
    """input_ids and labels of a rendered conversation: the loss covers every assistant turn (the text the
    template gives it, end-of-turn token included) and nothing else; cut at `max_length`."""
    ids = leading_bos(tokenizer, segments[0][0]) if segments else []
    labels = [IGNORE_INDEX] * len(ids)
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "prompt_truncated": len(ids) > max_length}


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
        head = leading_bos(tokenizer, completion)
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        room = max_length - len(head)
        return head + (ids[-room:] if completion.lstrip().startswith("Human:") else ids[:room]), 0
    completion = join_text(prompt, completion)[len(prompt):]
    prompt_ids, _ = encode_prompt(tokenizer, prompt, max_prompt_length)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return (prompt_ids + completion_ids)[:max_length], min(len(prompt_ids), max_length)


def collate_pairs(chosen: list[list[int]], rejected: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen then rejected rows in one right-padded batch (one forward pass scores both): (2B, T)."""
    ids = chosen + rejected
    return {"input_ids": pad_right(ids, pad_id), "attention_mask": pad_right([[1] * len(s) for s in ids], 0)}
