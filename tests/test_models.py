import contextlib
import json

import pytest
import tiny_families
import torch

from rlhf_cli.config import TinyModelConfig
from rlhf_cli.errors import UserError
from rlhf_cli.models import (build_tiny, build_tiny_reward, checkpoint_kind, default_pad_id, disable_dropout,
                             freeze_bottom, frozen_block_count, last_token_index, max_positions, sequence_rewards,
                             train_tokenizer, transformer_blocks)


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


def test_a_family_without_split_modules_and_a_head_of_another_name():
    # CTRL names no decoder-layer class and calls its head `classifier`: blocks found from the structure,
    # the reward read through whatever head sits beside the base model
    from transformers import CTRLConfig, CTRLForSequenceClassification

    torch.manual_seed(0)
    model = CTRLForSequenceClassification(CTRLConfig(vocab_size=50, n_embd=32, n_layer=3, n_head=4, dff=64,
                                                     num_labels=1, pad_token_id=0)).eval()
    assert not model._no_split_modules
    assert transformer_blocks(model) is model.transformer.h
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=(ids != 0).long()).logits.squeeze(-1)
        torch.testing.assert_close(sequence_rewards(model, ids, (ids != 0).long()), hf)


def test_a_model_without_blocks_is_refused_in_one_sentence():
    with pytest.raises(UserError, match=r"^cannot find the transformer blocks of Linear: it has no list of layers"):
        transformer_blocks(torch.nn.Linear(2, 2))


def test_a_multimodal_causal_lm_is_a_policy_checkpoint(tmp_path):
    for archs, kind in [(["Gemma3ForConditionalGeneration"], "policy"), (["OPTForCausalLM"], "policy"),
                        (["Gemma3ForSequenceClassification"], "reward"), (["T5EncoderModel"], None)]:
        (tmp_path / "config.json").write_text(json.dumps({"architectures": archs}))
        assert checkpoint_kind(tmp_path) == kind, archs


def test_a_multimodal_models_pad_id_and_positions_are_its_text_models(tok):
    model = tiny_families.build(tiny_families.MULTIMODAL)
    model.config.text_config.pad_token_id = None
    default_pad_id(model, tok)
    assert model.config.get_text_config().pad_token_id == tok.pad_token_id
    assert max_positions(model) == 256


def test_disable_dropout_also_turns_off_dropout_kept_as_a_number():
    # OPT applies dropout and layer drop through functional calls with rates kept on the modules
    model = tiny_families.build("opt", dropout=0.5, layerdrop=0.5).train()
    ids = torch.tensor([[3, 4, 5, 6]])
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    disable_dropout(model)
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_heads_read_the_width_of_the_final_hidden_state():
    # OPT-350m's shape: 32-wide blocks projected out to 16 before the LM head; the value and ILQL heads read
    # the final hidden state, 16 wide
    from rlhf_cli.heads import PolicyWithValueHead, hidden_size

    model = tiny_families.build("opt_projected")
    ids, mask = torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long)
    width = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].shape[-1]
    assert hidden_size(model) == hidden_size(model.config) == width == 16
    _, values = PolicyWithValueHead(model)(ids, mask, num_logits=2)
    assert values.shape == (1, 2)


