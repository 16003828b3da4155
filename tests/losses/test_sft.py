import math

import torch

from rlhf_cli.losses.sft import sft_loss


def test_sft_loss_counts_only_labelled_tokens():
    # Vocabulary of 2, T = 3. Logits (0, 0) give p = 1/2 for either token; logits (ln 3, 0) give
    # p(token 0) = 3/4. labels[:, 1:] are the targets of logits[:, :-1].
    logits = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0], [5.0, 5.0]]])  # (B=1, T=3, V=2)
    labels = torch.tensor([[-100, 0, 1]])  # position 0 is prompt: no loss on predicting it
    out = sft_loss(logits, labels)
    # target 0 under (ln 3, 0): -ln(3/4); target 1 under (0, 0): -ln(1/2)
    expected = -math.log(3 / 4) - math.log(1 / 2)
    assert out.num_tokens.item() == 2
    assert abs(out.loss_sum.item() - expected) < 1e-6


def test_sft_loss_masked_prompt_changes_nothing():
    logits = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0], [5.0, 5.0]]])
    masked = sft_loss(logits, torch.tensor([[-100, -100, 1]]))
    # only the last target: -ln(1/2)
    assert masked.num_tokens.item() == 1
    assert abs(masked.loss_sum.item() - math.log(2)) < 1e-6


def test_sft_loss_padding_rows_are_ignored():
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[-100, 2, 3], [-100, -100, -100]])  # second row is all padding
    out = sft_loss(logits, labels)
    assert out.num_tokens.item() == 2
    assert abs(out.loss_sum.item() - 2 * math.log(4)) < 1e-6


def test_sft_loss_gradient_flows_to_logits():
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    sft_loss(logits, torch.tensor([[-100, 1]])).loss_sum.backward()
    # d/dz of -log softmax(z)[1] at z = 0 is softmax - onehot = (0.5, -0.5)
    assert torch.allclose(logits.grad[0, 0], torch.tensor([0.5, -0.5]), atol=1e-6, rtol=0)
    assert torch.equal(logits.grad[0, 1], torch.zeros(2))
