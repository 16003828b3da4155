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
