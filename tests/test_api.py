"""The Python API, `rlhf_cli.train(...)`: a callable reward and data held in memory, as a notebook has them."""

import json

import pytest
from conftest import ROOT

from rlhf_cli.errors import UserError

MICRO = {"train.batch_size": 4, "train.max_steps": 4, "ppo.num_rollouts": 8, "ppo.chunk_size": 4,
         "ppo.ppo_epochs": 2, "ppo.num_layers_unfrozen": 1, "ppo.generation.max_new_tokens": 6,
         "eval.num_samples": 4, "eval.generation.max_new_tokens": 6, "checkpoint.interval": 0}


def test_train_ppo_with_a_python_reward_and_prompts_in_memory(sft_ckpt, tmp_path):
    import rlhf_cli
    from rlhf_cli.data.synthetic import generate, gold_score

    prompts = [r["prompt"] for r in generate("tldr", 24, seed=3)]
    seen = []

    def reward(samples, prompts, outputs, **metadata):  # trlx's reward_fn signature
        seen.extend(outputs)
        return [gold_score(p, o) for p, o in zip(prompts, outputs)]

    result = rlhf_cli.train("ppo", config=ROOT / "stage_configs" / "tldr_ppo.yaml", policy=str(sft_ckpt),
                            reward_fn=reward, prompts=prompts, output_dir=tmp_path / "ppo",
                            overrides={**MICRO, "reward.delta": False, "ppo.init_kl_coef": 0.05})
    assert result.output_dir == tmp_path / "ppo" and (result.output_dir / "model.safetensors").is_file()
    assert result.steps == 4 and "eval/reward" in result.metrics and "eval/reward" in result.initial_metrics
    assert len(seen) >= 8  # the iteration's 8 rollouts were scored by the function
    manifest = json.loads((result.output_dir / "rlhf_stage.json").read_text())
    assert manifest["config"]["ppo"]["init_kl_coef"] == 0.05
    assert manifest["data"]["source"].startswith("memory:") and manifest["data"]["format"] == "prompt"
    assert manifest["reward"]["source"].endswith("reward")


def test_train_dpo_on_rows_in_memory(sft_ckpt, tmp_path):
    from rlhf_cli import train
    from rlhf_cli.data.synthetic import generate

    rows = generate("tldr", 40, seed=4, kind="pairs")
    result = train("dpo", dataset=[{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows],
                   policy=str(sft_ckpt), output_dir=tmp_path / "dpo",
                   overrides={"train.batch_size": 4, "train.max_steps": 3, "eval.num_samples": 2,
                              "eval.generation.max_new_tokens": 4})
    assert result.metrics["eval/loss"] > 0 and result.initial_metrics["eval/rewards/accuracies"] == 0.5


def test_bad_input_is_one_sentence(tmp_path):
    from rlhf_cli import train

    with pytest.raises(UserError, match="unknown stage 'gpro'"):
        train("gpro", output_dir=tmp_path / "x")
    with pytest.raises(UserError, match="unknown key 'train.learnin_rate'"):
        train("sft", overrides={"train.learnin_rate": 1e-3}, output_dir=tmp_path / "x")
    with pytest.raises(UserError, match="sft needs completions"):
        train("sft", prompts=["a prompt"] * 8, output_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()
