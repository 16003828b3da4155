"""Reward sources behind one interface: `score(prompts, completions, **metadata) -> list[float]`.

    CheckpointReward("runs/rm")                       a reward-model checkpoint, batched, no grad
    CallableReward("my_pkg.rewards:reward_fn")        fn(samples, prompts, outputs, **metadata), as trlx
    HttpReward("https://host/score")                  JSON batch in, JSON list out (trlx's Triton server)
    DeltaReward(source)                               score minus the score of the reference completion
    WeightedReward([(name, source, weight), ...])     several sources summed with weights, each kept for logs
    rules.exact_match, rules.answer_format            rule-based rewards of verifiable tasks (rewards/rules.py)

`make_reward(...)` builds one from the CLI flags; every failure is a UserError of one sentence.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from ..data.tokenize import collate_pairs, sequence_ids
from ..errors import UserError
from ..models import expect_kind, fuse_gelu, load_pretrained, load_tokenizer, max_positions, sequence_rewards
from .sentiment import ClassifierReward


def _number(x) -> float | None:
    """x as a float when it is a real number (int, float, a numpy or 0-d torch scalar); else None.

    Strict on purpose: a string ("1e30"), a bool or None is a bug in the reward code, not a score.
    """
    if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 0 or isinstance(x, np.generic):
        x = x.item()
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _checked(scores, n: int, where: str) -> list[float]:
    """Scores as floats: exactly n of them, each a finite number."""
    if isinstance(scores, (torch.Tensor, np.ndarray)) and scores.ndim == 1:
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise UserError(f"{where} must return a list of numbers, got {type(scores).__name__}")
    if len(scores) != n:
        raise UserError(f"{where} returned {len(scores)} scores for {n} samples")
    values = [_number(s) for s in scores]
    bad = next((i for i, v in enumerate(values) if v is None), None)
    if bad is not None:
        raise UserError(f"{where} returned {type(scores[bad]).__name__} {str(scores[bad])[:40]!r} for sample {bad}; "
                        "a score must be a number (int or float)")
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise UserError(f"{where} returned a non-finite score ({values[bad]}) for sample {bad}")
    return values


def columns_of(rows: list[dict] | None) -> dict[str, list]:
    """Rows' other data columns as one list per column: what a reward function gets by name (as in TRL)."""
    if not rows:
        return {}
    return {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("references", "prompts", "outputs", "samples")}


class CheckpointReward:
    """A reward-model checkpoint (AutoModelForSequenceClassification, num_labels=1)."""

    def __init__(self, path: str, device: str | None = None, batch_size: int = 32, max_length: int = 512,
                 max_prompt_length: int | None = None):
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"reward checkpoint {path} does not exist")
        expect_kind(p, "reward", "--reward-ckpt")
        self.tokenizer = load_tokenizer(str(p))
        self.model = fuse_gelu(load_pretrained(AutoModelForSequenceClassification, str(p), "reward model").eval())
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        # never more tokens than the model has positions (a longer input would index past its embedding)
        self.max_length = min(max_length, max_positions(self.model) or max_length)
        self.batch_size = batch_size
        self.max_prompt_length = min(max_prompt_length or self.max_length * 3 // 4, self.max_length)
        self.name = str(p)

    def score(self, prompts: list[str], completions: list[str], **metadata) -> list[float]:
        ids = [sequence_ids(self.tokenizer, p, c, self.max_length, self.max_prompt_length)
               for p, c in zip(prompts, completions)]
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(ids), self.batch_size):
                b = collate_pairs(ids[i: i + self.batch_size], [], self.tokenizer.pad_token_id)
                out += sequence_rewards(self.model, b["input_ids"].to(self.device),
                                        b["attention_mask"].to(self.device)).tolist()
        return _checked(out, len(prompts), f"reward model {self.name}")


_IN_MEMORY: dict[str, object] = {}


def in_memory(fn) -> str:
    """Register a Python function (the Python API's `reward_fn`) as the reward source `memory:<name>`."""
    if not callable(fn):
        raise UserError(f"reward_fn must be callable, got {type(fn).__name__}")
    spec = f"memory:{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    _IN_MEMORY[spec] = fn
    return spec


