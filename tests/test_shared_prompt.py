"""Prefix sharing must compute what the plain concatenated forward computes: the same completion
log-probs and rewards, and the same gradients, whatever the padding, in every family (sliding-window
attention over fewer tokens than the prompts where a family has it). The fast suite checks GPT-2, OPT
(learned positions) and Gemma 3 (sliding window); `make test-slow` every family of tests/tiny_families.py."""

import pytest
import tiny_families
import torch

from rlhf_cli import shared_prompt
from rlhf_cli.data.tokenize import collate_sft
from rlhf_cli.losses.dpo import sequence_logps
from rlhf_cli.models import disable_dropout, sequence_rewards

PAD = 0
FAST = {"gpt2", "opt", "gemma3"}
FAMILIES = [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in tiny_families.ALL]


def _model(family: str, head: str, **kw):
    model = tiny_families.build(family, head, vocab_size=50, bos=1, eos=1, pad=PAD,
                                **{**tiny_families.SLIDING.get(family, {}), **kw})
    disable_dropout(model)  # training mode (gradients are compared) without its noise
    return model


def _grads(model) -> dict:
    """Gradients by parameter name; a vision tower that text never reaches has none."""
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


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


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_logps_and_gradients_equal_the_concatenated_forward(family):
    groups, lens = _groups()
    model = _model(family, "causal")
    # reference: every sequence whole, prompt tokens masked out of the labels
    feats = [{"input_ids": s, "labels": [-100] * n + s[n:]} for g, n in zip(groups, lens) for s in g]
    b = collate_sft(feats, PAD)
    want, want_n = sequence_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["labels"])
    want.sum().backward()
    want_grad = _grads(model)
    model.zero_grad()

    got, got_n = shared_prompt.completion_logps(model, shared_prompt.split(groups, lens, PAD))
    got.sum().backward()
    assert torch.equal(got_n, want_n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _grads(model).keys() == want_grad.keys()
    for k, p in model.named_parameters():
        if k in want_grad:
            torch.testing.assert_close(p.grad, want_grad[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_rewards_and_gradients_equal_the_concatenated_forward(family):
    groups, lens = _groups()
    model = _model(family, "reward")
    seqs = [s for g in groups for s in g]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    want = sequence_rewards(model, ids, mask)
    (want * torch.arange(1.0, 7.0)).sum().backward()
    want_grad = _grads(model)
    model.zero_grad()

    got = shared_prompt.completion_rewards(model, shared_prompt.split(groups, lens, PAD))
    (got * torch.arange(1.0, 7.0)).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _grads(model).keys() == want_grad.keys()
    for k, p in model.named_parameters():
        if k in want_grad:
            torch.testing.assert_close(p.grad, want_grad[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("family", ["gpt2", "opt"])  # learned positions: one past the last is an index error
def test_padding_never_runs_past_the_models_positions(family):
    # a long prompt with a short completion beside a short prompt with a long one: the first row's
    # padding would sit at positions beyond the model's 12
    model = _model(family, "causal", **tiny_families.positions(family, 12))
    groups = [[[1] * 9 + [2, 3], [1] * 9 + [4]], [[5, 6] + [7] * 10, [5, 6, 8]]]
    logps, n = shared_prompt.completion_logps(model, shared_prompt.split(groups, [9, 2], PAD))
    assert n.tolist() == [2, 1, 10, 1] and torch.isfinite(logps).all()


def test_grpo_groups_run_once_give_the_response_logits_of_the_whole_sequences():
    """GRPO's micro-batch of whole groups: PolicyOnly's shared forward equals rollouts.response_outputs on the
    left-padded queries and right-padded responses, at every real response token; and sampling G responses
    from one prefill equals sampling each copy of the prompt."""
    from rlhf_cli.config import GenerationConfig
    from rlhf_cli.heads import PolicyOnly
    from rlhf_cli.sampling import collate_responses, row_noise, sample
    from rlhf_cli.trainers.grpo import whole_groups
    from rlhf_cli.trainers.rollouts import response_outputs

    model = PolicyOnly(_model("gpt2", "causal"))
    queries = [p for p in PROMPTS for _ in range(2)]
    responses = [c for cs in COMPLETIONS for c in cs]
    assert whole_groups([2, 3, 0, 1], 2) and not whole_groups([1, 2], 2) and not whole_groups([0, 1, 2], 2)
    b = collate_responses(queries, responses, PAD, torch.device("cpu"))
    want, _ = response_outputs(model, b)
    s = shared_prompt.split([[p + c for c in cs] for p, cs in zip(PROMPTS, COMPLETIONS)], [len(p) for p in PROMPTS],
                            PAD)
    got, _ = model(shared=s)
    mask = b.mask.bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)

    class Tok:
        eos_token_id, pad_token_id = 1, PAD
    gen = GenerationConfig(max_new_tokens=5, do_sample=True)
    noise = row_noise([(0, 0, i, j) for i in range(3) for j in range(2)], 5)
    with torch.no_grad():
        one = sample(model.policy, Tok(), PROMPTS, gen, noise=noise, repeats=2)
        each = sample(model.policy, Tok(), queries, gen, noise=noise)
    assert one.responses == each.responses
    for a, c in zip(one.logprobs, each.logprobs):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
