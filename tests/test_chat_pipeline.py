"""The synthetic TL;DR task written out as TRL conversational files and run end to end on a tiny Qwen2 whose
tokenizer carries a ChatML template: SFT on `messages` -> reward model and DPO on conversational pairs -> PPO
on prompt-only rows -> eval. The gold scorer reads the post inside the rendered prompt, so the run is judged
on what it was for, as the native-format pipeline is."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_cli_usage import rlhf_cmd

CHATML = (Path(__file__).resolve().parents[1] / "stage_configs" / "chatml.jinja").read_text()


def write_task(folder: Path) -> Path:
    """TRL conversational files of synthetic:tldr (sft.jsonl: messages; pairs.jsonl: prompt/chosen/rejected
    messages; prompts.jsonl: prompt messages) and a tiny Qwen2 with a ChatML tokenizer, EOS <|im_end|>."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf_cli.data import synthetic
    from rlhf_cli.models import train_tokenizer

    sft = synthetic.generate("tldr", 16256, seed=0)
    pairs = synthetic.conversational(synthetic.generate("tldr", 6512, seed=1, kind="pairs"))
    files = {"sft": synthetic.conversational(sft), "pairs": pairs,
             "prompts": [{"prompt": r["messages"][:1]} for r in synthetic.conversational(sft[:4256])]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([r["prompt"] + " " + r["label"] for r in sft[:4000]], 2000, 256)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.chat_template = "<|im_end|>", CHATML
    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder / "qwen2")
    tok.save_pretrained(folder / "qwen2")
    return folder


STAGES = """rlhf sft --config chat_sft.yaml --model d/qwen2 --data d/sft.jsonl --output-dir runs/sft
rlhf train-rm --config chat_rm.yaml --init-from runs/sft --data d/pairs.jsonl --output-dir runs/rm
rlhf dpo --config chat_dpo.yaml --policy runs/sft --data d/pairs.jsonl --output-dir runs/dpo
rlhf ppo --config chat_ppo.yaml --policy runs/sft --reward-ckpt runs/rm --data d/prompts.jsonl --output-dir runs/ppo
rlhf eval --ckpt runs/sft --ckpt runs/dpo --ckpt runs/ppo --reward-ckpt runs/rm --reward --ref-ckpt runs/sft \
    --output-dir runs/eval"""


@pytest.mark.slow
def test_the_synthetic_task_in_trl_conversational_files_end_to_end_on_a_tiny_qwen2(tmp_path):
    write_task(tmp_path / "d")
    env = {**os.environ, "PATH": f"{Path(rlhf_cmd()[0]).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in STAGES.splitlines():
        r = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, (line, r.stdout[-3000:], r.stderr[-3000:])
    sft = json.loads((tmp_path / "runs/sft/rlhf_stage.json").read_text())
    assert sft["metrics"]["eval/gold"] > sft["initial_metrics"]["eval/gold"] + 0.3  # SFT learns the task
    report = {Path(r["checkpoint"]).name: r for r in json.loads((tmp_path / "runs/eval/report.json").read_text())["results"]}
    print({name: round(row["gold"], 3) for name, row in report.items()})
    assert report["ppo"]["gold"] > report["sft"]["gold"]  # RL on the learned reward raises the true score
    assert report["dpo"]["gold"] > report["sft"]["gold"]
    samples = [json.loads(line) for line in (tmp_path / "runs/eval/samples.jsonl").open()]
    assert samples[0]["prompt"].startswith("<|im_start|>user\nSUBREDDIT:")
    assert samples[0]["prompt"].endswith("<|im_start|>assistant\n")
