"""Gradient accumulation in the one loop: an optimizer step over 4 micro-batches of unequal size gives
the gradient of one big batch holding the same examples (1e-5), for every stage.

Each test also checks that averaging per-micro-batch means (what PPO and ILQL did before the one loop)
gives a different loss on the same micro-batches, so the split really is unequal and the check can fail.
"""

from pathlib import Path

import pytest
import torch
from rich.console import Console

from rlhf_cli.config import load_config
from rlhf_cli.trainers import common
from rlhf_cli.trainers.distributed import setup_accelerator
from rlhf_cli.trainers.loop import accumulate

ROOT = Path(__file__).resolve().parents[2]
SPLIT = [[0], [1, 2], [3, 4, 5], [6, 7, 8, 9, 10]]  # 1, 2, 3 and 5 examples: unequal units


def micro_sets(**sets) -> list[str]:
    base: dict = {"data.synthetic.num_train": 48, "data.synthetic.num_eval": 4, "model.tiny.n_layer": 1,
            "model.tiny.n_embd": 32, "model.tiny.n_head": 2, "tokenizer.vocab_size": 300, "train.batch_size": 4,
            "train.gradient_accumulation_steps": 4, "eval.num_samples": 2, "eval.generation.max_new_tokens": 4}
    return [f"{k}={v}" for k, v in {**base, **sets}.items()]


def build(stage_cls, config: str, stage: str, tmp_path, **sets):
    cfg = load_config(ROOT / "stage_configs" / config, stage, micro_sets(**sets))
    acc = setup_accelerator(cfg)
    torch.manual_seed(0)
    st = stage_cls(cfg, tmp_path / stage, None, Console(quiet=True))
    st.world = (0, 1)
    st.prepare_data()
    model = st.build(acc)
    st.start(model, acc, {"step": 0, "examples": 0, "tokens": 0, **st.initial_state()})
    return st, model


def step_gradient(stage, model, micros) -> tuple[torch.Tensor, float]:
    model.zero_grad(set_to_none=True)
    loss = accumulate(stage, model, micros, stage.acc)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return grads, loss


def check_split_equals_whole(stage, model):
    micros = [stage.micro(idx) for idx in SPLIT]
    assert len({m.units for m in micros}) > 1  # the micro-batches hold different amounts of units
    g_split, loss_split = step_gradient(stage, model, micros)
    g_whole, loss_whole = step_gradient(stage, model, [stage.micro([i for idx in SPLIT for i in idx])])
    assert torch.allclose(g_split, g_whole, atol=1e-5, rtol=1e-4), (g_split - g_whole).abs().max()
    assert abs(loss_split - loss_whole) < 1e-5
    # the old per-micro-batch mean, averaged over the micro-batches, is a different number
    with torch.no_grad():
        means = [stage.loss(model, m).loss_sum.item() / m.units for m in micros]
    assert abs(sum(means) / len(means) - loss_whole) > 1e-4


def test_sft(tmp_path):
    from rlhf_cli.trainers.sft import SFTStage

    check_split_equals_whole(*build(SFTStage, "tldr_sft.yaml", "sft", tmp_path))



def test_reward_model(tmp_path):
    from rlhf_cli.trainers.train_rm import RewardModelStage

    check_split_equals_whole(*build(RewardModelStage, "tldr_rm.yaml", "train-rm", tmp_path))



def test_dpo(sft_ckpt, tmp_path):
    from rlhf_cli.trainers.dpo import DPOStage

    stage, model = build(DPOStage, "tldr_dpo.yaml", "dpo", tmp_path, policy=sft_ckpt)
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy off the reference: at the reference every pair's loss is log 2
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    check_split_equals_whole(stage, model)


def test_ilql(sft_ckpt, tmp_path):
    from rlhf_cli.trainers.ilql import ILQLStage

    check_split_equals_whole(*build(ILQLStage, "tldr_ilql.yaml", "ilql", tmp_path, policy=sft_ckpt))


def test_ppo(sft_ckpt, tmp_path):
    from rlhf_cli.trainers.ppo import PPOStage

    stage, model = build(PPOStage, "tldr_ppo.yaml", "ppo", tmp_path, policy=sft_ckpt,
                         **{"reward.fn": "rlhf_cli.data.synthetic:gold_reward_fn", "ppo.num_rollouts": 16,
                            "ppo.chunk_size": 16, "ppo.generation.max_new_tokens": 8, "ppo.num_layers_unfrozen": -1})
    stage.progress = common.progress_bar(Console(quiet=True), False)
    stage.experience = stage.collect(stage.state)  # one iteration's rollouts, advantages and returns
    check_split_equals_whole(stage, model)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])  # units: tokens, completions, completions
def test_grpo(loss_type, sft_ckpt, tmp_path):
    from rlhf_cli.trainers.grpo import GRPOStage

    stage, model = build(GRPOStage, "tldr_grpo.yaml", "grpo", tmp_path, policy=sft_ckpt,
                         **{"reward.fn": "rlhf_cli.data.synthetic:gold_reward_fn", "reward.delta": False,
                            "grpo.num_rollouts": 16, "grpo.num_generations": 4, "grpo.chunk_size": 4,
                            "grpo.generation.max_new_tokens": 8, "grpo.loss_type": loss_type})
    stage.progress = common.progress_bar(Console(quiet=True), False)
    stage.experience = stage.collect(stage.state)  # one iteration's groups
    # the micro policy's gibberish scores 0 with the gold scorer, so every group's advantages are 0: give some
    stage.experience.advantages = torch.randn(16, generator=torch.Generator().manual_seed(0))
    check_split_equals_whole(stage, model)


if __name__ == "__main__":
    pytest.main([__file__])
