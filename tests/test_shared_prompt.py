"""Prefix sharing must compute what the plain concatenated forward computes: the same completion
log-probs and rewards, and the same gradients, whatever the padding."""

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from rlhf_cli import shared_prompt
from rlhf_cli.data.tokenize import collate_sft
from rlhf_cli.losses.dpo import sequence_logps
from rlhf_cli.models import sequence_rewards

PAD = 0


def _model(cls):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=PAD,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1)
    return cls(cfg)


# prompts of different lengths, completions of different lengths (padding on both sides)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26]]
COMPLETIONS = [([30, 31, 32], [33]), ([34, 35], [36, 37, 38, 39, 40]), ([41], [42, 43])]


def _groups():
    return [[p + c for c in cs] for p, cs in zip(PROMPTS, COMPLETIONS)], [len(p) for p in PROMPTS]


def test_split_refuses_groups_that_do_not_share_their_prompt():
    groups, lens = _groups()
    assert shared_prompt.split(groups, lens, PAD) is not None
    assert shared_prompt.split([[[1, 2, 3], [1, 9, 3]]], [2], PAD) is None  # different prompts
    assert shared_prompt.split([[[1, 2], [1, 2, 3]]], [2], PAD) is None  # an empty completion
    assert shared_prompt.split([[[1, 2], [1, 3]]], [0], PAD) is None  # no prompt


def test_completion_logps_and_gradients_equal_the_concatenated_forward():
    groups, lens = _groups()
    model = _model(GPT2LMHeadModel)
    # reference: every sequence whole, prompt tokens masked out of the labels
    feats = [{"input_ids": s, "labels": [-100] * n + s[n:]} for g, n in zip(groups, lens) for s in g]
    b = collate_sft(feats, PAD)
    want, want_n = sequence_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["labels"])
    want.sum().backward()
    want_grad = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    got, got_n = shared_prompt.completion_logps(model, shared_prompt.split(groups, lens, PAD))
    got.sum().backward()
    assert torch.equal(got_n, want_n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grad[k], rtol=1e-4, atol=1e-6, msg=k)


def test_completion_rewards_and_gradients_equal_the_concatenated_forward():
    groups, lens = _groups()
    model = _model(GPT2ForSequenceClassification)
    seqs = [s for g in groups for s in g]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    want = sequence_rewards(model, ids, mask)
    (want * torch.arange(1.0, 7.0)).sum().backward()
    want_grad = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    got = shared_prompt.completion_rewards(model, shared_prompt.split(groups, lens, PAD))
    (got * torch.arange(1.0, 7.0)).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grad[k], rtol=1e-4, atol=1e-6, msg=k)


def test_padding_never_runs_past_the_models_positions():
    # a long prompt with a short completion beside a short prompt with a long one: the first row's
    # padding would sit at positions beyond n_positions
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=12, n_embd=16, n_layer=1, n_head=2, pad_token_id=PAD)
    model = GPT2LMHeadModel(cfg)
    groups = [[[1] * 9 + [2, 3], [1] * 9 + [4]], [[5, 6] + [7] * 10, [5, 6, 8]]]
    logps, n = shared_prompt.completion_logps(model, shared_prompt.split(groups, [9, 2], PAD))
    assert n.tolist() == [2, 1, 10, 1] and torch.isfinite(logps).all()
