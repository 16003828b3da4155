"""Formatters: rows of a known schema -> (prompt, completion) examples or preference pairs.

Schemas (after `data.columns` renaming):
    tldr         {prompt: "...TL;DR:", label: " summary"}           CarperAI/openai_summarize_tldr
    comparisons  {prompt, chosen, rejected}                          CarperAI/openai_summarize_comparisons
    hh           {chosen: "\\n\\nHuman: ..\\n\\nAssistant: ..", rejected}   Anthropic/hh-rlhf
    text         {text}                                              trained whole
    rewarded     {prompt, completion, reward}                        offline RL (ILQL)
    completion   {prompt, completion}                                TRL's prompt-completion (standard)
    prompt       {prompt}                                            prompts only (online RL)
    messages     {messages: [{role, content}, ...]}                  TRL's conversational language modeling
TRL's conversational rows (a list of {role, content} where the schema has text) are rendered by a chat
template into the standard rows above before they get here: see `chat.py`.
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
    "rewarded": ("prompt", "completion", "reward"),
    "completion": ("prompt", "completion"),
    "prompt": ("prompt",),
    "messages": ("messages",),
}


@dataclass
class SFTExample:
    prompt: str  # "" for whole-text examples: the loss then covers every token
    completion: str
    meta: dict
    segments: list | None = None  # a rendered conversation: [(text, trained)], every assistant turn trained

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments) if self.segments else self.prompt + self.completion


@dataclass
class PairExample:
    prompt: str
    chosen: str  # completions only; the scored text is join_text(prompt, completion)
    rejected: str
    meta: dict


def join_text(prompt: str, completion: str) -> str:
    """prompt + completion, with a newline where neither side has whitespace at the seam
    (CarperAI/openai_summarize_comparisons: the post, then "TL;DR: ..." on its own line); never after a
    separator or a chat template's tag (`[/INST]`, `<|assistant|>`), whose reply follows it directly."""
    if prompt and completion and not prompt[-1].isspace() and not completion[0].isspace() \
            and not prompt.endswith((":", ">", "]")):
        return prompt + "\n" + completion
    return prompt + completion


def pair_examples(rows: list[dict], fmt: str) -> tuple[list[PairExample], int, int]:
    """Preference pairs of `rows`; and how many were dropped as malformed, and as chosen == rejected."""
    out, malformed, equal = [], 0, 0
    for row in rows:
        meta = {k: v for k, v in row.items() if k not in REQUIRED[fmt]}
        try:
            if fmt == "comparisons":
                prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            elif fmt == "hh" and not (ASSISTANT in row["chosen"] and ASSISTANT in row["rejected"]):
                prompt, chosen, rejected = split_common(row["chosen"], row["rejected"])  # TRL's implicit prompt
            elif fmt == "hh":
                prompt, chosen = split_hh(row["chosen"])
                rejected_prompt, rejected = split_hh(row["rejected"])
                if rejected_prompt != prompt:  # dialogues that part before the last turn: score them whole
                    prompt, chosen, rejected = "", row["chosen"], row["rejected"]
            else:
                raise ValueError(fmt)
        except (ValueError, TypeError, AttributeError, KeyError):
            malformed += 1
            continue
        if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
            malformed += 1
            continue
        # An empty reply is kept: in HH, silence is sometimes the preferred answer to a harmful request.
        if chosen.strip() == rejected.strip():
            equal += 1
            continue
        out.append(PairExample(prompt, chosen, rejected, meta))
    return out, malformed, equal


def why_malformed(row: dict, fmt: str) -> str | None:
    """What is wrong with a preference row that `pair_examples` drops as malformed, in words; None if nothing."""
    for col in REQUIRED[fmt]:
        value = row.get(col)
        if value is None:
            return f"'{col}' is missing"
        if not isinstance(value, str):
            return f"'{col}' is a {type(value).__name__}, not text"
    return None


