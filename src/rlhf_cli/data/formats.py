"""Formatters: rows of a known schema -> (prompt, completion) examples or preference pairs.

Schemas (after `data.columns` renaming):
    tldr         {prompt: "...TL;DR:", label: " summary"}           CarperAI/openai_summarize_tldr
    comparisons  {prompt, chosen, rejected}                          CarperAI/openai_summarize_comparisons
    hh           {chosen: "\\n\\nHuman: ..\\n\\nAssistant: ..", rejected}   Anthropic/hh-rlhf
    text         {text}                                              trained whole
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

ASSISTANT = "\n\nAssistant:"
REQUIRED = {
    "tldr": ("prompt", "label"),
    "comparisons": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "text": ("text",),
}


@dataclass
class SFTExample:
    prompt: str  # "" for whole-text examples: the loss then covers every token
    completion: str
    meta: dict


def rename_columns(rows: list[dict], columns: dict[str, str]) -> list[dict]:
    """Apply `data.columns` ({schema_name: column_in_file}) to every row."""
    if not columns:
        return rows
    inverse = {v: k for k, v in columns.items()}
    return [{inverse.get(k, k): v for k, v in row.items()} for row in rows]


def detect_format(columns: set[str]) -> str | None:
    for fmt in ("comparisons", "tldr", "hh", "text"):
        if set(REQUIRED[fmt]) <= columns:
            return fmt
    return None


def resolve_format(rows: list[dict], fmt: str, source: str) -> str:
    if not rows:
        raise UserError(f"dataset '{source}' has no rows")
    cols = set(rows[0])
    if fmt == "auto":
        found = detect_format(cols)
        if found is None:
            raise UserError(
                f"cannot tell the format of '{source}' from its columns ({', '.join(sorted(cols))}); "
                "set data.format and map columns with data.columns"
            )
        return found
    missing = [c for c in REQUIRED[fmt] if c not in cols]
    if missing:
        raise UserError(
            f"dataset '{source}' has no column '{missing[0]}' needed by format '{fmt}' "
            f"(columns: {', '.join(sorted(cols))}); map one with --set data.columns.{missing[0]}=NAME"
        )
    return fmt


def split_hh(dialogue: str) -> tuple[str, str]:
    """HH: prompt = text up to and including the last '\\n\\nAssistant:', completion = the rest."""
    i = dialogue.rfind(ASSISTANT)
    if i < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    return dialogue[: i + len(ASSISTANT)], dialogue[i + len(ASSISTANT):]


def sft_examples(rows: list[dict], fmt: str) -> tuple[list[SFTExample], int]:
    """SFT examples of `rows` in format `fmt`, and how many rows were dropped (empty / malformed)."""
    out, dropped = [], 0
    for row in rows:
        meta = {k: v for k, v in row.items() if k not in REQUIRED[fmt]}
        try:
            if fmt == "tldr":
                prompt, completion = row["prompt"], row["label"]
            elif fmt == "comparisons":
                prompt, completion = row["prompt"], row["chosen"]
            elif fmt == "hh":
                prompt, completion = split_hh(row["chosen"])
            else:
                prompt, completion = "", row["text"]
        except (ValueError, TypeError, AttributeError):
            dropped += 1
            continue
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            dropped += 1
            continue
        out.append(SFTExample(prompt, completion, meta))
    return out, dropped
