"""`rlhf train-rm` and `rlhf score` end to end on micro configs."""

import json

import pytest
from conftest import ROOT, assert_one_sentence, run_cli, assert_planned_then_refused_here

RM_CONFIG = str(ROOT / "stage_configs" / "tldr_rm.yaml")
RM_MICRO = ["--set", "data.synthetic.num_train=64", "--set", "data.synthetic.num_eval=16", "--set", "train.batch_size=8",
            "--set", "train.max_steps=4", "--set", "eval.num_samples=16", "--set", "checkpoint.interval=2"]


@pytest.fixture(scope="module")
def rm_ckpt(sft_ckpt):
    out = sft_ckpt.parent / "rm"
    r = run_cli("train-rm", "--config", RM_CONFIG, "--init-from", str(sft_ckpt), "--output-dir", str(out), *RM_MICRO)
    assert r.exit_code == 0, r.output
    assert "gold_accuracy" in r.output
    return out


def test_rm_checkpoint_loads_as_a_plain_sequence_classifier(rm_ckpt, sft_ckpt):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = AutoModelForSequenceClassification.from_pretrained(rm_ckpt)
    t = AutoTokenizer.from_pretrained(rm_ckpt)
    assert m.config.num_labels == 1 and m.config.pad_token_id == t.pad_token_id
    manifest = json.loads((rm_ckpt / "rlhf_stage.json").read_text())
    assert manifest["stage"] == "train-rm" and manifest["parent"]["path"] == str(sft_ckpt.resolve())
    assert manifest["parent"]["content_hash"] == json.loads((sft_ckpt / "rlhf_stage.json").read_text())["content_hash"]
    assert {"eval/accuracy", "eval/margin", "eval/chosen_mean", "eval/rejected_std", "eval/gold_accuracy"} <= set(manifest["metrics"])
    assert manifest["frozen_blocks"] == 0  # the micro model has one block: int(0.7 * 1) = 0


def test_score_with_the_rm_and_with_a_function(rm_ckpt, tmp_path):
    from rlhf_cli.data.synthetic import generate

    rows = [{"prompt": r["prompt"], "completion": r["label"], "reference": r["label"]} for r in generate("tldr", 5, 9)]
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("score", "--data", str(data), "--reward-ckpt", str(rm_ckpt), "--output", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 0, r.output
    scored = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(scored) == 5 and all(isinstance(s["score"], float) for s in scored)
    r = run_cli("score", "--data", str(data), "--reward-fn", "rlhf_cli.data.synthetic:gold_reward_fn", "--delta")
    assert r.exit_code == 0 and "mean 0.0000" in r.output  # each completion is its own reference


def test_policy_as_reward_model_is_refused(sft_ckpt, tmp_path):
    data = tmp_path / "s.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert_one_sentence(run_cli("score", "--data", str(data), "--reward-ckpt", str(sft_ckpt)),
                        r"is a policy checkpoint, but a reward model \(sequence classifier\) is expected")


def test_wrong_count_callable_and_unreachable_url_are_one_sentence(tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text("def fn(samples, prompts, outputs, **kw):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a", "completion": c}) + "\n" for c in "xyz"))
    assert_one_sentence(run_cli("score", "--data", str(data), "--reward-fn", "bad_reward:fn"),
                        "returned 1 scores for 3 samples")
    assert_one_sentence(run_cli("score", "--data", str(data), "--reward-url", "http://127.0.0.1:9/score"),
                        "reward URL http://127.0.0.1:9/score failed after")


def test_rm_refuses_data_without_pairs(sft_ckpt, tmp_path):
    r = run_cli("train-rm", "--config", RM_CONFIG, "--init-from", str(sft_ckpt), "--output-dir", str(tmp_path / "x"),
                *RM_MICRO, "--set", "data.source=synthetic:tldr", "--set", "data.format=tldr")
    assert_one_sentence(r, "has no column|needs preference pairs")


def test_equal_pairs_are_dropped_and_counted(sft_ckpt, tmp_path):
    rows = [{"prompt": f"post {i}\nTL;DR:", "chosen": " good summary", "rejected": " bad"} for i in range(30)]
    rows += [{"prompt": "same\nTL;DR:", "chosen": " x", "rejected": " x"}] * 5
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    r = run_cli("train-rm", "--config", RM_CONFIG, "--init-from", str(sft_ckpt), "--output-dir", str(out), *RM_MICRO,
                "--set", f"data.source={data}")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["data"]["dropped_equal"] == 5
    assert "eval/gold_accuracy" not in m["metrics"]


@pytest.mark.parametrize("sample", ["hh_rlhf/harmless-base_test.jsonl.gz", "tldr/tldr_pairs_gpt4judged.jsonl"])
def test_rm_runs_unchanged_on_the_real_samples(sample, shared_data, sft_ckpt, tmp_path):
    out = tmp_path / "rm"
    r = run_cli("train-rm", "--config", RM_CONFIG, "--init-from", str(sft_ckpt), "--output-dir", str(out), *RM_MICRO,
                "--set", f"data.source={shared_data / sample}", "--set", "data.max_examples=64")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["data"]["format"] == ("hh" if "hh" in sample else "comparisons")
    assert 0.0 <= m["metrics"]["eval/accuracy"] <= 1.0 and m["data"]["eval_pairs"] > 0


@pytest.mark.parametrize("config,presets", [("tldr_rm.yaml", ["tiny", "gptj"]), ("hh_rm.yaml", ["tiny", "125M", "1B", "6B", "20B"])])
def test_rm_presets_dry_run(config, presets, tmp_path):
    for preset in presets:
        r = run_cli("train-rm", "--config", str(ROOT / "stage_configs" / config), "--preset", preset,
                    "--output-dir", str(tmp_path / preset), "--dry-run", *([] if preset != "tiny" else RM_MICRO))
        if preset == "tiny":
            assert r.exit_code == 0 and "optimizer_steps" in r.output, r.output
        else:
            assert_planned_then_refused_here(r)


