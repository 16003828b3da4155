"""Sentiment rewards for the movie-review workflow (trlx's `ppo_sentiments.py`).

    lexicon_sentiment    offline, no model: tanh(0.5 * (positive words - negative words)) in (-1, 1),
                         a negation ("not", "never", ...) flips the next sentiment word
    ClassifierReward     a transformers sentiment-analysis pipeline; reward = P(positive label)

Use as `--reward-fn rlhf_cli.rewards.sentiment:lexicon_sentiment` or `reward.classifier: <model>`.
"""

from __future__ import annotations

import math
import re

from ..errors import UserError
from ..models import load_pretrained

POSITIVE = frozenset("""
good great wonderful brilliant funny beautiful moving charming excellent delightful fun best love loved lovely
amazing superb fantastic enjoyable perfect masterpiece touching clever smart fresh gorgeous stunning powerful
inspired inspiring entertaining engaging memorable solid fine nice pleasant warm heartfelt witty gripping
compelling remarkable terrific outstanding rich sweet happy joy wins win treat thoughtful refreshing strong
""".split())
NEGATIVE = frozenset("""
bad boring awful terrible dull weak stupid painful messy forgettable worst hate hated ugly poor mediocre
tedious lame mess disappointing disappointment annoying pointless silly bland flat slow waste wasted horrible
dreadful clumsy predictable shallow empty tired cheap unfunny worse failure fails fail sad ridiculous
incoherent tiresome lifeless overlong confusing pretentious
""".split())
NEGATIONS = frozenset("not no never hardly nothing isn't wasn't don't doesn't didn't".split())
_WORD = re.compile(r"[a-z']+")


def lexicon_score(text: str) -> float:
    """tanh(0.5 * (#positive - #negative)); a negation within two words before flips a sentiment word."""
    words = _WORD.findall(text.lower())
    total, flip_until = 0, -1
    for i, w in enumerate(words):
        if w in NEGATIONS:
            flip_until = i + 2
            continue
        s = (w in POSITIVE) - (w in NEGATIVE)
        total += -s if i <= flip_until else s
    return math.tanh(0.5 * total)


def lexicon_sentiment(samples=None, prompts=None, outputs=None, **metadata) -> list[float]:
    """trlx reward_fn signature; scores the completions (outputs), not the prompts."""
    return [lexicon_score(o) for o in outputs]


class ClassifierReward:
    """P(`positive_label`) from a `transformers` text-classification pipeline (e.g. lvwerra/distilbert-imdb)."""

    def __init__(self, name: str, positive_label: str = "POSITIVE", device: str | None = None, batch_size: int = 32):
        from transformers import pipeline

        class _Pipeline:  # load_pretrained's loader protocol: local first, one sentence when the hub is unreachable
            @staticmethod
            def from_pretrained(n, local_files_only=False, **kw):
                return pipeline("text-classification", model=n, model_kwargs={"local_files_only": local_files_only}, **kw)

        self.pipe = load_pretrained(_Pipeline, name, "classifier", top_k=None, truncation=True, device=device)
        labels = list(self.pipe.model.config.id2label.values())
        if positive_label not in labels:
            raise UserError(f"classifier {name} has no label '{positive_label}' (labels: {', '.join(labels)}); "
                            "set reward.positive_label")
        self.positive, self.batch_size, self.name = positive_label, batch_size, name

    def score(self, prompts: list[str], completions: list[str], **metadata) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        out = self.pipe(texts, batch_size=self.batch_size)
        return [next(d["score"] for d in row if d["label"] == self.positive) for row in out]
