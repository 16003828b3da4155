from pathlib import Path

import pytest

from rlhf_cli.config import load_config, parse_override
from rlhf_cli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_tiny_preset():
    cfg = load_config(None, "sft")
    assert cfg.preset == "tiny" and cfg.model.name_or_path == "tiny" and cfg.data.source == "synthetic:tldr"


def test_unknown_key_gets_a_did_you_mean(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'train.learning_rat'.*did you mean 'train.learning_rate'"):
        load_config(write(tmp_path, "stage: sft\ntrain: {learning_rat: 1}\n"), "sft")


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"'train.batch_size'.*integer.*'many'"):
        load_config(write(tmp_path, "stage: sft\ntrain: {batch_size: many}\n"), "sft")


def test_yaml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"not valid YAML at line 3, column 1: expected .,. or .}."):
        load_config(write(tmp_path, "stage: sft\ntrain: {batch_size: 1\n"), "sft")


def test_preset_then_overrides_win(tmp_path):
    p = write(tmp_path, "stage: sft\ntrain: {learning_rate: 1.0}\npresets:\n  big: {train: {learning_rate: 2.0, batch_size: 3}}\n")
    cfg = load_config(p, "sft", ["train.batch_size=5", "train.learning_rate=1e-4"], preset="big")
    assert cfg.preset == "big" and cfg.train.batch_size == 5 and cfg.train.learning_rate == 1e-4


def test_unknown_preset_lists_the_available_ones(tmp_path):
    with pytest.raises(UserError, match=r"preset 'huge' is not defined.*available: tiny, big"):
        load_config(write(tmp_path, "stage: sft\npresets: {big: {}}\n"), "sft", preset="huge")


def test_cross_field_check_fails_before_anything_loads():
    with pytest.raises(UserError, match="max_prompt_length .* must be smaller than data.max_length"):
        load_config(None, "sft", ["data.max_length=64", "data.max_prompt_length=64"])


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=1e-4") == {"a": 1e-4}
    assert parse_override("a=[1, 4]") == {"a": [1, 4]}
    assert parse_override("a=true") == {"a": True}
    assert parse_override("a.b=../x.jsonl") == {"a": {"b": "../x.jsonl"}}
    with pytest.raises(UserError):
        parse_override("novalue")


@pytest.mark.parametrize("config,presets", [
    ("tldr_sft.yaml", ["tiny", "gptj"]),
    ("hh_sft.yaml", ["tiny", "125M", "1B", "6B", "20B"]),
])
def test_every_shipped_preset_validates(config, presets):
    for preset in presets:
        cfg = load_config(ROOT / "stage_configs" / config, "sft", preset=preset)
        assert cfg.preset == preset