class CallableReward:
    """A Python function named `module:function`; only the module the user names is imported."""

    def __init__(self, spec: str):
        if spec.startswith("memory:"):  # a function handed to rlhf_cli.train in this process
            if spec not in _IN_MEMORY:
                raise UserError(f"reward function '{spec}' was registered by another process; pass it to rlhf_cli.train")
            self.fn, self.name = _IN_MEMORY[spec], spec
            return
        if spec.count(":") != 1 or not all(spec.split(":")):
            raise UserError(f"--reward-fn expects module:function (e.g. my_rewards:score), got {spec!r}")
        module_name, fn_name = spec.split(":")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # a module beside the user's config, as `python -m` would find it
        try:
            module = importlib.import_module(module_name)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # user code: even SystemExit at import is an error, not an exit
            raise UserError(f"cannot import reward module '{module_name}': {type(e).__name__}: {e}") from None
        self.fn = getattr(module, fn_name, None)
        if not callable(self.fn):
            raise UserError(f"reward module '{module_name}' has no function '{fn_name}'")
        self.name = spec

    def _accepted(self, metadata: dict) -> dict:
        """The metadata (references, the data's other columns) the function takes: all of it with **kwargs,
        else the names in its signature (a trlx-style fn(samples, prompts, outputs) still works)."""
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return metadata
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return metadata
        return {k: v for k, v in metadata.items() if k in params}

    def score(self, prompts: list[str], completions: list[str], **metadata) -> list[float]:
        samples = [p + c for p, c in zip(prompts, completions)]
        try:
            scores = self.fn(samples=samples, prompts=prompts, outputs=completions, **self._accepted(metadata))
        except (UserError, KeyboardInterrupt):
            raise
        except BaseException as e:  # user code: SystemExit / sys.exit() must not end the run with exit 0
            raise UserError(f"reward function {self.name} raised {type(e).__name__}: {e}") from None
        return _checked(scores, len(prompts), f"reward function {self.name}")


class HttpReward:
    """POST {"prompts": [...], "completions": [...]} -> {"rewards": [...]} (or a bare list).

    The bearer token is read from the environment variable `token_env` and never stored anywhere
    else; TLS certificates are verified (https). Retries with backoff on connection errors and 5xx.
    """

    def __init__(self, url: str, token_env: str = "RLHF_REWARD_TOKEN", timeout: float = 30.0, retries: int = 3,
                 batch_size: int = 64):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--reward-url must start with http:// or https://, got {url!r}")
        self.url, self.token_env, self.timeout, self.retries, self.batch_size = url, token_env, timeout, retries, batch_size
        self.name = url

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(self.token_env)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        last = ""
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return resp.read()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code < 500:
                    break  # a client error will not go away by retrying
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else str(reason)
            if attempt < self.retries:
                time.sleep(min(4.0, 0.25 * 2 ** attempt))
        raise UserError(f"reward URL {self.url} failed after {self.retries + 1} attempts: {last}")

    def score(self, prompts: list[str], completions: list[str], **metadata) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            p, c = prompts[i: i + self.batch_size], completions[i: i + self.batch_size]
            raw = self._post(json.dumps({"prompts": p, "completions": c}).encode())
            try:
                data = json.loads(raw)
            except ValueError:
                raise UserError(f"reward URL {self.url} did not answer with JSON") from None
            scores = data.get("rewards") if isinstance(data, dict) else data
            if not isinstance(scores, list):
                raise UserError(f"reward URL {self.url} answered without a list of rewards")
            out += _checked(scores, len(p), f"reward URL {self.url}")
        return out


class DeltaReward:
    """score(prompt, completion) - score(prompt, reference), trlx's summarize and HH recipes.

    The reference completion comes in `metadata["references"]` (one per prompt).
    """

    def __init__(self, source):
        self.source, self.name = source, f"delta({source.name})"

    def score(self, prompts: list[str], completions: list[str], **metadata) -> list[float]:
        refs = metadata.get("references")
        if refs is None or len(refs) != len(prompts):
            raise UserError("delta rewards need one reference completion per prompt")
        both = self.source.score(prompts + prompts, completions + list(refs))
        n = len(prompts)
        return [a - b for a, b in zip(both[:n], both[n:])]


