"""A reward model behind an inference server that speaks the Open Inference Protocol (KServe v2: Triton,
KServe, MLServer): `POST {url}/v2/models/{name}/infer`.

Inputs are the texts (`BYTES` tensors `prompt` and `completion`, shape [N]) or token ids (`INT64` tensors
`input_ids` and `attention_mask`, shape [N, T], right-padded, as trlx's Triton client sends them); the
output is an `FP32` (or `FP64`) tensor `rewards` of shape [N]. The model's readiness is checked once
(`GET {url}/v2/models/{name}/ready`); batches go out `max_concurrency` at a time; connection errors and
5xx answers are retried with backoff; TLS is verified; the bearer token is read from the environment.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from ..errors import UserError

FLOATS = {"FP32", "FP64", "FP16", "BF16"}


class V2Reward:
    def __init__(self, url: str, model_name: str = "reward", inputs: str = "text", output: str = "rewards",
                 tokenizer=None, max_length: int = 512, token_env: str = "RLHF_REWARD_TOKEN", timeout: float = 30.0,
                 retries: int = 3, batch_size: int = 64, max_concurrency: int = 4):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--reward-url must start with http:// or https://, got {url!r}")
        if inputs == "tokens" and tokenizer is None:
            raise UserError("reward.inputs: tokens needs the reward model's tokenizer: set reward.tokenizer")
        self.base, self.model_name, self.inputs, self.output = url.rstrip("/"), model_name, inputs, output
        self.tokenizer, self.max_length, self.retries = tokenizer, max_length, retries
        self.batch_size, self.max_concurrency = batch_size, max(1, max_concurrency)
        self.name = f"{self.base} (v2 model '{model_name}')"
        token = os.environ.get(token_env)
        # one retry loop (_request) for connection errors, timeouts and 5xx answers: httpx's transport retries
        # cover connection failures only
        self.client = httpx.Client(timeout=timeout, verify=True,
                                   headers={"Authorization": f"Bearer {token}"} if token else {})
        self._check_ready()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        last = ""
        for attempt in range(self.retries + 1):
            try:
                r = self.client.request(method, self.base + path, **kw)
                if r.status_code < 500:
                    return r
                last = f"HTTP {r.status_code}"
            except httpx.TimeoutException:
                last = "timed out"
            except httpx.TransportError as e:
                last = str(e) or type(e).__name__
            if attempt < self.retries:
                time.sleep(min(4.0, 0.25 * 2 ** attempt))
        raise UserError(f"reward server {self.base} failed after {self.retries + 1} attempts: {last}")

    def _check_ready(self) -> None:
        r = self._request("GET", f"/v2/models/{self.model_name}/ready")
        if r.status_code != 200:
            raise UserError(f"reward server {self.base} has no ready model '{self.model_name}' (GET /v2/models/"
                            f"{self.model_name}/ready answered HTTP {r.status_code}); check reward.model_name")

    def _body(self, prompts: list[str], completions: list[str]) -> dict:
        n = len(prompts)
        if self.inputs == "text":
            return {"inputs": [{"name": "prompt", "shape": [n], "datatype": "BYTES", "data": list(prompts)},
                               {"name": "completion", "shape": [n], "datatype": "BYTES", "data": list(completions)}]}
        from ..data.tokenize import sequence_ids  # the reward model's own tokenization, as CheckpointReward's

        ids = [sequence_ids(self.tokenizer, p, c, self.max_length, self.max_length * 3 // 4)
               for p, c in zip(prompts, completions)]
        # one width for every request (reward.max_length), so a server's batcher can merge requests (Triton and
        # MLServer batch only equal shapes); the server skips all-padding columns
        width = self.max_length
        pad = self.tokenizer.pad_token_id or 0
        return {"inputs": [
            {"name": "input_ids", "shape": [n, width], "datatype": "INT64",
             "data": [t for x in ids for t in x + [pad] * (width - len(x))]},
            {"name": "attention_mask", "shape": [n, width], "datatype": "INT64",
             "data": [m for x in ids for m in [1] * len(x) + [0] * (width - len(x))]}]}

    def _infer(self, prompts: list[str], completions: list[str]) -> list[float]:
        r = self._request("POST", f"/v2/models/{self.model_name}/infer", json=self._body(prompts, completions))
        if r.status_code != 200:
            raise UserError(f"reward server {self.base} answered HTTP {r.status_code} to an infer request: "
                            f"{r.text[:120]}")
        try:
            outputs = {o["name"]: o for o in r.json()["outputs"]}
        except (ValueError, KeyError, TypeError):
            raise UserError(f"reward server {self.base} did not answer with a v2 inference response") from None
        out = outputs.get(self.output)
        if out is None:
            raise UserError(f"reward server {self.base} answered without an output '{self.output}' (it has: "
                            f"{', '.join(outputs) or 'none'}); set reward.output")
        n = len(prompts)
        if out.get("datatype") not in FLOATS:
            raise UserError(f"reward server {self.base} answered '{self.output}' as {out.get('datatype')}, "
                            "not a float tensor (FP32)")
        data = out.get("data")
        if out.get("shape") not in ([n], [n, 1]) or not isinstance(data, list) or len(data) != n:
            raise UserError(f"reward server {self.base} answered '{self.output}' with shape {out.get('shape')} "
                            f"for {n} samples; expected [{n}]")
        bad = next((i for i, v in enumerate(data) if not isinstance(v, (int, float)) or not math.isfinite(v)), None)
        if bad is not None:
            raise UserError(f"reward server {self.base} answered a non-finite or non-number score ({data[bad]!r}) "
                            f"for sample {bad}")
        return [float(v) for v in data]

    def score(self, prompts: list[str], completions: list[str], **metadata) -> list[float]:
        spans = [(i, i + self.batch_size) for i in range(0, len(prompts), self.batch_size)]
        if len(spans) <= 1 or self.max_concurrency == 1:
            return [s for a, b in spans for s in self._infer(prompts[a:b], completions[a:b])]
        with ThreadPoolExecutor(self.max_concurrency) as pool:  # batches in flight at once: scoring overlaps
            parts = list(pool.map(lambda ab: self._infer(prompts[ab[0]: ab[1]], completions[ab[0]: ab[1]]), spans))
        return [s for part in parts for s in part]
