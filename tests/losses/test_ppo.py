"""PPO math against numbers worked out by hand (in the comments) or by a direct computation."""

import math

import pytest
import torch

from rlhf_cli.losses.ppo import (RunningMoments, adaptive_kl_coef, entropy, gae, kl_penalized_rewards,
                                 policy_loss, sequence_kl, token_logprobs, value_loss, whiten)

T = torch.tensor


def test_gae_three_tokens_with_padding():
    # gamma 0.9, lam 0.5. Row 0, three real tokens:
    #   t2: d = 1.0 - 0.3 = 0.7                   A2 = 0.7
    #   t1: d = -0.2 + 0.9*0.3 - 0.4 = -0.33      A1 = -0.33 + 0.45*0.7 = -0.015
    #   t0: d = 0.1 + 0.9*0.4 - 0.5 = -0.04       A0 = -0.04 + 0.45*(-0.015) = -0.04675
    # Row 1, two real tokens and a padded one holding garbage that must not leak in:
    #   t1: d = 0.5 + 0 - 0.5 = 0                 A1 = 0
    #   t0: d = 0.2 + 0.9*0.5 - 1.0 = -0.35       A0 = -0.35
    rewards = T([[0.1, -0.2, 1.0], [0.2, 0.5, 9.0]])
    values = T([[0.5, 0.4, 0.3], [1.0, 0.5, 7.0]])
    mask = T([[1.0, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert torch.allclose(adv, T([[-0.04675, -0.015, 0.7], [-0.35, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, T([[0.45325, 0.385, 1.0], [0.65, 0.5, 0.0]]), atol=1e-6)


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask = T([[1.0, 2.0, 3.0]]), T([[0.5, 0.5, 0.5]]), torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, T([[6.0, 5.0, 3.0]]))
    assert torch.allclose(adv, T([[5.5, 4.5, 2.5]]))


def test_kl_penalty_on_every_token_and_score_on_the_last():
    mask = T([[1.0, 1, 1], [1, 1, 0], [1, 0, 0]])
    logp = T([[-1.0, -2.0, -3.0], [-1.0, -1.0, -5.0], [-0.7, -9.0, -9.0]])
    ref = T([[-1.5, -2.0, -2.0], [-1.2, -0.5, 0.0], [-0.2, 0.0, 0.0]])
    rewards, log_ratio = kl_penalized_rewards(T([2.0, 3.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    # row 0: log-ratio (0.5, 0, -1) -> -0.1 * it = (-0.05, 0, 0.1); score 2 on the last token
    # row 1: log-ratio (0.2, -0.5, pad) -> (-0.02, 0.05 + 3, 0)
    # row 2: a one-token response: first token == last token: -0.1 * (-0.5) + (-1) = -0.95
    assert torch.allclose(rewards, T([[-0.05, 0.0, 2.1], [-0.02, 3.05, 0.0], [-0.95, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(log_ratio, T([[0.5, 0.0, -1.0], [0.2, -0.5, 0.0], [-0.5, 0.0, 0.0]]))
    k1, k3 = sequence_kl(log_ratio, mask)
    assert torch.allclose(k1, T([-0.5, -0.3, -0.5]))
    k3_row0 = (math.exp(-0.5) - 1 + 0.5) + 0 + (math.exp(1) - 1 - 1)
    assert k3[0].item() == pytest.approx(k3_row0, rel=1e-6)
    assert (k3 >= 0).all()


def test_clipped_policy_loss():
    # ratios 1.5, 0.5, 0.5 with advantages 1, 1, -2 and cliprange 0.2:
    #   max(-1.5, -1.2) = -1.2 (clipped)  max(-0.5, -0.8) = -0.5  max(1.0, 1.6) = 1.6 (clipped)
    old = torch.zeros(1, 4)
    logp = T([[math.log(1.5), math.log(0.5), math.log(0.5), 5.0]])
    adv = T([[1.0, 1.0, -2.0, 100.0]])
    mask = T([[1.0, 1, 1, 0]])
    out = policy_loss(logp, old, adv, mask, cliprange=0.2)
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 1.6) / 3, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    approx_kl = ((0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 3
    assert out.approx_kl.item() == pytest.approx(approx_kl, rel=1e-5)


def test_policy_loss_gradient_is_zero_where_clipped():
    logp = T([[math.log(1.5), math.log(0.5)]]).requires_grad_()
    out = policy_loss(logp, torch.zeros(1, 2), T([[1.0, 1.0]]), torch.ones(1, 2), cliprange=0.2)
    out.loss.backward()
    # token 0 is clipped (no gradient); token 1: d/dlogp of -A * exp(logp) / 2 = -0.5 * 0.5
    assert torch.allclose(logp.grad, T([[0.0, -0.25]]))


def test_clipped_value_loss():
    # token 0: clip(1.0, 0.3, 0.7) = 0.7; (1-2)^2 = 1 vs (0.7-2)^2 = 1.69 -> 1.69 (clipped is worse)
    # token 1: clip(0, -0.1, 0.3) = 0; both 0.0025. loss = 0.5 * (1.69 + 0.0025) / 2
    out = value_loss(T([[1.0, 0.0, 3.0]]), T([[0.5, 0.1, 0.0]]), T([[2.0, 0.05, 0.0]]), T([[1.0, 1, 0]]),
                     cliprange_value=0.2)
    assert out.loss.item() == pytest.approx(0.423125, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(0.5)
    assert out.error.item() == pytest.approx((1 + 0.0025) / 2, abs=1e-6)


def test_adaptive_kl_controller():
    # KL 9 vs target 6: error clipped to 0.2 -> 0.1 * (1 + 0.2 * 128 / 10000)
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 10000, 128) == pytest.approx(0.100256)
    # KL 5.4: error -0.1 -> 0.1 * (1 - 0.1 * 0.0128)
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 10000, 128) == pytest.approx(0.099872)
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 10000, 128) == pytest.approx(0.1 * (1 - 0.2 * 0.0128))


def test_running_moments_match_the_whole_history():
    m = RunningMoments()
    assert m.update(T([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0))
    batch_mean, batch_std = m.update(T([4.0, 5.0]))
    assert (batch_mean, batch_std) == pytest.approx((4.5, math.sqrt(0.5)))
    assert m.mean == pytest.approx(3.0)
    assert m.std == pytest.approx(math.sqrt(2.5))  # std of 1..5, unbiased
    restored = RunningMoments(**m.state_dict())
    assert restored.std == pytest.approx(m.std)


def test_whiten_uses_real_tokens_only():
    x, mask = T([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]]), T([[1.0, 1, 0], [1, 1, 1]])
    w = whiten(x, mask)
    real = T([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - 3.0) / real.std()
    assert torch.allclose(w[mask.bool()], expected, atol=1e-5)
    assert w[0, 2] == 0


def test_entropy_and_token_logprobs():
    logits = torch.zeros(1, 2, 4)
    assert entropy(logits, torch.ones(1, 2)).item() == pytest.approx(math.log(4))
    logits = T([[[0.0, math.log(3.0)]]])
    assert token_logprobs(logits, T([[1]])).item() == pytest.approx(math.log(0.75))
