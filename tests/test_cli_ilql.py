"""`rlhf ilql` end to end on a micro config, rewarded-sample files, steered generation, bad input."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, assert_one_sentence, run_cli, assert_planned_then_refused_here

ILQL_CONFIG = str(ROOT / "stage_configs" / "tldr_ilql.yaml")
ILQL_MICRO = ["--set", "data.synthetic.num_train=48", "--set", "data.synthetic.num_eval=8", "--set", "train.batch_size=8",
              "--set", "train.max_steps=6", "--set", "eval.num_samples=4", "--set", "eval.generation.max_new_tokens=6",
              "--set", "checkpoint.interval=3"]


@pytest.fixture(scope="module")
def ilql_run(sft_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ilql") / "ilql"
    r = run_cli("ilql", "--config", ILQL_CONFIG, "--policy", str(sft_ckpt), "--output-dir", str(out), *ILQL_MICRO)
    assert r.exit_code == 0, r.output
    return out


def test_ilql_writes_a_plain_policy_and_its_heads(ilql_run):
    from rlhf_cli.heads import ILQLHeads

    m = json.loads((ilql_run / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "ilql" and m["step"] == 6
    for beta in ("0", "1", "4"):
        assert f"eval/beta={beta}/gold" in m["metrics"]
    heads = ILQLHeads.load(ilql_run)
    assert heads.two_qs and len(heads.qs) == 2 and len(heads.target_qs) == 2
    code = ("import sys, transformers as t; m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "assert 'rlhf_cli' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code, str(ilql_run)]).returncode == 0
    rows = [json.loads(line) for line in (ilql_run / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    assert {"train/loss_q", "train/loss_v", "train/loss_cql", "train/loss_awac"} <= logged


def test_target_heads_lag_behind_the_trained_q_heads(ilql_run, sft_ckpt):
    """Targets start as copies of the Q heads and move by alpha only: after training they differ from them.
    (The Polyak arithmetic itself is tested in tests/losses/test_ilql.py.)"""
    import torch

    from rlhf_cli.heads import ILQLHeads

    heads = ILQLHeads.load(ilql_run)
    for q, t in zip(heads.qs, heads.target_qs):
        assert not torch.equal(q[0].weight, t[0].weight)


def test_steered_generation_with_beta_zero_is_the_policy(sft_ckpt):
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_cli.config import GenerationConfig
    from rlhf_cli.heads import ILQLHeads
    from rlhf_cli.models import load_tokenizer
    from rlhf_cli.sampling import ilql_generate

    tok = load_tokenizer(str(sft_ckpt))
    policy = AutoModelForCausalLM.from_pretrained(str(sft_ckpt))
    heads = ILQLHeads(policy.config.n_embd, policy.config.vocab_size)
    ids = [tok("TL;DR:", add_special_tokens=False)["input_ids"]] * 3
    gen = GenerationConfig(max_new_tokens=6)
    a = ilql_generate(policy, heads, tok, ids, 0.0, gen, 0, 3, seed=0)
    with torch.no_grad():  # heads of any value leave beta = 0 unchanged
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    assert ilql_generate(policy, heads, tok, ids, 0.0, gen, 0, 3, seed=0) == a


def test_ilql_on_a_rewarded_file(sft_ckpt, tmp_path):
    from rlhf_cli.data.synthetic import generate

    rows = generate("tldr", 40, seed=5)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["label"],
                                                           "reward": r["gold"]}) + "\n" for r in rows))
    out = tmp_path / "ilql"
    r = run_cli("ilql", "--config", ILQL_CONFIG, "--policy", str(sft_ckpt), "--output-dir", str(out), *ILQL_MICRO,
                "--set", f"data.source={tmp_path / 'd.jsonl'}", "--set", "ilql.rewards=labels")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "rlhf_stage.json").read_text())["data"]["format"] == "rewarded"


def test_ilql_runs_on_real_hh_pairs(shared_data, sft_ckpt, tmp_path):
    r = run_cli("ilql", "--config", str(ROOT / "stage_configs" / "hh_ilql.yaml"), "--policy", str(sft_ckpt),
                "--output-dir", str(tmp_path / "ilql"), *ILQL_MICRO,
                "--set", f"data.source={shared_data / 'hh_rlhf' / 'harmless-base_test.jsonl.gz'}")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("extra,pattern", [
    (["--set", "data.source=synthetic:reviews"], "not preference pairs"),
    (["--set", "ilql.tau=1.5"], "ilql.tau"),
])
def test_bad_input_is_one_sentence(extra, pattern, sft_ckpt, tmp_path):
    r = run_cli("ilql", "--config", ILQL_CONFIG, "--policy", str(sft_ckpt), *ILQL_MICRO, *extra,
                "--output-dir", str(tmp_path / "ilql"))
    assert_one_sentence(r, pattern)


@pytest.mark.parametrize("config,presets", [("tldr_ilql.yaml", ["gptj"]), ("hh_ilql.yaml", ["125M", "1B", "6B", "20B"])])
def test_ilql_gpu_presets_dry_run(config, presets, tmp_path):
    for preset in presets:
        r = run_cli("ilql", "--config", str(ROOT / "stage_configs" / config), "--preset", preset, "--dry-run",
                    "--output-dir", str(tmp_path / preset))
        assert_planned_then_refused_here(r)
