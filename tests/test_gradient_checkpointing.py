"""train.gradient_checkpointing works on every stage and path (the reward model's and DPO's shared prompt
included): it is on, the step trains, and the activations kept for the backward pass shrink."""

import pytest
import torch
from conftest import MICRO, ROOT, SFT_CONFIG, run_cli

CFG = ROOT / "stage_configs"
DEEPER = ["--set", "model.tiny.n_layer=4", "--set", "model.tiny.n_embd=64", "--set", "model.tiny.n_head=2"]
ONE_STEP = ["--set", "train.max_steps=1", "--set", "eval.at_start=false", "--set", "eval.num_samples=2",
            "--set", "checkpoint.interval=0"]


@pytest.fixture(scope="module")
def deep_sft(tmp_path_factory):
    """A 4-block policy: activations inside the blocks are what checkpointing drops."""
    out = tmp_path_factory.mktemp("gc") / "sft"
    r = run_cli("sft", "--config", SFT_CONFIG, "--output-dir", str(out), *MICRO, *DEEPER)
    assert r.exit_code == 0, r.output
    return out


def _stage_args(stage, policy):
    return {
        "sft": ["sft", "--config", SFT_CONFIG, *MICRO, *DEEPER],
        "train-rm": ["train-rm", "--config", str(CFG / "tldr_rm.yaml"), "--init-from", str(policy),
                     "--set", "data.synthetic.num_train=32", "--set", "data.synthetic.num_eval=4",
                     "--set", "train.batch_size=8"],  # the default: bottom blocks frozen, shared prompt
        "dpo": ["dpo", "--config", str(CFG / "tldr_dpo.yaml"), "--policy", str(policy),
                "--set", "data.synthetic.num_train=32", "--set", "data.synthetic.num_eval=4", "--set", "train.batch_size=8"],
        "ppo": ["ppo", "--config", str(CFG / "tldr_ppo.yaml"), "--policy", str(policy),
                "--reward-fn", "rlhf_cli.data.synthetic:gold_reward_fn", "--set", "data.synthetic.num_train=16",
                "--set", "data.synthetic.num_eval=4", "--set", "train.batch_size=8", "--set", "ppo.num_rollouts=8",
                "--set", "ppo.chunk_size=8", "--set", "ppo.ppo_epochs=1", "--set", "ppo.num_layers_unfrozen=-1",
                "--set", "ppo.generation.max_new_tokens=8", "--set", "eval.generation.max_new_tokens=4"],
        "ilql": ["ilql", "--config", str(CFG / "tldr_ilql.yaml"), "--policy", str(policy),
                 "--set", "data.synthetic.num_train=16", "--set", "data.synthetic.num_eval=4", "--set", "train.batch_size=8",
                 "--set", "eval.generation.max_new_tokens=4"],
    }[stage]


def _saved_bytes(monkeypatch, args) -> tuple[int, dict]:
    """Bytes of the tensors autograd keeps for the backward pass during the first optimizer step (those a
    checkpointed block keeps are its own business: only its inputs stay), and the run's manifest."""
    import json
    from pathlib import Path

    from rlhf_cli.trainers import loop

    real, seen = getattr(loop.accumulate, "unmeasured", loop.accumulate), []

    def measured(*a, **k):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = real(*a, **k)
        seen.append(total[0])
        return out
    measured.unmeasured = real
    monkeypatch.setattr(loop, "accumulate", measured)
    r = run_cli(*args, *ONE_STEP)
    assert r.exit_code == 0, r.output
    out = Path(args[args.index("--output-dir") + 1])
    return seen[0], json.loads((out / "rlhf_stage.json").read_text())


@pytest.mark.parametrize("stage", ["sft", "train-rm", "dpo", "ppo", "ilql"])
def test_gradient_checkpointing_is_on_and_keeps_fewer_activations(stage, deep_sft, tmp_path, monkeypatch):
    base = [*_stage_args(stage, deep_sft), "--set", "train.learning_rate=1e-4"]
    plain, _ = _saved_bytes(monkeypatch, [*base, "--output-dir", str(tmp_path / "plain")])
    checkpointed, manifest = _saved_bytes(monkeypatch, [*base, "--output-dir", str(tmp_path / "gc"),
                                                         "--set", "train.gradient_checkpointing=true"])
    assert manifest["config"]["train"]["gradient_checkpointing"] is True and manifest["step"] == 1
    assert checkpointed < 0.6 * plain, (stage, plain, checkpointed)


def test_the_shared_prompt_path_under_checkpointing_equals_the_plain_forward():
    """transformers keeps no KV cache while checkpointing in training: the completions ran without their
    prompt and the log-probs were silently wrong (-9.4157 for -9.4412 here). Now the plain forward runs."""
    import transformers

    from rlhf_cli.trainers.pair_logps import batch_logps

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = transformers.GPT2LMHeadModel(cfg).train()

    def row(ids, p):
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * p + ids[p:]}
    chunk = [{"chosen": row([5, 6, 7, 8, 9], 3), "rejected": row([5, 6, 7, 10], 3)}]
    pad = type("Tok", (), {"pad_token_id": 0})
    plain = batch_logps(model, pad, chunk, "cpu", share=False)
    shared = batch_logps(model, pad, chunk, "cpu", share=True)
    from rlhf_cli.trainers.common import checkpoint_activations

    checkpoint_activations(model)
    checkpointed = batch_logps(model, pad, chunk, "cpu", share=True)
    for a, b, c in zip(plain, shared, checkpointed):
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(c, a)


def test_switching_it_on_prints_no_deprecation_warning():
    import warnings

    import transformers

    from rlhf_cli.trainers.common import checkpoint_activations

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5.24 deprecates gradient_checkpointing_enable
        assert checkpoint_activations(model) == 1
    assert model.transformer.gradient_checkpointing
