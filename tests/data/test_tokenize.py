
import pytest

from rlhf_cli.data.formats import sft_examples, split_hh
from rlhf_cli.data.tokenize import IGNORE_INDEX, collate_sft, encode_prompt, sft_features
from rlhf_cli.models import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = ["SUBREDDIT: r/tifu\nTITLE: a b\nPOST: one two three four five six seven eight nine ten\nTL;DR: sum",
             "\n\nHuman: old turn\n\nAssistant: old reply\n\nHuman: new question\n\nAssistant: answer"] * 50
    return train_tokenizer(texts, vocab_size=300, model_max_length=128)


def test_prompt_tokens_are_masked_and_eos_is_learned(tok):
    f = sft_features(tok, "POST: one two\nTL;DR:", " sum", max_length=64, max_prompt_length=32)
    n_prompt = len(tok("POST: one two\nTL;DR:")["input_ids"])
    assert f["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:]
    assert f["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(f["input_ids"][n_prompt:-1]) == " sum"


def test_whole_text_examples_train_every_token(tok):
    f = sft_features(tok, "", "one two three", max_length=64, max_prompt_length=32)
    assert IGNORE_INDEX not in f["labels"]


def test_truncation_keeps_the_tldr_separator_and_the_start_of_the_post(tok):
    prompt = "SUBREDDIT: r/tifu\nTITLE: a b\nPOST: " + " ".join(["one two three"] * 30) + "\nTL;DR:"
    ids, cut = encode_prompt(tok, prompt, 20)
    assert cut and len(ids) == 20
    text = tok.decode(ids)
    assert text.endswith("TL;DR:") and text.startswith("SUBREDDIT: r/tifu")


def test_truncation_keeps_the_last_dialogue_turn(tok):
    prompt = "\n\nHuman: " + "old turn " * 40 + "\n\nAssistant: old reply\n\nHuman: new question\n\nAssistant:"
    ids, cut = encode_prompt(tok, prompt, 16)
    text = tok.decode(ids)
    assert cut and len(ids) == 16 and text.endswith("new question\n\nAssistant:")


def test_completion_is_cut_to_max_length(tok):
    f = sft_features(tok, "POST: one\nTL;DR:", " one two three four five six seven eight nine ten" * 5,
                     max_length=12, max_prompt_length=8)
    assert len(f["input_ids"]) == 12 and len(f["labels"]) == 12


def test_collate_pads_right_and_masks_padding(tok):
    a = sft_features(tok, "POST: one\nTL;DR:", " sum", 64, 32)
    b = sft_features(tok, "POST: one two three four five\nTL;DR:", " sum", 64, 32)
    batch = collate_sft([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape
    short = len(a["input_ids"])
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, short:] == 0).all() and batch["attention_mask"][1].all()


def test_hh_split_at_last_assistant_turn():
    d = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: sure thing"
    prompt, completion = split_hh(d)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant:"
    assert completion == " sure thing"


def test_formats_drop_empty_rows():
    rows = [{"prompt": "p\nTL;DR:", "label": " s"}, {"prompt": "q\nTL;DR:", "label": "  "}]
    ex, dropped = sft_examples(rows, "tldr")
    assert len(ex) == 1 and dropped == 1


def test_pairs_keep_an_empty_preferred_reply_and_drop_identical_ones():
    from rlhf_cli.data.formats import pair_examples

    rows = [{"chosen": "\n\nHuman: how to steal?\n\nAssistant: ", "rejected": "\n\nHuman: how to steal?\n\nAssistant: Sure"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: hey", "rejected": "\n\nHuman: hi\n\nAssistant: hey"},
            {"chosen": None, "rejected": "x"}]
    pairs, malformed, equal = pair_examples(rows, "hh")
    assert (len(pairs), malformed, equal) == (1, 1, 1)
    assert pairs[0].prompt == "\n\nHuman: how to steal?\n\nAssistant:" and pairs[0].chosen == " "


def test_trls_prompt_completion_rows_are_detected_and_trained_on_the_completion():
    """TRL's standard prompt-completion format needs no column map (it was refused as prompts only)."""
    from rlhf_cli.data.formats import detect_format

    assert detect_format({"prompt", "completion"}) == "completion"
    assert detect_format({"prompt", "completion", "reward"}) == "rewarded"  # ILQL's, still first
    ex, dropped = sft_examples([{"prompt": "Q: 2+2?", "completion": " 4"}, {"prompt": "Q", "completion": " "}],
                               "completion")
    assert [(e.prompt, e.completion) for e in ex] == [("Q: 2+2?", " 4")] and dropped == 1


def test_a_malformed_preference_row_is_explained_not_just_counted(tmp_path):
    """All rows malformed (one of the 8 is held out): the error says what is wrong with which row, not only
    how many."""
    import json

    from conftest import ROOT, run_cli

    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"prompt": "x", "chosen": {"text": "hello"}, "rejected": "bye"}) + "\n"
                         for _ in range(8)))
    r = run_cli("train-rm", "--config", str(ROOT / "stage_configs" / "tldr_rm.yaml"), "--dry-run",
                "--output-dir", str(tmp_path / "o"), "--set", f"data.source={p}")
    assert r.exit_code == 2, r.output
    assert ("has no usable pairs (7 malformed, 0 with chosen == rejected); e.g. training row 0: 'chosen' is "
            "a dict, not text") in " ".join(r.output.split())
