import json

import pytest

from rlhf_cli.config import load_config
from rlhf_cli.data import formats
from rlhf_cli.data.sources import is_hub_name, load_source
from rlhf_cli.errors import UserError

ROWS = [{"post": f"p{i}\nTL;DR:", "summary": f" s{i}"} for i in range(20)]


def cfg(source, **data):
    sets = [f"data.source={source}"] + [f"data.{k}={v}" for k, v in data.items()]
    return load_config(None, "sft", sets).data


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_local_files_of_each_kind_load_the_same_rows(tmp_path, ext):
    import datasets

    p = tmp_path / f"d.{ext}"
    ds = datasets.Dataset.from_list(ROWS)
    {"jsonl": lambda: ds.to_json(str(p)), "csv": lambda: ds.to_csv(str(p)), "parquet": lambda: ds.to_parquet(str(p))}[ext]()
    split = load_source(cfg(str(p)), "sft", seed=0)
    assert len(split.train) + len(split.eval) == 20 and len(split.eval) == 1
    assert sorted(r["post"] for r in split.train + split.eval) == sorted(r["post"] for r in ROWS)


def test_save_to_disk_directory_keeps_its_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:3])}
                         ).save_to_disk(str(tmp_path / "dd"))
    split = load_source(cfg(str(tmp_path / "dd")), "sft", seed=0)
    assert len(split.train) == 20 and len(split.eval) == 3


def test_column_mapping_then_format_detection(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    rows = formats.rename_columns(load_source(cfg(str(p)), "sft", 0).train, {"prompt": "post", "label": "summary"})
    assert formats.resolve_format(rows, "auto", "d") == "tldr"
    with pytest.raises(UserError, match="cannot tell the format"):
        formats.resolve_format([{"post": "x"}], "auto", "d")


def test_synthetic_splits_are_disjoint_and_sized():
    split = load_source(cfg("synthetic:tldr", **{"synthetic.num_train": 30, "synthetic.num_eval": 5}), "sft", 0)
    assert len(split.train) == 30 and len(split.eval) == 5 and split.synthetic_task == "tldr"
    with pytest.raises(UserError, match="unknown synthetic source"):
        load_source(cfg("synthetic:nope"), "sft", 0)


def test_hub_names_are_told_apart_from_paths(tmp_path):
    assert is_hub_name("CarperAI/openai_summarize_tldr")
    assert not is_hub_name("synthetic:tldr") and not is_hub_name("./a/b") and not is_hub_name("data/x.jsonl")


def test_real_hh_sample_is_split_at_the_last_assistant_turn(shared_data):
    src = shared_data / "hh_rlhf" / "harmless-base_test.jsonl.gz"
    split = load_source(cfg(str(src)), "sft", 0)
    assert formats.resolve_format(split.train, "auto", str(src)) == "hh"
    examples, dropped = formats.sft_examples(split.train, "hh")
    assert len(examples) + dropped == len(split.train) and len(examples) > 2000
    assert all(e.prompt.endswith("\n\nAssistant:") and "\n\nAssistant:" not in e.completion for e in examples)


def test_real_tldr_sample_keeps_its_schema(shared_data):
    split = load_source(cfg(str(shared_data / "tldr" / "tldr_sft_carper_format.jsonl")), "sft", 0)
    assert formats.resolve_format(split.train, "auto", "tldr") == "tldr"
    assert all(r["prompt"].endswith("TL;DR:") for r in split.train[:50])


def test_jsonl_is_read_row_by_row_like_datasets_reads_it(tmp_path):
    """Every row gets every column (None where it has none), a bad line is named by its number."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"post": "a\\nTL;DR:", "summary": " x"}\n\n{"post": "b\\nTL;DR:", "summary": " y", "extra": 1}\n')
    rows = load_source(cfg(str(p), eval_fraction=0.5), "sft", seed=0)
    assert sorted(rows.train + rows.eval, key=lambda r: r["post"]) == [
        {"post": "a\nTL;DR:", "summary": " x", "extra": None}, {"post": "b\nTL;DR:", "summary": " y", "extra": 1}]
    p.write_text('{"post": "a"}\n{"post": \n')
    with pytest.raises(UserError, match=r"line 2 of .*d.jsonl is not valid JSON"):
        load_source(cfg(str(p)), "sft", seed=0)
    p.write_text('{"post": "a"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"line 2 of .*d.jsonl is a JSON list, not an object of columns"):
        load_source(cfg(str(p)), "sft", seed=0)


def test_a_huge_text_is_cut_before_tokenization_keeping_both_ends():
    from rlhf_cli.data.sources import cut_long_texts

    rows = [{"post": "HEAD" + "x" * 100 + "TAIL", "n": 3}, {"post": "short"}]
    assert cut_long_texts(rows, 20) == 1
    assert rows == [{"post": "HEAD" + "x" * 6 + "x" * 6 + "TAIL", "n": 3}, {"post": "short"}]


def test_a_200_mb_row_costs_no_gigabytes(tmp_path):
    """One enormous line (here 20 MB) is cut before it reaches the tokenizer: the plan says so, memory stays
    bounded (it was 3-5 GB per 20 MB, tokenized whole) and it takes seconds."""
    import subprocess
    import sys

    from conftest import ROOT, rlhf_cmd

    p = tmp_path / "d.jsonl"
    with open(p, "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"row {i} " + "the cat sat on the mat " * 20}) + "\n")
            if i == 7:
                f.write(json.dumps({"text": "word " * 4_000_000}) + "\n")
    cmd = [*rlhf_cmd(), "sft", "--config", str(ROOT / "stage_configs" / "tldr_sft.yaml"), "--set",
           f"data.source={p}", "--dry-run", "--output-dir", str(tmp_path / "out")]
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stdout)")
    r = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, timeout=300)
    code, peak_kb = map(int, r.stdout.split("\n", 1)[0].split())
    assert code == 0, r.stdout[-2000:]
    assert "1 rows had a text over 8,192 characters" in " ".join(r.stdout.replace("│", " ").split())
    assert peak_kb < 1_500_000, peak_kb


def test_a_system_prompt_opens_prompt_rows_and_refuses_other_formats(tmp_path):
    from rlhf_cli.config import DataConfig
    from rlhf_cli.data import chat
    from rlhf_cli.data.sources import load_formatted

    rows = [{"prompt": "2 + 2?", "completion": "4"}] * 30
    assert chat.with_system_prompt(rows[:1], "completion", "Be brief.") == [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
         "completion": [{"role": "assistant", "content": "4"}]}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" for _ in range(30)))
    with pytest.raises(UserError, match="data.system_prompt opens the conversation of prompt or prompt-completion "
                                        "rows; '.*pairs.jsonl' is comparisons data"):
        load_formatted(DataConfig(source=str(pairs), system_prompt="Be brief."), kind="pairs", seed=0)
