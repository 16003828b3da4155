"""A reward checkpoint answering the Open Inference Protocol (KServe v2): what `rlhf serve-rm` (MLServer) and the
Triton model `rlhf export-triton` writes run. One scorer for both, so they give `rlhf score --reward-ckpt`'s
numbers: texts go through CheckpointReward itself; token ids through the same model and pooling.

Inputs, by name: `prompt` and `completion` (BYTES, [N]) or `input_ids` and `attention_mask` (INT64, [N, T],
right-padded, as trlx's Triton client sends them). Output: `rewards` (FP32, [N]).
"""

from __future__ import annotations

import socket

import numpy as np
import torch

from ..errors import UserError
from ..models import max_positions, sequence_rewards
from ..rewards import CheckpointReward

TEXT_INPUTS = ("prompt", "completion")
TOKEN_INPUTS = ("input_ids", "attention_mask")


class BadRequest(ValueError):
    """An inference request the scorer cannot answer; the server returns it as HTTP 400 with this text."""


def _texts(values, name: str) -> list[str]:
    flat = np.asarray(values, dtype=object).reshape(-1)
    try:
        return [v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v) for v in flat]
    except UnicodeDecodeError:
        raise BadRequest(f"input '{name}' is not UTF-8 text") from None


class RewardScorer:
    def __init__(self, ckpt: str, device: str | None = None, batch_size: int = 64, max_length: int = 512):
        self.reward = CheckpointReward(ckpt, device=device, batch_size=batch_size, max_length=max_length)
        self.vocab = self.reward.model.get_input_embeddings().weight.shape[0]
        self.positions = max_positions(self.reward.model)

    def __call__(self, inputs: dict) -> np.ndarray:
        """{input name: array or list} -> FP32 scores [N]; a request it cannot answer raises BadRequest."""
        if all(k in inputs for k in TEXT_INPUTS):
            prompts, completions = _texts(inputs["prompt"], "prompt"), _texts(inputs["completion"], "completion")
            if len(prompts) != len(completions):
                raise BadRequest(f"{len(prompts)} prompts but {len(completions)} completions")
            return np.asarray(self.reward.score(prompts, completions), dtype=np.float32)
        if "input_ids" in inputs:
            return self._score_ids(inputs["input_ids"], inputs.get("attention_mask"))
        raise BadRequest(f"inputs {sorted(inputs)}: expected 'prompt' and 'completion' (BYTES) or 'input_ids' "
                         "and 'attention_mask' (INT64)")

    def _score_ids(self, ids, mask) -> np.ndarray:
        ids = np.asarray(ids)
        mask = np.ones_like(ids) if mask is None else np.asarray(mask)
        if ids.ndim != 2 or mask.shape != ids.shape or not np.issubdtype(ids.dtype, np.integer):
            raise BadRequest(f"input_ids must be integers of shape [N, T] with an attention_mask of the same shape; "
                             f"got {ids.dtype} {list(ids.shape)} and {list(mask.shape)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise BadRequest(f"input_ids hold ids outside the model's vocabulary [0, {self.vocab})")
        lengths = mask.sum(1)
        if (lengths == 0).any():
            raise BadRequest("a row of attention_mask is all zeros (an empty sequence)")
        used = np.flatnonzero(mask.any(0))
        ids, mask = ids[:, used[0]: used[-1] + 1], mask[:, used[0]: used[-1] + 1]  # fixed-width padding costs nothing
        if self.positions and ids.shape[1] > self.positions:
            raise BadRequest(f"sequences of {ids.shape[1]} tokens; the model has {self.positions} positions")
        out = []
        r = self.reward
        with torch.inference_mode():
            for i in range(0, len(ids), r.batch_size):
                out.append(sequence_rewards(r.model, torch.as_tensor(ids[i: i + r.batch_size], device=r.device),
                                            torch.as_tensor(mask[i: i + r.batch_size], device=r.device)).cpu())
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def free_port(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a just-stopped server's port is free
        try:
            s.bind((host, port))
        except OSError:
            raise UserError(f"port {port} is already in use on {host}; pick another with --port") from None


def prepare(ckpt: str, port: int, host: str = "0.0.0.0", max_batch_size: int = 64, device: str | None = None,
            max_length: int = 512) -> RewardScorer:
    """What `rlhf serve-rm` checks and loads before any server starts: a bad checkpoint or a busy port is one
    sentence, not a server that never becomes ready."""
    if max_batch_size < 1:
        raise UserError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    for p in (port, port + 1):  # REST, and gRPC on the next port
        free_port(host, p)
    return RewardScorer(ckpt, device=device, max_length=max_length)
