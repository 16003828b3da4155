"""PPO's one-pass rollouts: the draw follows the distribution, filtering keeps what it should, and
the old log-probs and values that come with the samples are what a full forward pass computes, in every
family (with sliding-window attention over fewer tokens than a rollout where a family has it). The fast
suite checks GPT-2, OPT and Gemma 3; `make test-slow` every family of tests/tiny_families.py."""

import pytest
import tiny_families
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_cli import sampling
from rlhf_cli.config import GenerationConfig
from rlhf_cli.heads import PolicyWithValueHead
from rlhf_cli.losses.ppo import token_logprobs
from rlhf_cli.sampling import collate_responses
from rlhf_cli.trainers.rollouts import response_outputs


def test_draw_follows_the_probabilities_and_never_picks_an_impossible_token():
    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    n = 40000
    counts = torch.bincount(sampling.draw(p.repeat(n, 1)), minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 4 * sigma + 1e-9).all(), counts


def test_warpers_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))

    def kept(**kw):
        return torch.isfinite(sampling.warpers(**kw)(None, logits.clone()))[0].tolist()
    assert kept(top_k=2) == [False, True, False, True, False]
    # nucleus 0.8: 0.4 + 0.3 = 0.7 < 0.8, so 0.15 joins; 0.1 and 0.05 do not
    assert kept(top_p=0.8) == [False, True, False, True, True]
    assert kept(top_p=0.1) == [False, True, False, False, False]  # at least one
    assert len(sampling.warpers()) == 0  # temperature 1, no top-k, top-p 1: nothing to apply
    assert torch.allclose(sampling.warpers(temperature=2.0)(None, logits.clone()), logits / 2)


class _Tok:
    eos_token_id, pad_token_id = 1, 0


FAST = {"gpt2", "opt", "gemma3"}


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow)
                                    for f in tiny_families.ALL])
def test_logprobs_and_values_equal_a_forward_pass_over_the_samples(family):
    policy = tiny_families.build(family, vocab_size=40, bos=1, eos=1, pad=0, **tiny_families.SLIDING.get(family, {}))
    torch.manual_seed(0)
    core = PolicyWithValueHead(policy).eval()
    torch.nn.init.normal_(core.value_head[2].weight)  # non-zero values, so the check means something
    with torch.no_grad():
        # EOS's logit 0 whatever the state: about 1 in 40 a step, so of 24 rows some end early, some run 12 tokens
        core.policy.get_output_embeddings().weight[1] = 0
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]] * 8
    gen = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    s = sampling.sample(core.policy, _Tok(), prompts, gen, value_head=core.value_head)
    assert any(r[-1] == 1 for r in s.responses) and any(len(r) == 12 and 1 not in r for r in s.responses)
    b = collate_responses(prompts, s.responses, 0, "cpu")
    with torch.no_grad():
        logits, values = response_outputs(core, b)
        lp = token_logprobs(logits, b.responses)
    for j, r in enumerate(s.responses):
        assert 1 not in r[:-1]  # nothing after EOS
        torch.testing.assert_close(s.logprobs[j], lp[j, :len(r)], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.values[j], values[j, :len(r)], rtol=1e-4, atol=1e-5)


def test_sampling_stops_when_every_row_has_ended():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=1, n_head=4, pad_token_id=0)
    core = PolicyWithValueHead(GPT2LMHeadModel(cfg)).eval()
    calls = []
    core.policy.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        core.policy.lm_head.weight[1] += 100 * core.policy.lm_head.weight[1].sign()  # EOS almost surely
    gen = GenerationConfig(max_new_tokens=50, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    s = sampling.sample(core.policy, _Tok(), [[5, 6], [7, 8, 9]], gen, value_head=core.value_head)
    assert all(r[-1] == 1 for r in s.responses)
    assert len(calls) <= max(len(r) for r in s.responses) < 50  # no forward after the last EOS


def test_steered_logprobs_are_those_of_the_distribution_ilql_samples_from():
    """The KL of an ILQL checkpoint is that of what it samples: per response token, log-softmax of
    (log pi + beta * (min Q_target - V)) / temperature over the top-k tokens, recomputed here by hand with
    one full forward pass per prefix (no cache, no batching)."""
    from rlhf_cli.heads import ILQLHeads

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=0)
    policy = GPT2LMHeadModel(cfg).eval()
    heads = ILQLHeads(32, 40).eval()
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.5)  # Q and V far from 0, so the steering moves the distribution
    beta, temperature, top_k = 2.0, 0.7, 6
    steering = sampling.ilql_processors(heads, beta, temperature, top_k)
    queries = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    gen = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0)
    responses = sampling.sample(policy, _Tok(), queries, gen, processors=steering).responses
    responses[1] = responses[1][:2]  # a prefix of a sample is a sample too; its row is padded in the batch
    got = sampling.steered_sequence_logprobs(policy, steering, 0, queries, responses, 3, "cpu")
    want = []
    with torch.no_grad():
        for q, r in zip(queries, responses):
            total = 0.0
            for t, token in enumerate(r):
                out = policy(torch.tensor([q + r[:t]]), output_hidden_states=True)
                h, logits = out.hidden_states[-1][0, -1], out.logits[0, -1]
                qs = torch.stack([head(h) for head in heads.target_qs]).min(0).values
                s = (torch.log_softmax(logits, -1) + beta * (qs - heads.v(h).squeeze(-1))) / temperature
                s[s < s.topk(top_k).values[-1]] = -float("inf")
                total += torch.log_softmax(s, -1)[token].item()
            want.append(total)
    assert got == pytest.approx(want, abs=1e-4)
    # beta 0, temperature 1, no top-k: the LM's own log-probs
    plain = sampling.steered_sequence_logprobs(policy, sampling.ilql_processors(heads, 0.0, 1.0, 0), 0, queries,
                                               responses, 3, "cpu")
    assert plain == pytest.approx(sampling.sequence_logprobs(policy, 0, queries, responses, 3, "cpu"), abs=1e-5)
