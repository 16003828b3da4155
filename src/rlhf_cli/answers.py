"""Reading a final answer out of a model's text, and comparing two answers: shared by the verifiable
synthetic task's gold scorer (data/arith.py) and the rule-based rewards (rewards/rules.py).

    extract_answer("7 + 5 = 12. <answer>12</answer>")   # -> "12"
    extract_answer("... so the total is \\boxed{3/4}")    # -> "3/4"
    extract_answer("... 48 + 24 = 72\\n#### 72")          # -> "72" (GSM8K's reference solutions)
    same_answer("1,000", "1000.0")                       # -> True
"""

from __future__ import annotations

import math
import re

_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_GSM8K = re.compile(r"####\s*([^\n<]+)")  # "<": a rendered reply's end-of-turn token
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced (\\boxed{\\frac{1}{2}} -> \\frac{1}{2})."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    return None  # unclosed: the completion was cut before its answer ended


def extract_answer(text: str) -> str | None:
    """The final answer of `text`: the last <answer>...</answer>, else the last \\boxed{...}, else what
    follows GSM8K's '####'; None when the text states no answer that way (no guessing from stray numbers)."""
    found = _TAG.findall(text)
    if found:
        return found[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = _GSM8K.findall(text)
    return m[-1].strip() if m else None


def to_number(answer: str) -> float | None:
    """'1,234', '$12', '12.50', '-3', '7.' as numbers; None for anything else."""
    s = answer.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    if s.endswith("%"):
        s = s[:-1]
    return float(s) if _NUMBER.match(s) else None


def same_answer(answer: str | None, truth: str, tolerance: float = 1e-6) -> bool:
    """Numbers equal within `tolerance` (relative to the truth's size, at least absolute), else the
    same text ignoring case and surrounding spaces."""
    if answer is None:
        return False
    a, t = to_number(answer), to_number(truth)
    if a is not None and t is not None:
        return math.isfinite(a) and abs(a - t) <= tolerance * max(1.0, abs(t))
    return answer.strip().lower() == truth.strip().lower()
