from rlhf_cli.data import synthetic as s

PROMPT = ("SUBREDDIT: r/tifu\nTITLE: Am I wrong to be upset?\nPOST: We used to get along really well. "
          "Yesterday my roommate broke my laptop. Everyone says I am overreacting.\nTL;DR:")


def test_same_seed_same_data_other_seed_other_data():
    for task in s.TASKS:
        for kind in ("sft", "pairs"):
            a, b = s.generate(task, 50, seed=3, kind=kind), s.generate(task, 50, seed=3, kind=kind)
            assert a == b
            assert a != s.generate(task, 50, seed=4, kind=kind)


def test_prompt_format_is_tldr():
    row = s.generate("tldr", 1, seed=0)[0]
    assert row["prompt"].startswith("SUBREDDIT: r/") and "\nTITLE: " in row["prompt"]
    assert "\nPOST: " in row["prompt"] and row["prompt"].endswith("\nTL;DR:")


def test_gold_score_by_hand():
    f = s.extract_facts(PROMPT)
    assert (f.who, f.action, f.obj) == ("roommate", "broke", "laptop")
    assert s.gold_score(PROMPT, " my roommate broke my laptop.") == 1.0
    # two of three facts, nothing else wrong: 2/3
    assert abs(s.gold_score(PROMPT, " my roommate broke my stuff.") - 2 / 3) < 1e-9
    # wrong person: 2/3 coverage - 0.5 for "sister", who is not in the post
    assert abs(s.gold_score(PROMPT, " my sister broke my laptop.") - (2 / 3 - 0.5)) < 1e-9
    # 17 words: 5 beyond the target of 12 -> -0.25
    long = " my roommate broke my laptop and i have no idea what to do about it right now"
    assert len(long.split()) == 17
    assert abs(s.gold_score(PROMPT, long) - 0.75) < 1e-9
    # "broke my" and "my laptop" each repeated once -> -0.5
    assert abs(s.gold_score(PROMPT, " my roommate broke my laptop broke my laptop") - 0.5) < 1e-9
    # the summary ends at the first newline
    assert s.gold_score(PROMPT, " my roommate broke my laptop.\nsister sister") == 1.0


def test_hh_gold_penalises_rudeness_and_rewards_the_vet():
    row = s.generate("hh", 1, seed=0)[0]
    f = s.extract_facts(row["prompt"])
    best = s.best_completion("hh", row["prompt"])
    assert s.gold_score(row["prompt"], best) == 1.0
    rude = f" that is a stupid question, your {f.who} is fine."
    assert abs(s.gold_score(row["prompt"], rude) - (1 / 3 - 0.5)) < 1e-9


def test_headroom_references_are_mediocre():
    for task in s.TASKS:
        q = s.reference_quality(task, n=1000)
        assert q["best_gold"] == 1.0
        assert 0.25 < q["reference_gold"] < 0.65  # about half the best: imitation cannot reach the top


def test_pairs_follow_gold_except_for_label_noise():
    rows = s.generate("tldr", 2000, seed=1, kind="pairs", label_noise=0.1)
    agree = [r["gold_chosen"] > r["gold_rejected"] for r in rows]
    assert all(a != r["noisy"] for a, r in zip(agree, rows))
    assert 0.07 < sum(r["noisy"] for r in rows) / len(rows) < 0.13


def test_reward_fn_signature_matches_trlx():
    assert s.gold_reward_fn(samples=None, prompts=[PROMPT], outputs=[" my roommate broke my laptop."]) == [1.0]