def test_policy_comparisons_pair_every_two_samples_by_gold(monkeypatch):
    """Four samples of one prompt with gold 1, 0, 1, 1/3: the ties (1 and 1) are dropped, the 5 other pairs
    put the higher gold first; with label_noise 0.5 some are flipped, and meta still names each side's gold."""
    from types import SimpleNamespace

    from rlhf_cli.config import load_config
    from rlhf_cli.data.synthetic import extract_facts, generate, gold_score
    from rlhf_cli.trainers import train_rm

    prompt = generate("tldr", 1, 3, kind="sft")[0]["prompt"]
    f = extract_facts(prompt)
    texts = [f" my {f.who} {f.action} my {f.obj}.", " drama, need advice.", f" my {f.who} {f.action} my {f.obj}.",
             f" my {f.who} said nothing."]
    seeds = []

    def fake_generate(policy, tok, ids, gen, batch_size, seed, progress=None):
        seeds.append(seed)
        return [[len(seeds) - 1]]  # the j-th pass returns token j, decoded to texts[j]

    monkeypatch.setattr(train_rm, "generate", fake_generate)
    monkeypatch.setattr(train_rm, "encode_prompt", lambda tok, p, n: ([0], False))
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: texts[ids[0]])
    cfg = load_config(RM_CONFIG, "train-rm", ["policy_comparisons.samples_per_prompt=4",
                                              "data.synthetic.label_noise=0"])
    pairs = train_rm.sampled_comparisons(None, tok, [prompt], cfg, seed=7)
    assert seeds == [7, 8, 9, 10]
    got = sorted((p.chosen, p.rejected) for p in pairs)
    want = sorted([(texts[0], texts[1]), (texts[0], texts[3]), (texts[2], texts[1]), (texts[2], texts[3]),
                   (texts[3], texts[1])])
    assert got == want
    assert all(p.meta["gold_chosen"] > p.meta["gold_rejected"] for p in pairs)
    cfg.data.synthetic.label_noise = 0.5
    noisy = []
    for seed in range(20):
        seeds.clear()  # fake_generate's pass counter
        noisy += train_rm.sampled_comparisons(None, tok, [prompt], cfg, seed=seed)
    flipped = [p for p in noisy if p.meta["gold_chosen"] < p.meta["gold_rejected"]]
    assert 0 < len(flipped) < len(noisy)
    assert all(gold_score(prompt, p.chosen) == p.meta["gold_chosen"] for p in noisy)


def test_reward_model_on_comparisons_of_the_policys_samples(sft_ckpt, tmp_path, monkeypatch):
    """The whole path, with a stand-in for the micro policy (its samples are alike: every pair would tie):
    each sampling pass writes one of four summaries of differing gold; the reward model trains on their
    gold-labelled comparisons and is scored against the noise-free labels."""
    from rlhf_cli.data.synthetic import extract_facts
    from rlhf_cli.trainers import train_rm

    def summaries(prompt):
        f = extract_facts(prompt)
        return [f" my {f.who} {f.action} my {f.obj}.", " drama, need advice.", f" my {f.who} {f.action} my stuff.",
                f" my {f.who} {f.action} my {f.obj} and i have been thinking about it for days, no idea what to say."]

    def fake_generate(policy, tok, ids, gen, batch_size, seed, progress=None):
        return [tok.encode(summaries(tok.decode(q, skip_special_tokens=True))[(seed + i) % 4]) for i, q in enumerate(ids)]

    monkeypatch.setattr(train_rm, "generate", fake_generate)
    out = tmp_path / "rm"
    r = run_cli("train-rm", "--config", RM_CONFIG, "--init-from", str(sft_ckpt), "--output-dir", str(out), *RM_MICRO,
                "--set", "policy_comparisons.samples_per_prompt=3")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "rlhf_stage.json").read_text())
    assert "eval/gold_accuracy" in manifest["metrics"]
    # 3 samples, 3 distinct summaries of distinct gold: every prompt gives its 3 pairs
    assert manifest["data"]["train_pairs"] == 3 * 64 and manifest["data"]["eval_pairs"] == 3 * 16
    assert "comparisons of 3 samples per prompt" in " ".join(r.output.split())


def test_policy_comparisons_of_one_sample_is_one_sentence(sft_ckpt, tmp_path):
    r = run_cli("train-rm", "--config", RM_CONFIG, "--init-from", str(sft_ckpt), "--output-dir", str(tmp_path / "rm"),
                *RM_MICRO, "--set", "policy_comparisons.samples_per_prompt=1")
    assert_one_sentence(r, "at least 2")
    assert not (tmp_path / "rm").exists()


def test_policy_comparisons_need_a_policy_parent_and_synthetic_data(sft_ckpt, tmp_path):
    tiny = run_cli("train-rm", "--config", RM_CONFIG, "--output-dir", str(tmp_path / "a"), *RM_MICRO,
                   "--set", "policy_comparisons.samples_per_prompt=2")
    assert_one_sentence(tiny, "is not a local policy checkpoint")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    real = run_cli("train-rm", "--config", RM_CONFIG, "--init-from", str(sft_ckpt), "--output-dir", str(tmp_path / "b"),
                   *RM_MICRO, "--set", "policy_comparisons.samples_per_prompt=2", "--set", f"data.source={pairs}")
    assert_one_sentence(real, "only synthetic data has")
