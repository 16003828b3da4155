"""ILQL terms on a 2-sequence batch with padding: hand numbers and a plain-Python reference."""

import math

import pytest
import torch

from rlhf_cli.losses.ilql import ilql_loss, nonterminal_mask, polyak_update, steered_logits

T = torch.tensor
Q1 = [[[0.5, 0.0], [0.0, 0.2], [1.0, 0.0]], [[0.0, -0.3], [0.0, -0.5], [9.0, 9.0]]]
Q2 = [[[0.4, 0.0], [0.0, 0.3], [0.8, 0.0]], [[0.0, -0.2], [0.0, -0.6], [9.0, 9.0]]]
V = [[0.1, 0.2, 0.3, 7.0], [0.0, -0.1, 5.0, 5.0]]  # states 0..3; 7.0 / 5.0 lie past the end
ACTIONS = [[0, 1, 0], [1, 1, 0]]
MASK = [[1, 1, 1], [1, 1, 0]]  # row 1's third slot is padding
REWARDS = [[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]  # the reward on each sequence's last action
GAMMA, TAU, CQL, AWAC, BETA = 0.5, 0.7, 0.1, 1.0, 1.0


def _run():
    return ilql_loss(torch.zeros(2, 3, 2), [T(Q1), T(Q2)], [T(Q1), T(Q2)], T(V), T(ACTIONS), T(MASK, dtype=torch.float),
                     T(REWARDS), GAMMA, TAU, CQL, AWAC, BETA)


def test_q_and_v_terms_by_hand():
    out = _run()
    # y = r + 0.5 * V(next) (0 after the last action): row 0 (0.1, 0.15, 1.0), row 1 (-0.05, -1.0)
    # Q1 taken: (0.5, 0.2, 1.0), (-0.3, -0.5) -> (0.16 + 0.0025 + 0 + 0.0625 + 0.25) / 5 = 0.095
    # Q2 taken: (0.4, 0.3, 0.8), (-0.2, -0.6) -> (0.09 + 0.0225 + 0.04 + 0.0225 + 0.16) / 5 = 0.067
    assert out.loss_q.item() == pytest.approx(0.095 + 0.067, abs=1e-6)
    # min target Q - V: (0.3, 0, 0.5), (-0.3, -0.5); weight 0.7 above V, 0.3 below:
    # (0.7*0.09 + 0 + 0.7*0.25 + 0.3*0.09 + 0.3*0.25) / 5 = 0.068
    assert out.loss_v.item() == pytest.approx(0.068, abs=1e-6)
    # AWAC: uniform policy logits (CE = ln 2) weighted by exp(Qhat - V)
    w = math.exp(0.3) + 1 + math.exp(0.5) + math.exp(-0.3) + math.exp(-0.5)
    assert out.loss_awac.item() == pytest.approx(w * math.log(2) / 5, rel=1e-6)


def test_cql_and_total_against_a_plain_python_reference():
    def ce(row, a):
        return math.log(sum(math.exp(x) for x in row)) - row[a]

    real = [(b, t) for b in range(2) for t in range(3) if MASK[b][t]]
    cql = sum(ce(q[b][t], ACTIONS[b][t]) for q in (Q1, Q2) for b, t in real) / len(real)
    out = _run()
    assert out.loss_cql.item() == pytest.approx(cql, rel=1e-6)
    assert out.loss.item() == pytest.approx(out.loss_q.item() + out.loss_v.item() + CQL * cql
                                            + AWAC * out.loss_awac.item(), rel=1e-6)


def test_padding_does_not_count():
    out = _run()
    q1 = [row[:] for row in Q1]
    q1[1][2] = [-50.0, 50.0]  # garbage in the padded slot
    v = [row[:] for row in V]
    v[1][2] = -80.0  # V of the state after row 1's last action: terminal, must not count
    again = ilql_loss(torch.zeros(2, 3, 2), [T(q1), T(Q2)], [T(q1), T(Q2)], T(v), T(ACTIONS),
                      T(MASK, dtype=torch.float), T(REWARDS), GAMMA, TAU, CQL, AWAC, BETA)
    assert again.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_nonterminal_mask():
    assert nonterminal_mask(T([[1.0, 1, 1], [1, 1, 0], [0, 1, 1]])).tolist() == [[1, 1, 0], [1, 0, 0], [0, 1, 0]]


def test_polyak_update_moves_targets_by_alpha():
    target, source = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    target.weight.data.fill_(1.0)
    source.weight.data.fill_(3.0)
    polyak_update(target, source, 0.25)
    assert target.weight.item() == pytest.approx(1.5)  # 0.25 * 3 + 0.75 * 1
    polyak_update(target, source, 1.0)
    assert target.weight.item() == pytest.approx(3.0)


def test_steered_logits():
    out = steered_logits(T([[0.0, math.log(3.0)]]), [T([[1.0, 0.0]]), T([[0.5, 2.0]])], T([0.5]), beta=2.0)
    # log pi = (ln .25, ln .75); min Q - V = (0, -0.5); + 2 * that
    assert out.tolist()[0] == pytest.approx([math.log(0.25), math.log(0.75) - 1.0], rel=1e-6)
