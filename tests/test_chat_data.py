"""TRL's dataset formats, standard and conversational: detection, chat-template rendering, the SFT loss mask
over assistant turns only, BOS once, and one sentence for each kind of bad conversational input."""

import json

import pytest
from conftest import MICRO, SFT_CONFIG, SHARED, run_cli

from rlhf_cli.data import chat, formats
from rlhf_cli.data.tokenize import IGNORE_INDEX, chat_features, encode_prompt, sft_features
from rlhf_cli.errors import UserError

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-3 style: the template writes BOS itself
WITH_BOS = "{{ bos_token }}" + CHATML


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    """The real GPT-2 tokenizer with ChatML's two special tokens and template, EOS = <|im_end|>."""
    from transformers import AutoTokenizer

    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent")
    t = AutoTokenizer.from_pretrained(SHARED / "gpt2_tokenizer")
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.eos_token, t.chat_template = "<|im_end|>", CHATML
    t.pad_token = "<|endoftext|>"
    return t


@pytest.fixture(scope="module")
def bos_tok():
    """A tokenizer that starts every sequence with BOS, as Llama's does (GPT-2's vocabulary, <s> added)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent")
    t = AutoTokenizer.from_pretrained(SHARED / "gpt2_tokenizer")
    t.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    bos = t.convert_tokens_to_ids("<s>")
    t._tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    t.eos_token, t.chat_template, t.pad_token = "<|im_end|>", WITH_BOS, "<|endoftext|>"
    assert t("hi")["input_ids"][0] == bos and t("hi", add_special_tokens=False)["input_ids"][0] != bos
    return t


def render(t):
    return chat.from_tokenizer(t, "test")


def test_the_loss_covers_exactly_the_assistant_turns_of_a_multi_turn_chat(tok):
    messages = [{"role": "system", "content": "Be brief."}, user("Hi there"), assistant("Hello!"),
                user("What is 2+2?"), assistant("It is 4.")]
    segments = render(tok).segments(messages, "row 0")
    f = chat_features(tok, segments, 512)
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(f["input_ids"]) == whole  # the pieces are the template's text, nothing lost or added
    trained = [i for i, label in zip(f["input_ids"], f["labels"]) if label != IGNORE_INDEX]
    # worked out by hand from the template: each reply, then its end-of-turn token and newline
    assert tok.decode(trained) == "Hello!<|im_end|>\nIt is 4.<|im_end|>\n"
    runs = "".join("x" if label != IGNORE_INDEX else "." for label in f["labels"])
    assert runs.count(".x") == 2 and runs.startswith(".")  # two separate assistant spans, prompt first


def test_bos_appears_once_in_plain_and_in_chat_templated_text(bos_tok):
    bos = bos_tok.bos_token_id
    plain = sft_features(bos_tok, "Question: why?", " Because.", 64, 32)
    assert plain["input_ids"][0] == bos and plain["input_ids"].count(bos) == 1
    text_only = sft_features(bos_tok, "", "Some text.", 64, 32)
    assert text_only["input_ids"][0] == bos and text_only["input_ids"].count(bos) == 1
    assert text_only["labels"][0] == IGNORE_INDEX
    messages = [user("Hi"), assistant("Hello!")]
    f = chat_features(bos_tok, render(bos_tok).segments(messages, "row 0"), 64)
    assert f["input_ids"][0] == bos and f["input_ids"].count(bos) == 1  # the template wrote it: no second
    prompt = render(bos_tok).prompt([user("Hi")])
    ids, _ = encode_prompt(bos_tok, prompt, 64)
    assert ids[0] == bos and ids.count(bos) == 1


def test_a_long_chat_prompt_keeps_bos_its_latest_turns_and_the_generation_prompt(bos_tok):
    prompt = render(bos_tok).prompt([user("old " * 200), assistant("ok"), user("the latest question")])
    ids, cut = encode_prompt(bos_tok, prompt, 32)
    text = bos_tok.decode(ids)
    assert cut and len(ids) == 32 and ids[0] == bos_tok.bos_token_id
    assert text.endswith("the latest question<|im_end|>\n<|im_start|>assistant\n"), text


def test_eos_is_not_doubled_after_a_template_that_ends_the_turn_with_it(tok):
    prompt, reply = render(tok).reply([user("Hi")], [assistant("Hello!")], "row 0")
    f = sft_features(tok, prompt, reply, 64, 32)
    # one <|im_end|> closes the user turn, one the reply: none appended after the template's own
    assert f["input_ids"].count(tok.eos_token_id) == 2
    assert tok.decode(f["input_ids"]).endswith("Hello!<|im_end|>\n")
    plain = sft_features(tok, "Q:", " A.", 64, 32)  # standard text still gets its EOS
    assert plain["input_ids"][-1] == tok.eos_token_id


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


# TRL's formats (https://huggingface.co/docs/trl/dataset_formats), one row each, and what each becomes
FORMATS = {
    "language_modeling": ({"text": "The sky is blue."}, "text"),
    "conversational_language_modeling": ({"messages": [user("Hi"), assistant("Hello")]}, "completion"),
    "prompt_only": ({"prompt": "The sky is"}, "prompt"),
    "conversational_prompt_only": ({"prompt": [user("What color is the sky?")]}, "prompt"),
    "prompt_completion": ({"prompt": "The sky is", "completion": " blue."}, "completion"),
    "conversational_prompt_completion": ({"prompt": [user("Color?")], "completion": [assistant("Blue.")]},
                                         "completion"),
    "preference": ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "comparisons"),
    "conversational_preference": ({"prompt": [user("Color?")], "chosen": [assistant("Blue.")],
                                   "rejected": [assistant("Green.")]}, "comparisons"),
    "implicit_prompt_preference": ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "hh"),
    "conversational_implicit_prompt_preference": ({"chosen": [user("Color?"), assistant("Blue.")],
                                                   "rejected": [user("Color?"), assistant("Green.")]}, "comparisons"),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_trl_format_is_detected_and_rendered(name, tok, tmp_path):
    from rlhf_cli.config import DataConfig
    from rlhf_cli.data.sources import load_formatted

    row, expected = FORMATS[name]
    path = _write(tmp_path, "d.jsonl", [row] * 4)
    split, fmt = load_formatted(DataConfig(source=str(path)), "sft", 0, chat=lambda: render(tok))
    assert fmt == expected, fmt
    rendered = split.train[0]
    if "conversational" in name and "prompt" in rendered:
        assert rendered["prompt"].endswith("<|im_start|>assistant\n")  # a prompt ends with the generation prompt
    if expected in ("comparisons", "hh"):
        pairs, bad, _ = formats.pair_examples(split.train, expected)
        assert not bad and pairs[0].prompt and pairs[0].chosen.strip(" ").startswith(
            "Blue" if "conversational" in name else "blue")


def test_a_preference_pair_shares_one_rendered_prompt(tok):
    row = {"chosen": [user("Color?"), assistant("Blue.")], "rejected": [user("Color?"), assistant("Green.")]}
    out = chat.render_rows([row], "hh", render(tok), "d", "training")[0]
    assert out == {"prompt": "<|im_start|>user\nColor?<|im_end|>\n<|im_start|>assistant\n",
                   "chosen": "Blue.<|im_end|>\n", "rejected": "Green.<|im_end|>\n"}


BAD = {
    "no_assistant_turn": ([{"messages": [user("Hi"), user("Anyone?")]}], True,
                          r"training row 0 of .*: the conversation in 'messages' has no assistant turn"),
    "unknown_role": ([{"messages": [user("Hi"), {"role": "bot", "content": "Hello"}]}], True,
                     r"message 1 of 'messages' has the unknown role 'bot' \(roles: system, developer, user"),
    # the tiny model's own tokenizer renders with ChatML; GPT-2's real tokenizer has no template
    "no_template": ([{"messages": [user("Hi"), assistant("Hello")]}], False,
                    r"the data is conversational but the tokenizer of .*gpt2_tokenizer has no chat template; give one "
                    r"with --set data.chat_template=FILE.jinja"),
    "mixed_formats": ([{"prompt": "a", "completion": "b"}] * 3 + [{"text": "c"}], False,
                      r"training row 3 of .* is in text format \(text\) but the file's first rows are in completion format; "
                      r"one file holds one format"),
    "mixed_conversational": ([{"messages": [user("Hi"), assistant("Hello")]}] * 3 + [{"messages": "Hi"}], True,
                             r"training row 3 of .* holds text where training row 0 holds a conversation; one file holds one format"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_conversational_input_is_one_sentence_and_writes_nothing(case, tmp_path):
    rows, template, pattern = BAD[case]
    data = _write(tmp_path, "d.jsonl", rows * 8)
    if case.startswith("mixed"):  # the odd row last
        data = _write(tmp_path, "d.jsonl", rows[:-1] * 8 + rows[-1:])
        pattern = pattern.replace("training row 3", r"(training|held-out) row \d+")  # numbered within its split
    (tmp_path / "t.jinja").write_text(CHATML)
    extra = ["--set", f"data.chat_template={tmp_path / 't.jinja'}"] if template else []
    if case == "no_template":
        extra = ["--set", f"tokenizer.name_or_path={SHARED / 'gpt2_tokenizer'}"]
    from conftest import assert_one_sentence

    r = run_cli("sft", "--config", SFT_CONFIG, *MICRO, "--data", str(data), "--output-dir", str(tmp_path / "out"), *extra)
    assert_one_sentence(r, pattern)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_chat_template_file_is_saved_with_the_trained_tokenizer(tmp_path):
    """data.chat_template supplies a template the tiny tokenizer lacks; the checkpoint carries it, so later
    stages (and plain transformers) render prompts the way the policy was trained."""
    from transformers import AutoTokenizer

    rows = [{"messages": [user(f"Say {w}."), assistant(f"{w} {w}.")]} for w in ("red", "green", "blue", "cyan") * 12]
    data = _write(tmp_path, "d.jsonl", rows)
    (tmp_path / "t.jinja").write_text(CHATML)
    r = run_cli("sft", "--config", SFT_CONFIG, *MICRO, "--data", str(data), "--output-dir", str(tmp_path / "out"),
                "--set", f"data.chat_template={tmp_path / 't.jinja'}", "--set", "data.max_length=48",
                "--set", "data.max_prompt_length=32")
    assert r.exit_code == 0, r.output
    assert "conversational rows rendered by the chat template of" in r.output
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.chat_template == CHATML


def test_implicit_prompt_of_standard_pairs_is_their_common_beginning():
    pairs, bad, _ = formats.pair_examples([{"chosen": "The sky is blue today.", "rejected": "The sky is black."}], "hh")
    assert not bad and (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("The sky is", " blue today.", " black.")
    with pytest.raises(UserError, match="'chosen' and 'rejected' differ before their last reply"):
        chat.render_rows([{"chosen": [user("A?"), assistant("x")], "rejected": [user("B?"), assistant("y")]}], "hh",
                         chat.renderer(CHATML, {}, "t"), "d", "training")


def test_a_glob_of_shards_and_an_arrow_file_are_sources(tmp_path):
    """Hub-style shards (`train-0000N-of-0000M.parquet`, `data-0000N.arrow` as `save_to_disk` writes them)."""
    import datasets

    from rlhf_cli.config import DataConfig
    from rlhf_cli.data.sources import load_source

    rows = [{"messages": [user(f"Q{i}"), assistant(f"A{i}")]} for i in range(40)]
    for k in range(2):
        datasets.Dataset.from_list(rows[k * 20:(k + 1) * 20]).to_parquet(tmp_path / f"train-0000{k}-of-00002.parquet")
    split = load_source(DataConfig(source=str(tmp_path / "train-*.parquet"), eval_fraction=0.1), "sft", 0)
    assert len(split.train) + len(split.eval) == 40 and len(split.eval) == 4
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    split = load_source(DataConfig(source=str(arrow)), "sft", 0)
    assert split.train[0]["messages"][0]["content"].startswith("Q")
    with pytest.raises(UserError, match=r"matches no \.json/\.jsonl/\.parquet/\.csv/\.arrow file"):
        load_source(DataConfig(source=str(tmp_path / "nothing-*.parquet")), "sft", 0)


def test_the_synthetic_task_as_conversational_rows_keeps_its_gold_scorer(tok):
    from rlhf_cli.config import DataConfig
    from rlhf_cli.data import synthetic
    from rlhf_cli.data.sources import load_formatted

    cfg = DataConfig(source="synthetic:tldr", synthetic={"num_train": 8, "num_eval": 2, "conversational": True})
    split, fmt = load_formatted(cfg, "sft", 0, chat=lambda: render(tok))
    assert fmt == "completion"
    row = split.train[0]
    assert row["prompt"].startswith("<|im_start|>user\nSUBREDDIT:") and row["prompt"].endswith("<|im_start|>assistant\n")
    plain = synthetic.generate("tldr", 10, 0)[0]
    assert synthetic.gold_score(row["prompt"], plain["label"]) == synthetic.gold_score(plain["prompt"], plain["label"])
    pairs, fmt = load_formatted(cfg, "pairs", 0, chat=lambda: render(tok))
    assert fmt == "comparisons" and pairs.train[0]["chosen"].endswith("<|im_end|>\n")


def test_rouge_reads_a_rendered_reference_as_the_completion_was_decoded(tok):
    from rlhf_cli.metrics import rouge

    reference = render(tok).reply([user("Hi")], [assistant("my cousin stole my watch.")], "row 0")[1]
    assert reference == "my cousin stole my watch.<|im_end|>\n"
    assert rouge(["my cousin stole my watch."], [reference], tok)["rouge1"] == 1.0
    assert rouge(["my cousin stole my watch."], [reference])["rouge1"] < 1.0  # "im", "end" counted as missed words
