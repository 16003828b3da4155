import pytest
import torch

from rlhf_cli.config import TinyModelConfig
from rlhf_cli.models import (build_tiny, build_tiny_reward, freeze_bottom, frozen_block_count, last_token_index,
                             sequence_rewards, train_tokenizer)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["my roommate broke my laptop and then some more words here"] * 50, 300, 64)


def tiny(n_layer=4):
    return TinyModelConfig(n_layer=n_layer, n_embd=32, n_head=2, n_positions=64)


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


def test_reward_is_the_same_under_left_and_right_padding_and_matches_plain_hf(tok):
    model = build_tiny_reward(tiny(2), tok, seed=0).eval()
    seqs = [tok("my roommate broke")["input_ids"], tok("my laptop")["input_ids"]]
    pad = tok.pad_token_id
    w = max(map(len, seqs))
    right = torch.tensor([s + [pad] * (w - len(s)) for s in seqs])
    left = torch.tensor([[pad] * (w - len(s)) + s for s in seqs])
    mask_r, mask_l = (right != pad).long(), (left != pad).long()
    # position ids follow the real tokens under left padding, as generation does
    with torch.no_grad():
        r_right = sequence_rewards(model, right, mask_r)
        alone = torch.stack([sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in seqs])
        hf = model(input_ids=right, attention_mask=mask_r).logits.squeeze(-1)  # HF pools by pad_token_id
    assert torch.allclose(r_right, alone, atol=1e-5, rtol=0)
    assert torch.allclose(r_right, hf, atol=1e-5, rtol=0)
    assert (last_token_index(mask_l) == w - 1).all()


def test_freezing_leaves_exactly_the_top_blocks_and_head_trainable(tok):
    rm = build_tiny_reward(tiny(4), tok, seed=0)
    n = frozen_block_count(rm, 0.7)
    assert n == 2  # int(0.7 * 4)
    freeze_bottom(rm, n)
    trainable = {name for name, p in rm.named_parameters() if p.requires_grad}
    expected = {name for name, _ in rm.named_parameters()
                if name.startswith(("transformer.h.2.", "transformer.h.3.", "transformer.ln_f.", "score."))}
    assert trainable == expected


def test_freezing_a_policy_freezes_its_tied_head(tok):
    policy = build_tiny(tiny(3), tok, seed=0)
    freeze_bottom(policy, 2)
    assert not policy.lm_head.weight.requires_grad  # tied to the frozen input embedding
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("transformer.h.2.", "transformer.ln_f.")) for n in trainable)


def test_no_freezing_when_fraction_is_zero(tok):
    rm = build_tiny_reward(tiny(4), tok, seed=0)
    freeze_bottom(rm, frozen_block_count(rm, 0.0))
    assert all(p.requires_grad for p in rm.parameters())
