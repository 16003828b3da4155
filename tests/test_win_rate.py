"""Win rates against the references, their bootstrap interval and the length-controlled view, by hand."""

import pytest

from rlhf_cli.metrics import bootstrap_interval, length_buckets, length_controlled_win_rate, win_rate


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


def test_length_buckets_and_the_length_controlled_win_rate():
    assert length_buckets([5, 1, 3, 2, 4, 6, 8, 7], 4) == [[1, 3], [2, 4], [0, 5], [7, 6]]
    assert length_buckets([1, 2, 3], 4) == [[0], [1], [2]]  # fewer samples than buckets: no empty bucket
    # the policy wins only where it writes long: plain win rate 0.5, but per bucket 0, 0, 1, 1 -> mean 0.5;
    # and a policy that wins only its longest quarter: plain 0.25, buckets 0, 0, 0, 1
    a, b = [0, 0, 0, 0, 0, 0, 1, 1], [1] * 6 + [0, 0]
    lengths = [1, 2, 3, 4, 5, 6, 7, 8]
    assert win_rate(a, b) == 0.25
    assert length_controlled_win_rate(a, b, lengths) == (0.25, [0.0, 0.0, 0.0, 1.0])
    a2 = [0, 1, 0, 1, 0, 1, 0, 1]  # wins half of every bucket
    assert length_controlled_win_rate(a2, [0.5] * 8, lengths) == (0.5, [0.5, 0.5, 0.5, 0.5])
