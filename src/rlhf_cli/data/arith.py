"""synthetic:arith — seeded two-step arithmetic word problems with a checkable answer: the verifiable
task that critic-free RL (rlhf grpo) with a rule-based reward is for.

    Question: Mia has 7 marbles. Then she finds 5 more. After that she loses 3. How many marbles does
    Mia have now?
    Answer: 7 + 5 = 12. 12 - 3 = 9. <answer>9</answer>

The SFT references are a mediocre student's work, right only part of the time: some slip by one in
a step (and carry the slip on), some guess without working, some leave the answer outside the tags.
An SFT model imitates them, mistakes included; the gold score is the truth, 1.0 for the right
number in <answer> tags and 0.0 otherwise, so its mean is the accuracy.
"""

from __future__ import annotations

import random
import re

from ..answers import extract_answer, same_answer

NAMES = [("Mia", "she"), ("Tom", "he"), ("Ava", "she"), ("Leo", "he"), ("Zoe", "she"), ("Sam", "he"),
         ("Ivy", "she"), ("Max", "he"), ("Lily", "she"), ("Ben", "he"), ("Emma", "she"), ("Jack", "he")]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "cookies", "pencils", "cards", "shells", "stamps"]
ADD = ["buys", "finds", "gets", "wins"]  # "{verb} {n} more"
SUB = ["gives away", "loses", "sells", "drops"]  # "{verb} {n}"
LINKS = ["Then", "After that"]

# (style, probability): the mediocre student. Right about half the time.
STYLES = [("right", 0.50), ("slip", 0.25), ("guess", 0.15), ("untagged", 0.10)]

_QUESTION = re.compile(r"(\w+) has (\d+) (\w+)\. Then \w+ (.+?) (\d+)(?: more)?\. After that \w+ (.+?) (\d+)"
                       r"(?: more)?\. How many")


def solve(prompt: str) -> int | None:
    """The true answer of an arith prompt, read from its text; None if the prompt is not one."""
    m = _QUESTION.search(prompt)
    if m is None:
        return None
    total = int(m.group(2))
    for verb, n in ((m.group(4), int(m.group(5))), (m.group(6), int(m.group(7)))):
        total += n if verb in ADD else -n
    return total


def gold_score(prompt: str, completion: str) -> float:
    """1.0 when the completion's <answer> (or \\boxed{}) holds the true number, else 0.0."""
    truth = solve(prompt)
    if truth is None:
        raise ValueError("not an arith prompt")
    return float(same_answer(extract_answer(completion.split("\n", 1)[0]), str(truth)))


def _problem(rng: random.Random) -> tuple[str, list[tuple[str, int]], int]:
    (name, pron), item = rng.choice(NAMES), rng.choice(ITEMS)
    start = total = rng.randint(2, 9)
    steps, phrases = [], []
    for link in LINKS:
        n = rng.randint(1, 9)
        if total >= n and rng.random() < 0.5:
            steps.append(("-", n))
            total -= n
            phrases.append(f"{link} {pron} {rng.choice(SUB)} {n}.")
        else:
            steps.append(("+", n))
            total += n
            phrases.append(f"{link} {pron} {rng.choice(ADD)} {n} more.")
    prompt = (f"Question: {name} has {start} {item}. {' '.join(phrases)} How many {item} does {name} have now?"
              "\nAnswer:")
    return prompt, [("+", start), *steps], total


def _work(steps: list[tuple[str, int]], slip_at: int | None, rng: random.Random) -> tuple[str, int]:
    """' a + b = c. c - d = e.' with an off-by-one at step `slip_at` carried on; and its final number."""
    total, parts = steps[0][1], []
    for k, (op, n) in enumerate(steps[1:]):
        result = total + n if op == "+" else total - n
        if k == slip_at:
            result += rng.choice([-1, 1]) if result > 0 else 1
        parts.append(f"{total} {op} {n} = {result}.")
        total = result
    return " " + " ".join(parts), total


def reference(rng: random.Random, steps, truth: int) -> tuple[str, str]:
    """(style, completion) of the mediocre student."""
    x, acc = rng.random(), 0.0
    style = STYLES[-1][0]
    for name, p in STYLES:
        acc += p
        if x < acc:
            style = name
            break
    if style == "guess":
        return style, f" <answer>{max(0, truth + rng.choice([-2, -1, 1, 2, 3]))}</answer>"
    work, answer = _work(steps, rng.randrange(2) if style == "slip" else None, rng)
    if style == "untagged":
        return style, f"{work} So the answer is {answer}."
    return style, f"{work} <answer>{answer}</answer>"


def best_completion(prompt: str) -> str:
    m = _QUESTION.search(prompt)
    if m is None:
        raise ValueError("not an arith prompt")
    steps = [("+", int(m.group(2)))] + [("+" if v in ADD else "-", int(n))
                                        for v, n in ((m.group(4), m.group(5)), (m.group(6), m.group(7)))]
    return _work(steps, None, random.Random(0))[0] + f" <answer>{solve(prompt)}</answer>"


def generate(n: int, seed: int) -> list[dict]:
    """`n` deterministic problems: {"prompt", "completion", "answer", "style", "gold"}. `completion` is the
    student's reference (what SFT imitates); `answer` is the truth (what a rule-based reward checks)."""
    rng = random.Random(f"arith-{seed}")
    rows = []
    for _ in range(n):
        prompt, steps, truth = _problem(rng)
        style, completion = reference(rng, steps, truth)
        rows.append(dict(prompt=prompt, completion=completion, answer=str(truth), style=style,
                         gold=gold_score(prompt, completion)))
    return rows
