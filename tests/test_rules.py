"""Answer extraction, rule-based rewards, weighted reward sources, and the synthetic:arith task."""

import math

import pytest

from rlhf_cli.answers import extract_answer, same_answer, to_number
from rlhf_cli.config import RewardSourceConfig
from rlhf_cli.data import arith, synthetic
from rlhf_cli.errors import UserError
from rlhf_cli.rewards import CallableReward, make_weighted
from rlhf_cli.rewards.rules import answer_format, exact_match
from rlhf_cli.trainers.rollouts import Scorer


@pytest.mark.parametrize("text, answer", [
    (" 7 + 5 = 12. 12 - 3 = 9. <answer>9</answer>", "9"),
    ("<answer>1</answer> no, <answer> 2 </answer>", "2"),  # the last stated answer counts
    ("so \\boxed{\\frac{1}{2}} it is", "\\frac{1}{2}"),  # braces balanced
    ("48/2 = 24\n#### 72", "72"),  # GSM8K's reference solutions
    ("the answer is 9", None),  # no guessing from stray numbers
    ("\\boxed{12", None),  # cut before the answer ended
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_numbers_compare_within_tolerance_and_text_exactly():
    assert to_number("$1,234.") == 1234.0 and to_number("12%") == 12.0 and to_number("twelve") is None
    assert same_answer("1,000", "1000.0") and same_answer("0.3333", "0.33333", tolerance=1e-3)
    assert not same_answer("0.3333", "0.33333") and not same_answer(None, "3")
    assert same_answer(" Paris", "paris") and not same_answer("nan", "1")


def test_exact_match_reads_the_answer_column_or_the_references():
    outs = [" 1 + 2 = 3. <answer>3</answer>", " <answer>4</answer>", " 3", "\\boxed{3}"]
    assert exact_match(outputs=outs, answer=["3"] * 4) == [1.0, 0.0, 0.0, 1.0]
    # GSM8K: the truth is the reference solution's '#### 72'
    assert exact_match(outputs=["<answer>72</answer>", "#### 71"], references=["a\n#### 72", "b\n#### 72"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="needs the true answers"):
        exact_match(outputs=["<answer>1</answer>"], references=[None])
    with pytest.raises(UserError, match="states no final answer"):
        exact_match(outputs=["<answer>1</answer>"], references=["one"])


def test_answer_format_wants_one_tagged_answer_at_the_end():
    assert answer_format(outputs=[" 1 + 2 = 3. <answer>3</answer>", "<answer>3</answer> and more",
                                  "<answer>3</answer><answer>4</answer>", "3"]) == [1.0, 0.0, 0.0, 0.0]


def test_arith_problems_are_seeded_checkable_and_the_references_half_right():
    rows = arith.generate(2000, seed=0)
    assert rows[:3] == arith.generate(3, seed=0) and rows[0] != arith.generate(1, seed=1)[0]
    for r in rows[:200]:  # the truth is read back from the prompt's text, and is the answer column
        assert arith.solve(r["prompt"]) == int(r["answer"]) >= 0
        assert synthetic.gold_score(r["prompt"], arith.best_completion(r["prompt"])) == 1.0
        assert synthetic.gold_score(r["prompt"], f" <answer>{int(r['answer']) + 1}</answer>") == 0.0
    accuracy = sum(r["gold"] for r in rows) / len(rows)
    assert 0.45 < accuracy < 0.6  # the mediocre student: imitation alone cannot be right every time
    styles = {r["style"] for r in rows}
    assert styles == {"right", "slip", "guess", "untagged"}
    assert all(r["gold"] == 0.0 for r in rows if r["style"] in ("slip", "untagged"))
    # the gold scorer reads only the completion's first line
    r = rows[0]
    assert synthetic.gold_score(r["prompt"], f"\n<answer>{r['answer']}</answer>") == 0.0


def test_a_trlx_style_function_still_works_when_the_data_has_columns(tmp_path, monkeypatch):
    (tmp_path / "old_style.py").write_text("def fn(samples, prompts, outputs):\n    return [1.0] * len(outputs)\n"
                                           "def with_answer(samples, prompts, outputs, answer):\n"
                                           "    return [float(o == a) for o, a in zip(outputs, answer)]\n")
    monkeypatch.chdir(tmp_path)
    assert CallableReward("old_style:fn").score(["p"], ["c"], answer=["c"], references=["r"]) == [1.0]
    assert CallableReward("old_style:with_answer").score(["p", "q"], ["c", "d"], answer=["c", "x"]) == [1.0, 0.0]


def test_weighted_sources_sum_with_weights_and_keep_each_for_the_logs():
    src = [RewardSourceConfig(fn="rlhf_cli.rewards.rules:exact_match", weight=1.0),
           RewardSourceConfig(fn="rlhf_cli.rewards.rules:answer_format", weight=0.25)]
    scorer = Scorer(make_weighted(src, None), delta=False)
    outs = [" 1 + 2 = 3. <answer>3</answer>", "<answer>3</answer> and more", " <answer>4</answer>", "3"]
    got = scorer.raw(["p"] * 4, outs, [None] * 4, [{"answer": "3"}] * 4)
    assert got == [1.25, 1.0, 0.25, 0.0]
    assert scorer.take_parts() == {"exact_match": 0.5, "answer_format": 0.5}
    assert scorer.take_parts() == {}
    # TRL's reward_weights: one per source, in order, over each entry's own weight
    assert make_weighted(src, [2.0, 0.0]).score(["p"], [outs[1]], answer=["3"]) == [2.0]


@pytest.mark.parametrize("sources, weights, message", [
    ([], None, "reward.sources is empty"),
    ([{"fn": "rlhf_cli.rewards.rules:exact_match"}], [1.0, 2.0], "2 weight\\(s\\) for 1 reward source"),
    ([{"fn": "rlhf_cli.rewards.rules:exact_match", "ckpt": "runs/rm"}], None, "exactly one of"),
    ([{"fn": "rlhf_cli.rewards.rules:exact_match", "weight": math.inf}], None, "finite"),
    ([{"fn": "rlhf_cli.rewards.rules:nothing"}], None, "has no function 'nothing'"),
])
def test_bad_reward_sources_are_one_sentence(sources, weights, message):
    with pytest.raises(UserError, match=message):
        make_weighted([RewardSourceConfig(**s) for s in sources], weights)
