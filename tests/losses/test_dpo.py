import math

import pytest
import torch

from rlhf_cli.losses.dpo import dpo_loss, sequence_logps

ZERO = torch.zeros(3)


def test_sigmoid_at_policy_equal_reference_is_exactly_log_2():
    pw, pl = torch.tensor([-3.0, -1.0, -7.5]), torch.tensor([-2.0, -4.0, -0.5])
    out = dpo_loss(pw, pl, pw.clone(), pl.clone(), beta=0.1)
    assert torch.equal(out.losses, torch.full((3,), math.log(2)))
    assert torch.equal(out.chosen_rewards, ZERO) and torch.equal(out.rejected_rewards, ZERO)


def test_sigmoid_by_hand():
    # h = (pw - pl) - (rw - rl) = (-1 - -3) - (-2 - -2) = 2; beta 0.5 -> beta h = 1; -log sigmoid(1)
    pw, pl, rw, rl = map(torch.tensor, ([-1.0], [-3.0], [-2.0], [-2.0]))
    out = dpo_loss(pw, pl, rw, rl, beta=0.5)
    assert abs(out.losses.item() - math.log(1 + math.exp(-1))) < 1e-6
    assert abs(out.chosen_rewards.item() - 0.5) < 1e-7 and abs(out.rejected_rewards.item() - -0.5) < 1e-7


def test_label_smoothing_zero_is_plain_dpo_and_smoothing_mixes_the_flipped_label():
    pw, pl, rw, rl = map(torch.tensor, ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.5]))
    plain = dpo_loss(pw, pl, rw, rl, beta=0.5)
    assert torch.equal(dpo_loss(pw, pl, rw, rl, beta=0.5, label_smoothing=0.0).losses, plain.losses)
    # eps = 0.2 at beta h = 1: 0.8 * log(1 + e^-1) + 0.2 * log(1 + e^1)
    smooth = dpo_loss(pw[:1], pl[:1], rw[:1], rl[:1], beta=0.5, label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.exp(1))
    assert abs(smooth.losses.item() - expected) < 1e-6


def test_hinge_by_hand():
    pw, pl, rw, rl = map(torch.tensor, ([-1.0, 0.0], [-3.0, 0.0], [-2.0, 0.0], [-2.0, -30.0]))
    # beta 0.25: h = 2 -> 1 - 0.5 = 0.5; h = -30 -> 1 + 7.5 = 8.5
    out = dpo_loss(pw, pl, rw, rl, beta=0.25, loss_type="hinge")
    assert torch.allclose(out.losses, torch.tensor([0.5, 8.5]), atol=1e-6, rtol=0)
    assert dpo_loss(torch.tensor([10.0]), pl[:1], rw[:1], rl[:1], beta=1.0, loss_type="hinge").losses.item() == 0.0


def test_ipo_is_length_normalised_squared_distance_to_half_over_beta():
    # chosen 2 tokens, rejected 4: h = (-2/2 - -8/4) - (-4/2 - -8/4) = 1 - 0 = 1; beta 0.25 -> (1 - 2)^2 = 1
    pw, pl, rw, rl = map(torch.tensor, ([-2.0], [-8.0], [-4.0], [-8.0]))
    out = dpo_loss(pw, pl, rw, rl, beta=0.25, loss_type="ipo", chosen_lengths=torch.tensor([2]),
                   rejected_lengths=torch.tensor([4]))
    assert abs(out.losses.item() - 1.0) < 1e-6
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(pw, pl, rw, rl, loss_type="ipo")


def test_rpo_adds_the_chosen_mean_nll():
    pw = torch.tensor([-6.0])
    base = dpo_loss(pw, pw - 1, pw, pw - 1, beta=0.1)  # log 2
    rpo = dpo_loss(pw, pw - 1, pw, pw - 1, beta=0.1, rpo_alpha=0.5, chosen_lengths=torch.tensor([3]))
    assert abs(rpo.losses.item() - (base.losses.item() + 0.5 * 2.0)) < 1e-6  # 0.5 * (6 / 3)


def test_gradient_raises_chosen_and_lowers_rejected():
    pw, pl = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    dpo_loss(pw, pl, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.1).losses.sum().backward()
    # d/dpw -log sigmoid(beta h) at h = 0 = -beta / 2
    assert abs(pw.grad.item() + 0.05) < 1e-7 and abs(pl.grad.item() - 0.05) < 1e-7


def test_sequence_logps_sums_only_labelled_tokens():
    # uniform logits over V = 4: every labelled token has log-prob -log 4
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 0]])
    logps, n = sequence_logps(logits, labels)
    assert n.tolist() == [2, 2]
    assert torch.allclose(logps, torch.full((2,), -2 * math.log(4)), atol=1e-6, rtol=0)
    logits[0, 0, 1] = math.log(3)  # p(token 1 at position 1) = 3 / 6 = 1/2
    logps, _ = sequence_logps(logits, labels)
    assert abs(logps[0].item() - (math.log(1 / 2) - math.log(4))) < 1e-6
