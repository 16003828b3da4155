"""Synthetic tasks with a known "human": seeded data generators and their gold preference scorer.

A post (or a dialogue) is built from templates. Exactly one sentence carries the key facts
(who, what happened, to what); the others are filler. The gold
scorer plays the human of RLHF: it rewards covering the key facts and penalises facts that are
not in the prompt (hallucination), length beyond a target, and repetition.

Headroom, on purpose: the reference completions that SFT imitates are written by "mediocre
humans" drawn from a spread of styles (some ramble, some miss a fact, some name the wrong
person), so their mean gold score is about half of the best achievable (1.0). Imitation alone
cannot reach the top; preference-based stages can.

    from rlhf_cli.data.synthetic import gold_score, generate
    gold_score(prompt, " my roommate broke my laptop.")   # -> 1.0 when those are the facts
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from . import arith

BEST_SCORE = 1.0
TARGET_WORDS = 12  # summaries longer than this lose LENGTH_PENALTY per extra word
LENGTH_PENALTY = 0.05
HALLUCINATION_PENALTY = 0.5  # per lexicon word absent from the prompt
REPEAT_PENALTY = 0.25  # per repeated word bigram
RUDE_PENALTY = 0.5  # hh only, per rude word

WHO = ["roommate", "boss", "sister", "brother", "girlfriend", "boyfriend", "neighbor", "coworker",
       "landlord", "friend", "mom", "dad", "cousin", "teacher", "uncle", "aunt"]
ACTIONS = ["broke", "borrowed", "lost", "sold", "stole", "crashed", "hid", "ruined", "painted",
           "returned", "dropped", "burned", "scratched", "moved", "kept", "cleaned"]
OBJECTS = ["laptop", "car", "bike", "phone", "guitar", "couch", "tv", "camera", "wallet", "keys",
           "jacket", "watch", "desk", "lamp", "bag", "headphones"]
SUBREDDITS = ["relationships", "relationship_advice", "AskReddit", "offmychest", "legaladvice",
              "roommates", "personalfinance", "tifu"]

KEY_SENTENCES = [
    "Yesterday my {who} {action} my {obj}.",
    "Last week my {who} {action} my {obj} without asking me.",
    "A few days ago my {who} {action} my {obj} and did not say sorry.",
    "So this morning my {who} {action} my {obj}.",
    "Long story short, my {who} {action} my {obj} at a party.",
]
FILLERS_PER_POST = (0, 3)  # posts of varied length; short ones are where copying the facts is learned first
FILLERS = [
    "We have known each other for {n} years.",
    "I am {age} and they are {age2}.",
    "I do not really know how to bring it up.",
    "Everyone says I am overreacting.",
    "It is not the first time something like this happened.",
    "I tried to talk about it but it went nowhere.",
    "A friend of mine thinks I should just let it go.",
    "I have been stressed about work lately too.",
    "We used to get along really well.",
    "Honestly I am just tired of all of it.",
    "Somebody else was there when it happened.",
    "I do not want to ruin the friendship over this.",
]
TITLES = [
    "Not sure how to handle this with my {who}",
    "[{age}F] need advice about my {who} [{age2}M]",
    "Am I wrong to be upset?",
    "What do I even say to my {who}?",
    "Need some perspective on this",
]

# (style, probability, template). The mix is the "mediocre human": mean gold about 0.5 of BEST.
TLDR_STYLES = [
    ("good", 0.15, " my {who} {action} my {obj}."),
    ("ramble", 0.35, " my {who} {action} my {obj} and i have been thinking about it for days, no idea"
                     " what to say."),
    ("repeat", 0.15, " my {who} {action} my {obj}. yes, my {who} {action} my {obj}."),
    ("vague_object", 0.15, " my {who} {action} my stuff and i do not know what to do."),
    ("wrong_person", 0.10, " my {wrong} {action} my {obj}."),
    ("vague", 0.10, " drama with someone close to me, need advice."),
]
BEST_TLDR = " my {who} {action} my {obj}."

# --- hh: a one-topic dialogue about a pet --------------------------------------------------------
PETS = ["dog", "cat", "rabbit", "parrot", "hamster", "horse", "turtle", "goldfish", "puppy", "kitten",
        "lizard", "ferret"]
SYMPTOMS = ["sneezing", "limping", "scratching", "coughing", "shaking", "hiding", "vomiting", "drooling",
            "wheezing", "panting", "biting", "whining"]
RUDE = ["stupid", "idiot", "dumb", "whatever", "shut"]
HH_KEY = [
    "my {pet} keeps {symptom}.",
    "my {pet} has been {symptom} since yesterday.",
    "for two days my {pet} has been {symptom}.",
]
HH_FILLERS = ["i am a bit worried.", "it is an old animal.", "my {other} says it is nothing.",
                 "we just moved to a new house.", "it still eats normally."]
HH_OPENERS = ["\n\nHuman: hi there\n\nAssistant: hello, how can i help you today?",
              "\n\nHuman: can i ask you something about animals?\n\nAssistant: of course, go ahead."]
HH_STYLES = [
    ("good", 0.15, " i am sorry your {pet} keeps {symptom}. please take it to a vet."),
    ("ramble", 0.35, " i am sorry your {pet} keeps {symptom}. please take it to a vet, animals can be"
                     " like that and nobody can say without seeing them."),
    ("vague", 0.15, " pets do strange things sometimes, i would not worry."),
    ("wrong_pet", 0.10, " your {wrong} might be {symptom}, take it to a vet."),
    ("rude", 0.10, " that is a stupid question, your {pet} is fine."),
    ("no_advice", 0.15, " oh no, your {pet} keeps {symptom}."),
]
BEST_HH = " your {pet} keeps {symptom}, so please take it to a vet."


@dataclass(frozen=True)
class Facts:
    """The key facts of one prompt, and the lexicon words the prompt mentions anywhere."""

    who: str
    action: str
    obj: str
    mentioned: frozenset[str]


_WORD = re.compile(r"[a-z]+")
_TLDR_KEY = re.compile(rf"\bmy ({'|'.join(WHO)}) ({'|'.join(ACTIONS)}) my ({'|'.join(OBJECTS)})\b")
_HH_KEY = re.compile(rf"\bmy ({'|'.join(PETS)}) (?:keeps|has been) ({'|'.join(SYMPTOMS)})\b")
_TLDR_LEXICON = frozenset(WHO) | frozenset(ACTIONS) | frozenset(OBJECTS)
_HH_LEXICON = frozenset(PETS) | frozenset(SYMPTOMS)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def extract_facts(prompt: str) -> Facts | None:
    """Facts of a synthetic prompt (tldr or hh), or None if the prompt is not synthetic."""
    low = prompt.lower()
    if "\n\nhuman:" in low:
        last_human = low.rsplit("\n\nhuman:", 1)[1]
        m = _HH_KEY.search(last_human)
        if m is None:
            return None
        return Facts(m.group(1), m.group(2), "vet", frozenset(set(_words(low)) & _HH_LEXICON))
    m = _TLDR_KEY.search(low)
    if m is None:
        return None
    return Facts(m.group(1), m.group(2), m.group(3), frozenset(set(_words(low)) & _TLDR_LEXICON))


def _score(facts: Facts, completion: str, lexicon: frozenset[str], dialogue: bool) -> float:
    # A completion ends at the first newline: what follows is not part of the summary / reply.
    words = _words(completion.split("\n\n" if dialogue else "\n", 1)[0])
    present = set(words)
    coverage = sum(f in present for f in (facts.who, facts.action, facts.obj)) / 3
    hallucinated = len((present & lexicon) - facts.mentioned)
    too_long = max(0, len(words) - TARGET_WORDS)
    bigrams = list(zip(words, words[1:]))
    repeats = len(bigrams) - len(set(bigrams))
    penalty = (HALLUCINATION_PENALTY * hallucinated + min(1.0, LENGTH_PENALTY * too_long)
               + min(1.0, REPEAT_PENALTY * repeats))
    if dialogue:
        penalty += RUDE_PENALTY * sum(w in RUDE for w in words)
    return coverage - penalty


def gold_score(prompt: str, completion: str) -> float:
    """The gold preference score of `completion` for a synthetic `prompt`; best is 1.0.

    coverage (fraction of the 3 key facts named) minus 0.5 per hallucinated lexicon word, minus
    0.05 per word beyond 12 (at most 1), minus 0.25 per repeated word bigram (at most 1), and for
    dialogues minus 0.5 per rude word. Raises ValueError for a prompt the generator did not make.
    """
    if arith.solve(prompt) is not None:  # synthetic:arith: 1.0 for the right answer, else 0.0
        return arith.gold_score(prompt, completion)
    facts = extract_facts(prompt)
    if facts is None:
        raise ValueError("not a synthetic prompt: no key-fact sentence found")
    is_hh = "\n\nhuman:" in prompt.lower()
    return _score(facts, completion, _HH_LEXICON if is_hh else _TLDR_LEXICON, dialogue=is_hh)


def gold_reward_fn(samples=None, prompts=None, outputs=None, **metadata) -> list[float]:
    """trlx-style reward function: `fn(samples, prompts, outputs, **metadata) -> list[float]`."""
    return [gold_score(p, o) for p, o in zip(prompts, outputs)]


def is_synthetic_prompt(prompt: str) -> bool:
    return extract_facts(prompt) is not None or arith.solve(prompt) is not None


# --- generators ---------------------------------------------------------------------------------
def _pick_style(rng: random.Random, styles) -> tuple[str, str]:
    x, acc = rng.random(), 0.0
    for name, p, template in styles:
        acc += p
        if x < acc:
            return name, template
    return styles[-1][0], styles[-1][2]


def _tldr_prompt(rng: random.Random) -> tuple[str, dict]:
    who, other, wrong = rng.sample(WHO, 3)
    slots = dict(who=who, action=rng.choice(ACTIONS), obj=rng.choice(OBJECTS), other=other,
                 wrong=wrong, n=rng.randint(2, 15), age=rng.randint(18, 40), age2=rng.randint(18, 40))
    sentences = [s.format(**slots) for s in rng.sample(FILLERS, rng.randint(*FILLERS_PER_POST))]
    sentences.insert(rng.randint(0, len(sentences)), rng.choice(KEY_SENTENCES).format(**slots))
    title = rng.choice(TITLES).format(**slots)
    prompt = f"SUBREDDIT: r/{rng.choice(SUBREDDITS)}\nTITLE: {title}\nPOST: {' '.join(sentences)}\nTL;DR:"
    return prompt, slots


def _hh_prompt(rng: random.Random) -> tuple[str, dict]:
    pet, wrong = rng.sample(PETS, 2)
    slots = dict(pet=pet, wrong=wrong, symptom=rng.choice(SYMPTOMS), other=rng.choice(WHO))
    parts = [s.format(**slots) for s in rng.sample(HH_FILLERS, rng.randint(0, 2))]
    parts.insert(rng.randint(0, len(parts)), rng.choice(HH_KEY).format(**slots))
    opener = rng.choice(HH_OPENERS) if rng.random() < 0.3 else ""
    prompt = f"{opener}\n\nHuman: {' '.join(parts)} what should i do?\n\nAssistant:"
    return prompt, slots


_TASKS = {
    "tldr": (_tldr_prompt, TLDR_STYLES, BEST_TLDR),
    "hh": (_hh_prompt, HH_STYLES, BEST_HH),
}
TASKS = tuple(_TASKS)  # tasks with a gold scorer and preference pairs
SOURCES = (*TASKS, "reviews", "arith")  # every synthetic:NAME data source

# --- reviews: short movie reviews, half positive, half negative (the sentiment-PPO workflow) --------
REVIEW_SUBJECTS = ["this movie", "the film", "this picture", "the story", "the sequel", "this comedy",
                   "the drama", "this thriller", "the remake", "this cartoon"]
REVIEW_OPENERS = ["i watched {subj} last night and it was", "we saw {subj} on friday and it was",
                  "honestly i think {subj} is", "after two hours {subj} felt", "my brother said {subj} was",
                  "to be fair {subj} is", "i went to see {subj} and found it", "in my opinion {subj} is"]
REVIEW_ASPECTS = ["the acting", "the music", "the plot", "the ending", "the cast", "the script",
                  "the camera work", "the dialogue", "the pacing", "the lead actor"]
REVIEW_ADJ = {
    "pos": ["great", "wonderful", "brilliant", "funny", "beautiful", "moving", "charming", "excellent",
            "delightful", "fun", "clever", "gripping"],
    "neg": ["boring", "awful", "terrible", "dull", "bad", "weak", "stupid", "painful", "messy",
            "forgettable", "tedious", "predictable"],
}
REVIEW_SENTENCES = ["{aspect} was {adj}.", "{aspect} felt {adj} and {adj2}.", "i found {aspect} {adj}.",
                    "overall a {adj} night at the movies.", "{aspect} is {adj}, i have to say."]


def _review(rng: random.Random) -> str:
    polarity = rng.choice(["pos", "neg"])
    subj = rng.choice(REVIEW_SUBJECTS)
    parts = [rng.choice(REVIEW_OPENERS).format(subj=subj) + f" {rng.choice(REVIEW_ADJ[polarity])}."]
    for _ in range(rng.randint(1, 3)):
        pol = polarity if rng.random() < 0.85 else ("neg" if polarity == "pos" else "pos")
        adj, adj2 = rng.sample(REVIEW_ADJ[pol], 2)
        parts.append(rng.choice(REVIEW_SENTENCES).format(aspect=rng.choice(REVIEW_ASPECTS), adj=adj, adj2=adj2))
    return " ".join(parts)


def reviews(n: int, seed: int) -> list[dict]:
    """`n` deterministic movie reviews as {"text"} rows; their sentiment is judged by a lexicon scorer."""
    rng = random.Random(f"reviews-{seed}")
    return [{"text": _review(rng)} for _ in range(n)]


_SFT_ONLY = {"arith": arith.generate, "reviews": reviews}  # tasks without preference pairs


def generate(task: str, n: int, seed: int, kind: str = "sft", label_noise: float = 0.1) -> list[dict]:
    """`n` deterministic examples of `task` ("tldr" or "hh") for `seed`.

    kind="sft": {"prompt", "label", "style", "gold"} — the label is a mediocre human's reference.
    kind="pairs": {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "noisy"} — two
    references of different gold score; the gold-preferred one is "chosen" except for a fraction
    `label_noise` of pairs, flipped (humans disagree too), flagged by "noisy".
    """
    if task in _SFT_ONLY:
        if kind != "sft":
            raise ValueError(f"synthetic:{task} has no preference pairs")
        return _SFT_ONLY[task](n, seed)
    if task not in _TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    make_prompt, styles, _ = _TASKS[task]
    rng = random.Random(f"{task}-{kind}-{seed}")  # str seeds are stable across Python runs
    rows: list[dict] = []
    while len(rows) < n:
        prompt, slots = make_prompt(rng)
        if kind == "sft":
            style, template = _pick_style(rng, styles)
            label = template.format(**slots)
            rows.append(dict(prompt=prompt, label=label, style=style, gold=gold_score(prompt, label)))
        elif kind == "pairs":
            a, b = (t.format(**slots) for _, t in (_pick_style(rng, styles), _pick_style(rng, styles)))
            ga, gb = gold_score(prompt, a), gold_score(prompt, b)
            if abs(ga - gb) < 1e-9:
                continue  # a tie carries no preference
            if ga < gb:
                a, b, ga, gb = b, a, gb, ga
            noisy = rng.random() < label_noise
            if noisy:
                a, b, ga, gb = b, a, gb, ga
            rows.append(dict(prompt=prompt, chosen=a, rejected=b, gold_chosen=ga, gold_rejected=gb,
                             noisy=noisy))
        else:
            raise ValueError(f"unknown kind {kind!r}; choose 'sft' or 'pairs'")
    return rows


def conversational(rows: list[dict]) -> list[dict]:
    """TL;DR rows of `generate` in TRL's conversational formats: an SFT row becomes `messages` (the post as the
    user turn, the summary as the assistant's), a pair becomes `prompt` / `chosen` / `rejected` messages.
    The rendered prompt still holds the post, so the gold scorer reads it as before."""
    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text.strip()}]

    if rows and "chosen" in rows[0]:
        return [{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]), "rejected": assistant(r["rejected"])}
                for r in rows]
    return [{"messages": user(r["prompt"]) + assistant(r["label"])} for r in rows]


def best_completion(task: str, prompt: str) -> str:
    """The gold-optimal completion of a synthetic prompt (scores BEST_SCORE)."""
    facts = extract_facts(prompt)
    if facts is None:
        raise ValueError("not a synthetic prompt")
    if task == "hh":
        return BEST_HH.format(pet=facts.who, symptom=facts.action)
    return BEST_TLDR.format(who=facts.who, action=facts.action, obj=facts.obj)


def reference_quality(task: str, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean gold of the references, and of the best completions, over `n` generated prompts."""
    rows = generate(task, n, seed)
    ref = sum(r["gold"] for r in rows) / n
    best = sum(gold_score(r["prompt"], best_completion(task, r["prompt"])) for r in rows) / n
    return {"reference_gold": ref, "best_gold": best}
