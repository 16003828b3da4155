"""Win rates against the references, their bootstrap interval and the length-controlled view, by hand."""

import pytest

from rlhf_cli.metrics import bootstrap_interval, length_controlled_win_rate, win_rate


def test_win_rate_counts_ties_half():
    # wins: 1st, 3rd; tie: 2nd; loss: 4th -> (1 + 0.5 + 1 + 0) / 4
    assert win_rate([2.0, 1.0, 5.0, 0.0], [1.0, 1.0, 4.0, 3.0]) == 0.625
    assert win_rate([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_bootstrap_interval_by_hand():
    # every pair a win: every resample's win rate is 1
    assert bootstrap_interval([1.0] * 5, [0.0] * 5) == (1.0, 1.0)
    # two pairs, one win one loss: a resample of 2 is (win, win) 1/4, mixed 1/2, (loss, loss) 1/4, so the
    # resampled rate is 1, 0.5 or 0 with probabilities 1/4, 1/2, 1/4: the 95% interval is [0, 1]
    assert bootstrap_interval([1.0, 0.0], [0.0, 1.0], n=4000) == (0.0, 1.0)
    # 100 pairs, 70 wins: the interval brackets 0.7 with half-width ~ 1.96 sqrt(0.7 * 0.3 / 100) = 0.09
    lo, hi = bootstrap_interval([1.0] * 70 + [0.0] * 30, [0.5] * 100)
    assert lo < 0.7 < hi and hi - lo == pytest.approx(2 * 0.0898, abs=0.03)


def test_the_length_controlled_win_rate_is_the_win_rate_at_equal_length():
    """Two length groups make the logistic fit exact: sigmoid(theta + phi) and sigmoid(theta - phi) are the two
    groups' win rates, so theta = (logit(p+) + logit(p-)) / 2 and the answer is sigmoid(theta)."""
    import math

    def logit(p):
        return math.log(p / (1 - p))

    # 20 pairs one word longer than the reference, 16 of them won; 5 one word shorter, 1 won. Plain: 17 / 25.
    a = [1.0] * 16 + [0.0] * 4 + [1.0] + [0.0] * 4
    b = [0.5] * 25
    mine, ref = [11] * 20 + [9] * 5, [10] * 25
    assert win_rate(a, b) == 0.68
    # logit(0.8) + logit(0.2) = 0: at equal length it wins half, all its lead came with length
    assert length_controlled_win_rate(a, b, mine, ref) == pytest.approx(0.5, abs=1e-3)
    # ties count half: the longer group 1, .5, .5, 0 -> 0.5; the shorter 1, 1, 1, 0 -> 0.75
    a2 = [1, 0.5, 0.5, 0, 1, 1, 1, 0]
    b2 = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    want = 1 / (1 + math.exp(-(logit(0.5) + logit(0.75)) / 2))  # 0.634
    assert length_controlled_win_rate(a2, b2, [3] * 4 + [1] * 4, [2] * 8) == pytest.approx(want, abs=1e-3)
    # no length difference at all: nothing to control for, the plain win rate
    assert length_controlled_win_rate(a, b, ref, ref) == 0.68
