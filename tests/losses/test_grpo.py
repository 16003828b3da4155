"""GRPO-family math against numbers worked out by hand (in the comments) or small independent references."""

import math

import pytest
import torch

from rlhf_cli.losses.grpo import group_advantages, grpo_loss, k3_kl, mask_truncated

T = torch.tensor
REWARDS = T([1.0, 0, 0, 1, 2, 2, 2, 2])  # G = 4: group 0 mean 0.5, group 1 all equal (advantage 0)


def test_grpo_advantages_three_scales():
    # group: unbiased std of (1, 0, 0, 1) = sqrt(4 * 0.25 / 3) = sqrt(1/3)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    out = group_advantages(REWARDS, 4, "grpo", scale="group")
    assert torch.allclose(out, T([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)
    # batch: unbiased std of all 8 raw rewards: mean 10/8 = 1.25, squared deviations
    # 2 * 0.25^2 + 2 * 1.25^2 + 4 * 0.75^2 = 5.5 -> sqrt(5.5 / 7)
    a = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    out = group_advantages(REWARDS, 4, "grpo", scale="batch")
    assert torch.allclose(out, T([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)
    out = group_advantages(REWARDS, 4, "grpo", scale="none")  # Dr. GRPO: centred only
    assert torch.allclose(out, T([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_rloo_advantages():
    # r = 1: the others (0, 0, 1) average 1/3 -> 2/3; r = 0: the others (1, 0, 1) average 2/3 -> -2/3
    out = group_advantages(REWARDS, 4, "rloo")
    assert torch.allclose(out, T([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]), atol=1e-6)


def test_reinforce_pp_advantages():
    # centred c = (.5, -.5, -.5, .5, 0, 0, 0, 0): batch mean 0, biased variance 1/8 -> c * sqrt(8)
    out = group_advantages(REWARDS, 4, "reinforce_pp")
    s = math.sqrt(2.0)
    assert torch.allclose(out, T([s, -s, -s, s, 0, 0, 0, 0]), atol=1e-6)
    # token weighting (OpenRLHF whitens over action tokens): loop over the tokens of every completion
    lengths = [3, 1, 2, 1, 4, 1, 1, 2]
    c = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    tokens = [ci for ci, n in zip(c, lengths) for _ in range(n)]
    mean = sum(tokens) / len(tokens)
    std = math.sqrt(sum((x - mean) ** 2 for x in tokens) / len(tokens))
    out = group_advantages(REWARDS, 4, "reinforce_pp", lengths=T(lengths))
    assert torch.allclose(out, T([(ci - mean) / std for ci in c]), atol=1e-6)


def test_bad_groups_raise():
    with pytest.raises(ValueError):
        group_advantages(REWARDS[:7], 4, "grpo")
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 1, "grpo")
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 4, "ppo")
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(1, 2), None, None, T([1.0]), torch.ones(1, 2), loss_type="dr_grpo")
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(1, 2), None, None, T([1.0]), torch.ones(1, 2), beta=0.1)


def test_k3():
    # x = ref - logp = 0, 1, -1: 0, e - 2, 1/e + 1 - 1
    out = k3_kl(T([[-1.0, -2.0, -1.0]]), T([[-1.0, -1.0, -2.0]]))
    assert torch.allclose(out, T([[0.0, math.e - 2, math.exp(-1)]]), atol=1e-6)


# Two completions of 3 and 1 real tokens, ratios (1.1, 1.1, 1) and (0.9), advantages 1 and -2, eps 0.2:
# nothing clipped; token losses -1.1, -1.1, -1.0 and -(0.9 * -2) = 1.8. The padding holds logp 100 (e^100
# overflows float32) and must not leak in.
AGG_LOGP = T([[math.log(1.1), math.log(1.1), 0.0], [math.log(0.9), 100.0, 100.0]])
AGG_MASK = T([[1.0, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("loss_type, loss_sum, units", [
    ("grpo", -3.2 / 3 + 1.8, 2.0),   # mean of the token means: (-3.2/3 + 1.8) / 2
    ("bnpo", -3.2 + 1.8, 4.0),       # token mean: -1.4 / 4
    ("dapo", -3.2 + 1.8, 4.0),
    ("dr_grpo", -1.4 / 5, 2.0),      # -1.4 / (2 completions * max_completion_length 5)
])
def test_loss_type_aggregation(loss_type, loss_sum, units):
    out = grpo_loss(AGG_LOGP, torch.zeros(2, 3), None, T([1.0, -2.0]), AGG_MASK, loss_type=loss_type,
                    epsilon=0.2, max_completion_length=5)
    assert out.loss_sum.item() == pytest.approx(loss_sum, abs=1e-5)
    assert out.units.item() == units
    assert (out.tokens.item(), out.clip_low.item(), out.clip_high.item(), out.kl.item()) == (4, 0, 0, 0)


def test_clip_higher_is_asymmetric():
    # ratios 1.25, 0.75, 0.75, 1.25 with advantages 1, -1, 1, -1 and eps 0.2:
    #   eps_high 0.28: 1.25 (inside), min(-.75, -.8) = -.8 (low clip), min(.75, .8) = .75, min(-1.25, -1.2) = -1.25
    #   eps_high 0.2:  the first becomes min(1.25, 1.2) = 1.2 (high clip)
    logp = T([[math.log(1.25), math.log(0.75), math.log(0.75), math.log(1.25)]]).requires_grad_()
    adv, mask = T([[1.0, -1, 1, -1]]), torch.ones(1, 4)
    out = grpo_loss(logp, torch.zeros(1, 4), None, adv, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=0.28)
    assert out.loss_sum.item() == pytest.approx(-1.25 + 0.8 - 0.75 + 1.25, abs=1e-5)
    assert (out.clip_low.item(), out.clip_high.item()) == (1, 0)
    sym = grpo_loss(logp, torch.zeros(1, 4), None, adv, mask, loss_type="bnpo", epsilon=0.2)
    assert sym.loss_sum.item() == pytest.approx(-1.2 + 0.8 - 0.75 + 1.25, abs=1e-5)
    assert (sym.clip_low.item(), sym.clip_high.item()) == (1, 1)
    sym.loss_sum.backward()  # d/dlogp of -A * ratio where unclipped, 0 where clipped
    assert torch.allclose(logp.grad, T([[0.0, 0.0, -0.75, 1.25]]), atol=1e-6)


def test_gspo_sequence_ratio():
    # log-ratios (0.3, -0.1) -> exp(0.1) for both tokens; (0.2, pad) -> exp(0.2) = 1.2214, clipped to 1.2
    logp = T([[0.3, -0.1], [0.2, 50.0]]).requires_grad_()
    mask = T([[1.0, 1], [1, 0]])
    out = grpo_loss(logp, torch.zeros(2, 2), None, T([1.0, 1.0]), mask, epsilon=0.2, importance="sequence")
    assert out.loss_sum.item() == pytest.approx(-math.exp(0.1) - 1.2, abs=1e-5)
    assert (out.units.item(), out.clip_high.item()) == (2, 1)
    out.loss_sum.backward()  # d/dl_t of -exp((l_0 + l_1) / 2) = -exp(0.1) / 2; the clipped row has none
    g = -math.exp(0.1) / 2
    assert torch.allclose(logp.grad, T([[g, g], [0.0, 0.0]]), atol=1e-6)
    token = grpo_loss(logp, torch.zeros(2, 2), None, T([1.0, 1.0]), mask, epsilon=0.2)
    assert token.loss_sum.item() == pytest.approx(-(1.2 + math.exp(-0.1)) / 2 - 1.2, abs=1e-5)


def test_kl_term():
    # ratio 1 and advantage 0: the loss is beta * k3 alone; x = ref - logp = (1, -1)
    logp, ref, mask = T([[-1.0, -1.0, 3.0]]), T([[0.0, -2.0, -9.0]]), T([[1.0, 1, 0]])
    k3 = (math.e - 2) + math.exp(-1)
    out = grpo_loss(logp, logp, ref, T([0.0]), mask, loss_type="bnpo", beta=0.1)
    assert out.loss_sum.item() == pytest.approx(0.1 * k3, abs=1e-6)
    assert out.kl.item() == pytest.approx(k3, abs=1e-6)
    logged = grpo_loss(logp, None, ref, T([0.0]), mask, loss_type="bnpo")  # beta 0: logged, not in the loss
    assert (logged.loss_sum.item(), logged.kl.item()) == (0.0, pytest.approx(k3, abs=1e-6))


def trl_loss(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, level, max_len):
    """TRL 1.16 GRPOTrainer._compute_loss (its grpo / bnpo / dr_grpo / dapo branches), one micro-batch."""
    adv = adv.unsqueeze(1)
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    else:  # bnpo; dapo with num_items_in_batch = the tokens of this batch
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    low = ((coef_1 < 1 - eps_low) & (adv < 0)).float()
    high = ((coef_1 > 1 + eps_high) & (adv > 0)).float()
    return loss, (low * mask).sum() / mask.sum(), (high * mask).sum() / mask.sum()


@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_matches_trl_and_splits_into_micro_batches(loss_type, importance):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 5, generator=g) - 2
    logp, ref = old + 0.3 * torch.randn(4, 5, generator=g), old + 0.3 * torch.randn(4, 5, generator=g)
    mask = (torch.arange(5) < T([5, 3, 1, 4]).unsqueeze(1)).float()
    adv = T([1.0, -0.5, 2.0, -1.5])
    kw = {"loss_type": loss_type, "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.04, "importance": importance,
          "max_completion_length": 6}
    out = grpo_loss(logp, old, ref, adv, mask, **kw)
    ref_loss, ref_low, ref_high = trl_loss(logp, old, ref, adv, mask, loss_type, 0.2, 0.28, 0.04, importance, 6)
    assert (out.loss_sum / out.units).item() == pytest.approx(ref_loss.item(), abs=1e-6)
    if importance == "token":  # at sequence level TRL counts clipped completions, not tokens
        assert out.clip_high.item() + out.clip_low.item() > 0
        assert (out.clip_low / out.tokens).item() == pytest.approx(ref_low.item())
        assert (out.clip_high / out.tokens).item() == pytest.approx(ref_high.item())
    # halves with 8 and 5 tokens: sums over sums of units give the whole batch's loss
    a, b = (grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], **kw) for s in (slice(0, 2), slice(2, 4)))
    merged = (a.loss_sum + b.loss_sum) / (a.units + b.units)
    assert merged.item() == pytest.approx((out.loss_sum / out.units).item(), abs=1e-6)
    assert (a.kl + b.kl).item() == pytest.approx(out.kl.item(), abs=1e-6)


def test_mask_truncated():
    mask = T([[1.0, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = mask_truncated(mask, T([False, True, False]))
    assert torch.equal(out, T([[1.0, 1, 0], [0, 0, 0], [1, 0, 0]]))
    assert torch.equal(mask_truncated(mask.bool(), T([False, True, False])), out.bool())  # dtype kept