def rename_columns(rows: list[dict], columns: dict[str, str]) -> list[dict]:
    """Apply `data.columns` ({schema_name: column_in_file}) to every row."""
    if not columns:
        return rows
    inverse = {v: k for k, v in columns.items()}
    return [{inverse.get(k, k): v for k, v in row.items()} for row in rows]


def detect_format(columns: set[str]) -> str | None:
    for fmt in ("messages", "comparisons", "rewarded", "tldr", "completion", "hh", "text", "prompt"):
        if set(REQUIRED[fmt]) <= columns:
            return fmt
    return None


def resolve_format(rows: list[dict], fmt: str, source: str) -> str:
    if not rows:
        raise UserError(f"dataset '{source}' has no rows")
    cols = set(rows[0])
    if fmt == "auto":
        fmt = detect_format(cols)
        if fmt is None:
            raise UserError(
                f"cannot tell the format of '{source}' from its columns ({', '.join(sorted(cols))}); "
                "set data.format and map columns with data.columns"
            )
    missing = [c for c in REQUIRED[fmt] if c not in cols]
    if missing:
        raise UserError(
            f"dataset '{source}' has no column '{missing[0]}' needed by format '{fmt}' "
            f"(columns: {', '.join(sorted(cols))}); map one with --set data.columns.{missing[0]}=NAME"
        )
    check_one_format(rows, fmt, source, "training")
    return fmt


def check_one_format(rows: list[dict], fmt: str, source: str, split: str, first: dict | None = None) -> None:
    """Every row in the one format of the file: a row that lacks the format's columns but has another
    format's, or is conversational where the first training row is not (or the other way), is refused by number."""
    def conversational(row):
        return [isinstance(row.get(c), list) for c in REQUIRED[fmt]]

    if not rows:
        return
    reference = conversational(first or rows[0])
    for i, row in enumerate(rows):
        present = {k for k, v in row.items() if v is not None}
        other = detect_format(present)
        if not set(REQUIRED[fmt]) <= present and other not in (None, fmt):
            raise UserError(f"{split} row {i} of '{source}' is in {other} format ({', '.join(REQUIRED[other])}) but "
                            f"the file's first rows are in {fmt} format; one file holds one format")
        if conversational(row) != reference and all(isinstance(row.get(c), (str, list)) for c in REQUIRED[fmt]):
            kinds = ("a conversation" if x else "text" for x in (not reference[0], reference[0]))
            raise UserError(f"{split} row {i} of '{source}' holds {next(kinds)} where training row 0 holds "
                            f"{next(kinds)}; one file holds one format (all rows conversational, or none)")


def split_common(chosen: str, rejected: str) -> tuple[str, str, str]:
    """An implicit prompt: the words chosen and rejected begin with alike (TRL cuts at the first differing
    character, which can split a word: "The sky is bl" + "ue"); the replies keep their leading space."""
    import os

    same = os.path.commonprefix([chosen, rejected])
    if len(same) < min(len(chosen), len(rejected)):
        same = same[: max(same.rfind(" "), same.rfind("\n"), 0)]  # back to the last word boundary
    return same, chosen[len(same):], rejected[len(same):]


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
        meta = {k: v for k, v in row.items() if k not in REQUIRED[fmt] and k != "_segments"}
        try:
            if fmt == "tldr":
                prompt, completion = row["prompt"], row["label"]
            elif fmt == "comparisons":
                prompt, completion = row["prompt"], row["chosen"]
            elif fmt == "hh":
                prompt, completion = split_hh(row["chosen"])
            elif fmt in ("rewarded", "completion"):
                prompt, completion = row["prompt"], row["completion"]
            elif fmt == "prompt":  # no completion: online RL samples its own
                prompt, completion = row["prompt"], ""
            else:
                prompt, completion = "", row["text"]
        except (ValueError, TypeError, AttributeError):
            dropped += 1
            continue
        if not isinstance(prompt, str) or not isinstance(completion, str) or not (completion.strip() or fmt == "prompt"):
            dropped += 1
            continue
        out.append(SFTExample(prompt, completion, meta, row.get("_segments")))
    return out, dropped
