"""Supervised fine-tuning loss: next-token cross-entropy on the tokens that carry a label.

Notation: B = batch, T = sequence length, V = vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class SFTLoss(NamedTuple):
    loss_sum: torch.Tensor  # scalar: summed token NLL (keeps the graph)
    num_tokens: torch.Tensor  # scalar long: tokens that carried a label


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> SFTLoss:
    """Summed NLL of labels[:, t+1] under logits[:, t]; labels == -100 (prompt, padding) count for nothing.

    logits: (B, T, V); labels: (B, T). Returns the *sum* and the token count, not the mean, so the
    trainer can divide by the tokens of the whole accumulated batch: a mean per micro-batch would
    weight a short micro-batch's tokens more than a long one's (the gradient-accumulation bug
    fixed in transformers 4.46).
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return SFTLoss(loss_sum, (shift_labels != IGNORE_INDEX).sum())