class WeightedReward:
    """The weighted sum of several sources; `last` keeps each source's scores of the latest call (for logs)."""

    def __init__(self, parts: list[tuple[str, object, float]]):
        self.parts = parts
        self.name = " + ".join(f"{w:g} x {n}" for n, _, w in parts)
        self.last: dict[str, list[float]] = {}

    def score(self, prompts: list[str], completions: list[str], **metadata) -> list[float]:
        self.last = {name: source.score(prompts, completions, **metadata) for name, source, _ in self.parts}
        return [sum(w * self.last[name][i] for name, _, w in self.parts) for i in range(len(prompts))]


def _source_name(e) -> str:
    if e.name:
        return e.name
    if e.fn:
        return e.fn.rsplit(":", 1)[-1]
    if e.url:
        return urllib.parse.urlparse(e.url).netloc or e.url
    return Path(e.ckpt or e.classifier).name or (e.ckpt or e.classifier)


def weighted_names(sources, weights) -> list[tuple[str, float]]:
    """(name, weight) of each of `reward.sources`, checked: exactly one kind each, finite weights, and one
    weight per source in `weights` (TRL's reward_weights) when given. Loads nothing (also for --dry-run)."""
    if not sources:
        raise UserError("reward.sources is empty; give at least one {fn|ckpt|url|classifier, weight}")
    if weights is not None and len(weights) != len(sources):
        raise UserError(f"reward.weights has {len(weights)} weight(s) for {len(sources)} reward source(s); "
                        "give one weight per source, in order")
    out: list[tuple[str, float]] = []
    for i, e in enumerate(sources):
        given = [x for x in (e.ckpt, e.fn, e.url, e.classifier) if x]
        if len(given) != 1:
            raise UserError(f"reward.sources[{i}] must give exactly one of ckpt, fn, url, classifier; got {len(given)}")
        name = _source_name(e)
        if name in {n for n, _ in out}:
            name = f"{name}_{i}"
        weight = weights[i] if weights is not None else e.weight
        if not math.isfinite(weight):
            raise UserError(f"reward.sources[{i}] ({name}) has weight {weight}; a weight must be a finite number")
        out.append((name, weight))
    return out


def make_weighted(sources, weights, **kw) -> WeightedReward:
    """`reward.sources` (and TRL-style `reward.weights`) as one WeightedReward; `kw` as make_reward's."""
    named = weighted_names(sources, weights)
    return WeightedReward([(name, make_reward(e.ckpt, e.fn, e.url, classifier=e.classifier, **kw), weight)
                           for (name, weight), e in zip(named, sources)])


def make_reward(ckpt: str | None = None, fn: str | None = None, url: str | None = None, delta: bool = False,
                device: str | None = None, classifier: str | None = None, positive_label: str = "POSITIVE", **kw):
    given = [x for x in (ckpt, fn, url, classifier) if x]
    if len(given) != 1:
        raise UserError("give exactly one of --reward-ckpt, --reward-fn, --reward-url"
                        + (" (or reward.classifier)" if classifier else "")
                        + (f"; got {len(given)}" if given else ""))
    if classifier:
        source = ClassifierReward(classifier, positive_label, device=device, batch_size=kw.get("batch_size", 32))
    elif ckpt:
        source = CheckpointReward(ckpt, device=device, **{k: v for k, v in kw.items() if k in ("batch_size", "max_length")})
    elif fn:
        source = CallableReward(fn)
    elif kw.get("protocol", "json") == "v2":
        from .v2 import V2Reward  # httpx only where a v2 server is used

        tok = load_tokenizer(kw["tokenizer"]) if kw.get("inputs") == "tokens" and kw.get("tokenizer") else None
        source = V2Reward(url, tokenizer=tok, **{k: v for k, v in kw.items() if k in (
            "model_name", "inputs", "output", "max_length", "token_env", "timeout", "retries", "batch_size",
            "max_concurrency")})
    else:
        source = HttpReward(url, **{k: v for k, v in kw.items() if k in ("token_env", "timeout", "retries")})
    return DeltaReward(source) if delta else source
