"""`rlhf ppo` end to end on micro configs, the frozen-trunk reference, stop sequences, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_one_sentence, rlhf_cmd, run_cli, assert_planned_then_refused_here

PPO_CONFIG = str(ROOT / "stage_configs" / "tldr_ppo.yaml")
GOLD_FN = "rlhf_cli.data.synthetic:gold_reward_fn"
PPO_MICRO = [
    "--set", "data.synthetic.num_train=64", "--set", "data.synthetic.num_eval=8", "--set", "train.batch_size=4",
    "--set", "train.max_steps=8", "--set", "ppo.num_rollouts=8", "--set", "ppo.chunk_size=4",
    "--set", "ppo.ppo_epochs=2", "--set", "ppo.num_layers_unfrozen=1", "--set", "ppo.generation.max_new_tokens=8",
    "--set", "eval.num_samples=8", "--set", "eval.generation.max_new_tokens=8", "--set", "checkpoint.interval=4",
]


@pytest.fixture(scope="module")
def ppo_run(sft_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "ppo"
    r = run_cli("ppo", "--config", PPO_CONFIG, "--policy", str(sft_ckpt), "--reward-fn", GOLD_FN, "--no-delta",
                "--output-dir", str(out), *PPO_MICRO)
    assert r.exit_code == 0, r.output
    return out


def test_ppo_writes_a_plain_hf_policy_and_a_value_head(ppo_run):
    from safetensors.torch import load_file

    m = json.loads((ppo_run / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "ppo" and m["step"] == 8
    for key in ("eval/reward", "eval/gold", "eval/kl", "eval/response_length"):
        assert key in m["metrics"] and key in m["initial_metrics"]
    assert m["initial_metrics"]["eval/kl"] == 0.0  # the initial policy is the reference
    head = load_file(str(ppo_run / "value_head.safetensors"))
    assert set(head) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    # trlx #600: the saved policy must load with plain transformers, no project code imported
    code = ("import sys, transformers as t; d = sys.argv[1]; m = t.AutoModelForCausalLM.from_pretrained(d); "
            "t.AutoTokenizer.from_pretrained(d); assert 'rlhf_cli' not in sys.modules; print(type(m).__name__)")
    for d in (ppo_run, ppo_run / "best"):
        out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True)
        assert out.returncode == 0 and "LMHeadModel" in out.stdout, out.stderr
    rows = [json.loads(line) for line in (ppo_run / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    for key in ("rollout/reward", "rollout/gold", "rollout/kl", "train/kl_coef", "train/policy_loss",
                "train/value_loss", "train/approx_kl", "train/clipfrac", "train/entropy", "train/value_error",
                "time/generate", "time/score", "time/train", "rollout/response_length"):
        assert key in logged, key
    assert (ppo_run / "eval_samples.jsonl").read_text().count("\n") == 8


def test_ppo_with_a_reward_checkpoint_and_delta(sft_ckpt, tmp_path):
    from rlhf_cli.config import TinyModelConfig
    from rlhf_cli.models import build_tiny_reward, load_tokenizer

    tok = load_tokenizer(str(sft_ckpt))
    rm = build_tiny_reward(TinyModelConfig(n_layer=1, n_embd=32, n_head=2), tok, seed=0)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    out = tmp_path / "ppo"
    r = run_cli("ppo", "--config", PPO_CONFIG, "--policy", str(sft_ckpt), "--reward-ckpt", str(tmp_path / "rm"),
                "--output-dir", str(out), *PPO_MICRO, "--set", "train.max_steps=4", "--set", "checkpoint.interval=0",
                "--set", "ppo.scale_reward=running")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["reward"] == {"source": str(tmp_path / "rm"), "delta": True}
    assert "eval/reward_delta" in m["metrics"]


def test_only_the_top_block_trains_and_the_reference_stays_the_initial_model():
    import copy

    from rlhf_cli.config import TinyModelConfig
    from rlhf_cli.heads import PolicyWithValueHead, Reference
    from rlhf_cli.models import build_tiny, train_tokenizer
    from rlhf_cli.models import train_top_blocks

    tok = train_tokenizer(["my sister broke my laptop. tl;dr: sister broke laptop."] * 50, 300, 64)
    policy = build_tiny(TinyModelConfig(n_layer=3, n_embd=32, n_head=2, n_positions=64), tok, seed=0)
    initial = copy.deepcopy(policy)
    train_top_blocks(policy, 1)
    model = PolicyWithValueHead(policy)
    reference = Reference(policy)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in policy.named_parameters() if n.startswith(("transformer.h.2.", "transformer.ln_f."))}
    assert reference.numel() < sum(p.numel() for p in policy.parameters()) / 2  # only the top block is copied
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, len(tok), (2, 10))
    mask = torch.ones_like(ids)
    for _ in range(3):
        logits, values = model(ids, mask, num_logits=10)
        (logits.logsumexp(-1).mean() - logits[..., 0].mean() + values.pow(2).mean() + 1).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for (n, a), b in zip(policy.named_parameters(), initial.parameters()) if not torch.equal(a, b)}
    assert changed and changed <= trainable
    with torch.no_grad():
        want = initial(input_ids=ids, attention_mask=mask).logits
        now = policy(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(reference.logits(ids, mask, 10), want)
    assert not torch.allclose(now, want)


def test_stop_sequences_cut_on_sampled_token_boundaries():
    from rlhf_cli.sampling import cut_at_stop
    from rlhf_cli.models import train_tokenizer

    tok = train_tokenizer(["\n\nHuman: hi there\n\nAssistant: hello, take it to a vet."] * 50, 300, 64)
    ids = tok(" take it to a vet.\n\nHuman: thanks", add_special_tokens=False)["input_ids"]
    kept, stopped = cut_at_stop(tok, ids, ["Human:", "Assistant:"])
    assert stopped and kept == ids[: len(kept)]  # a prefix of what was sampled, never re-tokenized
    assert tok.decode(kept) == " take it to a vet."  # trailing whitespace tokens dropped too
    assert cut_at_stop(tok, ids, ["Dog:"]) == (ids, False)
    starts_with_stop = tok("Human: again", add_special_tokens=False)["input_ids"]
    assert cut_at_stop(tok, starts_with_stop, ["Human:"]) == ([], True)


def test_rollouts_end_with_eos_after_a_stop_sequence(sft_ckpt):
    from rlhf_cli.config import GenerationConfig
    from rlhf_cli.sampling import generate
    from rlhf_cli.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(sft_ckpt))
    model = AutoModelForCausalLM.from_pretrained(str(sft_ckpt))
    prompts = [tok("TL;DR:", add_special_tokens=False)["input_ids"]] * 4
    gen = GenerationConfig(max_new_tokens=8)
    free = generate(model, tok, prompts, gen, 4, seed=0, keep_eos=True)
    stop = tok.decode(free[0][:1])  # the first sampled token's text is a stop string: cut to nothing
    cut = generate(model, tok, prompts, gen, 4, seed=0, stop_sequences=[stop], keep_eos=True)
    assert cut[0] == [tok.eos_token_id]
    eos = tok.eos_token_id
    for c, f in zip(cut, free):  # same seed, same samples: rows without the stop string are untouched
        body = f[:-1] if f and f[-1] == eos else f
        if stop in tok.decode(body):
            assert c[-1] == eos and c[:-1] == body[: len(c) - 1]
        else:
            assert c == f


def test_sigkill_then_resume_matches_an_uninterrupted_run(sft_ckpt, tmp_path):
    import signal
    import time
    from pathlib import Path

    steps = 24
    base = [*rlhf_cmd(), "ppo", "--config", PPO_CONFIG, "--policy", str(sft_ckpt), "--reward-fn", GOLD_FN,
            *PPO_MICRO, "--set", f"train.max_steps={steps}", "--set", "eval.at_start=false"]
    straight = subprocess.run(base + ["--output-dir", str(tmp_path / "straight")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed"
    args = base + ["--output-dir", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = Path(str(out) + ".partial") / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(ckdir.glob("step-*/trainer_state/state.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "rlhf_stage.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((out / "rlhf_stage.json").read_text())
    b = json.loads((tmp_path / "straight" / "rlhf_stage.json").read_text())
    assert a["step"] == b["step"] == steps
    assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("extra,pattern", [
    ([], "ppo needs a reward"),
    (["--reward-fn", GOLD_FN, "--reward-url", "http://localhost:1"], "exactly one of"),
    (["--reward-fn", "no_such_module:f"], "cannot import reward module 'no_such_module'"),
    (["--reward-fn", GOLD_FN, "--set", "ppo.num_layers_unfrozen=7"], "num_layers_unfrozen is 7 but the model has only 1"),
    (["--reward-fn", GOLD_FN, "--set", "ppo.scale_reward=sometimes"], "ppo.scale_reward"),
    (["--reward-fn", GOLD_FN, "--set", "ppo.num_rollouts=2"], r"ppo.num_rollouts \(2\) must be at least"),
])
def test_bad_input_is_one_sentence(extra, pattern, sft_ckpt, tmp_path):
    r = run_cli("ppo", "--config", PPO_CONFIG, "--policy", str(sft_ckpt), *PPO_MICRO, *extra,
                "--output-dir", str(tmp_path / "ppo"))
    assert_one_sentence(r, pattern)
    assert not (tmp_path / "ppo").exists()


def test_a_reward_model_is_refused_as_policy(tmp_path, sft_ckpt):
    from rlhf_cli.config import TinyModelConfig
    from rlhf_cli.models import build_tiny_reward, load_tokenizer

    tok = load_tokenizer(str(sft_ckpt))
    build_tiny_reward(TinyModelConfig(n_layer=1, n_embd=32, n_head=2), tok, 0).save_pretrained(tmp_path / "rm")
    r = run_cli("ppo", "--config", PPO_CONFIG, "--policy", str(tmp_path / "rm"), "--reward-fn", GOLD_FN,
                "--output-dir", str(tmp_path / "ppo"))
    assert_one_sentence(r, "is a reward checkpoint, but a policy")


@pytest.mark.parametrize("config,presets", [("tldr_ppo.yaml", ["gptj"]), ("hh_ppo.yaml", ["125M", "1B", "6B", "20B"])])
def test_ppo_gpu_presets_dry_run(config, presets, sft_ckpt, tmp_path, monkeypatch):
    from conftest import hh_reward_model_in

    hh_reward_model_in(tmp_path, sft_ckpt)
    monkeypatch.chdir(tmp_path)
    for preset in presets:
        r = run_cli("ppo", "--config", str(ROOT / "stage_configs" / config), "--preset", preset, "--dry-run",
                    "--output-dir", str(tmp_path / preset))
        assert "would fetch" in r.output
        assert_planned_then_refused_here(r)


def test_sentiment_ppo_on_real_review_text(shared_data, tmp_path):
    """The reward-function workflow on rt-polarity sentences: a tiny policy is warmed up on the text first."""
    out = tmp_path / "sentiment"
    r = run_cli("ppo", "--config", str(ROOT / "stage_configs" / "sentiment_ppo.yaml"), "--output-dir", str(out),
                "--set", f"data.source={shared_data / 'rt_polarity' / 'rt-polarity.neg'}", "--set", "init_sft_steps=10",
                "--set", "model.tiny.n_layer=1", "--set", "model.tiny.n_embd=32", "--set", "model.tiny.n_head=2",
                "--set", "tokenizer.vocab_size=400", "--set", "train.max_steps=4", "--set", "train.batch_size=4",
                "--set", "ppo.num_rollouts=8", "--set", "ppo.chunk_size=8", "--set", "ppo.ppo_epochs=2",
                "--set", "ppo.num_layers_unfrozen=-1", "--set", "eval.num_samples=8",
                "--set", "checkpoint.interval=0")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert -1 <= m["metrics"]["eval/reward"] <= 1  # tanh of a word count
    assert "init_policy" in m["parent"]["path"]  # the warmed-up tiny policy is the parent


@pytest.mark.slow
def test_sentiment_ppo_raises_the_lexicon_sentiment(tmp_path):
    """The acceptance run as it ships: stage_configs/sentiment_ppo.yaml, nothing overridden (about a minute)."""
    out = tmp_path / "sentiment"
    r = run_cli("ppo", "--config", str(ROOT / "stage_configs" / "sentiment_ppo.yaml"), "--output-dir", str(out))
    assert r.exit_code == 0, r.output
    m = json.loads((out / "rlhf_stage.json").read_text())
    before, after = m["initial_metrics"], m["metrics"]
    gap = after["eval/reward"] - before["eval/reward"]
    assert gap > 3 * (after["eval/reward_stderr"] + before["eval/reward_stderr"]), (before, after)