@pytest.mark.parametrize("family", tiny_families.ALL)
def test_forward_with_hidden_is_the_last_of_output_hidden_states_at_the_kept_positions(family):
    from rlhf_cli.models import forward_with_hidden

    model = tiny_families.build(family).eval()
    ids = torch.randint(2, 300, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        for keep in (0, 3):  # 0: every position
            out, hidden = forward_with_hidden(model, input_ids=ids, use_cache=False, logits_to_keep=keep)
            want = ref.hidden_states[-1][:, -keep:] if keep else ref.hidden_states[-1]
            assert hidden.shape == want.shape
            assert torch.equal(hidden, want)  # the very tensor, not a recomputation
            torch.testing.assert_close(out.logits, ref.logits[:, -keep:] if keep else ref.logits)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is gone


@pytest.mark.parametrize("padded", [True, False])  # False: transformers passes no mask, the causal one is built
@pytest.mark.parametrize("family", tiny_families.ALL)
def test_tail_only_leaves_the_kept_logits_and_every_gradient_and_runs_the_last_block_on_them_alone(family, padded):
    """The last block's queries, attention, output projection and MLP on the kept positions only: the same
    logits there and the same parameter gradients (of a loss on them) as the whole forward, to float rounding;
    each of those parts sees only the kept rows, and everything is as before once the context has ended."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as registry

    from rlhf_cli.models import position_ids, tail_only, transformer_blocks

    model = tiny_families.build(family).eval()
    ids = torch.randint(2, 300, (2, 9))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0  # a left-padded row
    keep = 3

    def run(tail: bool):
        model.zero_grad()
        with tail_only(model, keep) if tail else contextlib.nullcontext():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                           logits_to_keep=keep).logits
        (logits.float().log_softmax(-1)[..., :5] * torch.arange(5.0)).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_grads = run(False)
    block = transformer_blocks(model)[-1]
    attn = next(getattr(block, n) for n in ("self_attn", "attn", "attention") if hasattr(block, n))
    parts = {n: m for n, m in [("mlp", getattr(block, "mlp", None)), *((n, getattr(attn, n, None)) for n in
                                                                       ("q_proj", "o_proj", "c_proj", "dense", "out_proj"))]
             if m is not None}
    rows = {n: [] for n in parts}
    spies = [m.register_forward_hook(lambda _m, _a, out, n=n: rows[n].append(out.shape[1])) for n, m in parts.items()]
    # registered before tail_only's hooks: they see what each part itself gets and returns
    sdpa, query_rows = registry["sdpa"], []

    def spy(module, query, *args, **kwargs):
        if module is attn:
            query_rows.append(query.shape[2])
        return sdpa(module, query, *args, **kwargs)

    registry["sdpa"] = spy
    try:
        tail, tail_grads = run(True)
    finally:
        registry["sdpa"] = sdpa
    torch.testing.assert_close(tail, whole, atol=1e-5, rtol=1e-5)
    assert tail_grads.keys() == whole_grads.keys()
    for name, g in whole_grads.items():
        torch.testing.assert_close(tail_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    for s in spies:
        s.remove()
    assert {n: r for n, r in rows.items()} == {n: [keep] for n in parts}  # 9 positions in, 3 through each
    assert ("mlp" in parts) == (family not in ("opt", "opt_projected"))  # OPT's fc1/fc2: left as they are
    assert ("q_proj" in parts) == (family not in ("gpt2", "gpt_neox"))  # their fused QKV: left as it is
    assert query_rows == ([keep] if attn.config._attn_implementation == "sdpa" else [])
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in parts.values())  # tail_only's are gone
    assert registry["sdpa"] is sdpa


def test_tail_only_is_a_no_op_where_the_backward_pass_recomputes_the_block():
    """Gradient checkpointing reruns the block in the backward pass, after tail_only's hooks are gone: the
    forward then runs whole, and the gradients are the plain ones."""
    from rlhf_cli.models import tail_only, transformer_blocks
    from rlhf_cli.trainers.common import checkpoint_activations

    model = tiny_families.build("llama").train()
    ids = torch.randint(2, 300, (2, 9))
    plain = model(input_ids=ids, use_cache=False, logits_to_keep=2).logits.sum()
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    checkpoint_activations(model)
    rows = []
    transformer_blocks(model)[-1].mlp.register_forward_hook(lambda _m, _a, out: rows.append(out.shape[1]))
    with tail_only(model, 2):
        loss = model(input_ids=ids, use_cache=False, logits_to_keep=2).logits.sum()
    loss.backward()
    assert rows and set(rows) == {9}  # whole (and so is a recomputation, where one calls the MLP's hooks)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])  # gemma3: sliding-window layers beside full ones
def test_a_reserved_cache_decodes_as_a_dynamic_one_writing_in_place(family):
    """`new_cache(model, reserve=n)`: the same logits, step by step, as transformers' concatenating cache; after the
    prefill, its full-attention layers' keys stay views of one buffer (no copy of the cache per token), and a
    batch repeat (GRPO's groups) or a crop still work."""
    from transformers.cache_utils import DynamicLayer

    from rlhf_cli.models import new_cache, with_cache

    mixed = {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]} if family == "gemma3" else {}
    model = tiny_families.build(family, **mixed).eval()
    ids = torch.randint(2, 300, (2, 6))
    steps = torch.randint(2, 300, (2, 4))

    def decode(cache, repeat=1):
        with torch.no_grad():
            out = [model(input_ids=ids, use_cache=True, **with_cache(model, cache)).logits[:, -1].repeat_interleave(repeat, 0)]
            if repeat > 1:
                cache.batch_repeat_interleave(repeat)
            for t in range(steps.shape[1]):
                x = steps[:, t: t + 1].repeat_interleave(repeat, 0)
                out.append(model(input_ids=x, use_cache=True, **with_cache(model, cache)).logits[:, -1])
                ptrs.append([layer.keys.data_ptr() for layer in cache.layers])
        return torch.stack(out, 1)

    for repeat in (1, 2):
        ptrs = []
        want = decode(new_cache(model), repeat)
        ptrs = []
        reserved = new_cache(model, reserve=steps.shape[1])
        torch.testing.assert_close(decode(reserved, repeat), want, atol=1e-6, rtol=1e-5)
        full = [i for i, layer in enumerate(reserved.layers) if type(layer).__name__ == "ReservedLayer"]
        assert len(full) == sum(type(layer) is DynamicLayer for layer in new_cache(model).layers)
        assert full and all(len({p[i] for p in ptrs}) == 1 for i in full)  # one buffer from the first step on
    if family == "gemma3":  # transformers' sliding-window layers crop only with their past recorded
        return
    length = reserved.get_seq_length()
    reserved.crop(-2)
    assert reserved.get_seq_length() == length - 2
    kept = torch.cat([ids, steps[:, : steps.shape[1] - 2], steps[:, :1]], 1).repeat_interleave(2, 0)
    with torch.no_grad():  # writes where the crop left off: the same logits as the whole sequence without a cache
        got = model(input_ids=kept[:, -1:], use_cache=True, **with_cache(model, reserved)).logits[:, -1]
        want = model(input_ids=kept, use_cache=False).logits[:, -1]
    assert reserved.get_seq_length() == length - 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tail_only_in_threads_cuts_only_its_own_threads_queries_and_restores_the_attention_function():
    """Two threads' tail_only contexts on one model, closed in the order they were not opened: a plain forward
    in a third thread meanwhile is the whole one, and transformers' sdpa function is back once both are closed."""
    import threading

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as registry

    from rlhf_cli.models import tail_only

    model = tiny_families.build("llama").eval()
    ids = torch.randint(2, 300, (2, 9))
    sdpa = registry["sdpa"]
    with torch.no_grad():
        whole = model(input_ids=ids, use_cache=False).logits
    opened = [threading.Event(), threading.Event()]
    close = [threading.Event(), threading.Event()]
    got = {}

    def hold(i):
        with torch.no_grad(), tail_only(model, 2):
            opened[i].set()
            close[i].wait(30)

    threads = [threading.Thread(target=hold, args=(i,)) for i in (0, 1)]
    for t, e in zip(threads, opened):
        t.start()
        assert e.wait(30)
    # module hooks are the model's, seen by every thread; the attention rows are cut per thread: a third
    # thread's forward attends from every row (the hooks' rows are the only ones it reads at the tail)
    third = threading.Thread(target=lambda: got.update(
        tail=model(input_ids=ids, use_cache=False, logits_to_keep=2).logits.detach()))
    third.start()
    third.join(30)
    close[0].set()  # the first opened closes first
    threads[0].join(30)
    assert registry["sdpa"] is not sdpa  # the second is still open
    close[1].set()
    threads[1].join(30)
    assert registry["sdpa"] is sdpa
    torch.testing.assert_close(got["tail"], whole[:, -2:], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, whole)  # nothing left behind
