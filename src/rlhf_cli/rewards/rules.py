"""Rule-based rewards for verifiable tasks, in the reward-function signature every source here takes
(`fn(samples, prompts, outputs, **columns) -> list[float]`; the dataset's other columns arrive by name,
as TRL passes them to its reward functions). Use them by name:

    reward: {fn: rlhf_cli.rewards.rules:exact_match}
    reward:
      sources:
        - {fn: rlhf_cli.rewards.rules:exact_match, weight: 1.0}
        - {fn: rlhf_cli.rewards.rules:answer_format, weight: 0.2}
"""

from __future__ import annotations

import re

from ..answers import extract_answer, same_answer
from ..errors import UserError

_ONE_TAGGED_ANSWER = re.compile(r"^[^<]*<answer>[^<]+</answer>\s*$", re.S)


def _truths(n: int, answer=None, solution=None, references=None) -> list[str]:
    """The true answers: the data's `answer` (or `solution`) column when it has one, else each reference
    completion's final answer (GSM8K's '#### 72', <answer> tags, \\boxed{})."""
    column = answer if answer is not None else solution
    if column is not None:
        out = [extract_answer(str(a)) or str(a) for a in column]
    elif references is not None and all(r is not None for r in references):
        out = [extract_answer(r) for r in references]
        missing = next((i for i, t in enumerate(out) if t is None), None)
        if missing is not None:
            raise UserError(f"exact_match: reference completion {missing} states no final answer "
                            "(<answer>...</answer>, \\boxed{...} or '#### ...'); give the data an 'answer' column")
    else:
        raise UserError("exact_match needs the true answers: an 'answer' (or 'solution') column in the data, "
                        "or reference completions that state one")
    if len(out) != n:
        raise UserError(f"exact_match got {len(out)} answers for {n} completions")
    return out


def exact_match(samples=None, prompts=None, outputs=None, answer=None, solution=None, references=None,
                tolerance: float = 1e-6, **columns) -> list[float]:
    """1.0 when the completion's final answer (<answer> tags, else \\boxed{}, else '####') equals the true
    answer (numbers within `tolerance`, relative), else 0.0. A completion that states no answer gets 0."""
    truths = _truths(len(outputs), answer, solution, references)
    return [float(same_answer(extract_answer(o), t, tolerance)) for o, t in zip(outputs, truths)]


def answer_format(samples=None, prompts=None, outputs=None, **columns) -> list[float]:
    """1.0 when the completion ends with exactly one <answer>...</answer> (working before it, nothing after),
    else 0.0: TRL's format reward for the <answer> convention."""
    return [float(bool(_ONE_TAGGED_ANSWER.match(o))) for o in outputs]
