import math

import torch

from rlhf_cli.losses.reward import pairwise_loss


def test_bradley_terry_by_hand():
    # diff = 0 -> log 2; diff = ln 3 -> -log(3/4) = log(4/3); diff = -ln 3 -> log 4
    rc = torch.tensor([1.0, math.log(3), 0.0])
    rr = torch.tensor([1.0, 0.0, math.log(3)])
    out = pairwise_loss(rc, rr)
    expected = torch.tensor([math.log(2), math.log(4 / 3), math.log(4)])
    assert torch.allclose(out.losses, expected, atol=1e-6, rtol=0)
    assert out.accuracy.tolist() == [0.0, 1.0, 0.0]
    assert torch.allclose(out.margin, rc - rr, atol=0, rtol=0)


def test_gradient_raises_chosen_and_lowers_rejected():
    rc = torch.tensor([0.0], requires_grad=True)
    rr = torch.tensor([0.0], requires_grad=True)
    pairwise_loss(rc, rr).losses.sum().backward()
    # d/d rc of -log sigmoid(rc - rr) = -(1 - sigmoid(0)) = -0.5; descent raises rc
    assert torch.allclose(rc.grad, torch.tensor([-0.5]), atol=1e-7, rtol=0)
    assert torch.allclose(rr.grad, torch.tensor([0.5]), atol=1e-7, rtol=0)


def test_margin_must_be_exceeded():
    # with margin 1 a diff of 1 costs as much as a tie without margin: log 2
    out = pairwise_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=torch.tensor([1.0]))
    assert abs(out.losses.item() - math.log(2)) < 1e-6
    assert out.accuracy.item() == 1.0  # accuracy and margin are about the rewards, not the target


def test_centering_adds_squared_sum():
    # diff 0 -> log 2, plus 0.01 * (1 + 1)^2 = 0.04
    out = pairwise_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_coef=0.01)
    assert abs(out.losses.item() - (math.log(2) + 0.04)) < 1e-6
