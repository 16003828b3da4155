"""Every stage on a GPT-2 and on a Llama-family model, with every warning recorded: none of them is a
deprecation (transformers 5.24 deprecates `past_key_values=` for `cache=`; our calls use the new keyword)."""

import warnings

import pytest
from conftest import ROOT

from rlhf_cli import train

CONFIGS = ROOT / "stage_configs"
MICRO = {"data.synthetic.num_train": 48, "data.synthetic.num_eval": 4, "train.batch_size": 4, "train.max_steps": 2,
         "eval.num_samples": 2, "eval.generation.max_new_tokens": 4, "checkpoint.interval": 0,
         "tokenizer.vocab_size": 300, "model.tiny.n_layer": 2, "model.tiny.n_embd": 32, "model.tiny.n_head": 2}
PPO = {"ppo.num_rollouts": 4, "ppo.chunk_size": 4, "ppo.ppo_epochs": 1, "ppo.num_layers_unfrozen": 1,
       "ppo.generation.max_new_tokens": 4}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random-init Llama with a BPE tokenizer trained on the synthetic task, saved like a hub model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_cli.data.synthetic import generate
    from rlhf_cli.models import train_tokenizer

    rows = generate("tldr", 200, seed=0)
    tok = train_tokenizer([r["prompt"] + r["label"] for r in rows], 300, 256)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("llama") / "model"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_every_stage(base: str, tmp_path):
    def stage(name, config, **extra):
        return train(name, config=CONFIGS / config, output_dir=tmp_path / name, overrides={**MICRO, **extra})
    sft = stage("sft", "tldr_sft.yaml", **{"model.name_or_path": base}).output_dir
    rm = stage("train-rm", "tldr_rm.yaml", init_from=str(sft)).output_dir
    stage("dpo", "tldr_dpo.yaml", policy=str(sft))
    stage("ilql", "tldr_ilql.yaml", policy=str(sft), **{"ilql.gen_betas": [1.0]})
    ppo = stage("ppo", "tldr_ppo.yaml", policy=str(sft), **{"reward.ckpt": str(rm), **PPO}).output_dir
    from rlhf_cli.report import EvalRequest, run_eval

    run_eval(EvalRequest([str(sft), str(ppo)], num_samples=2, max_new_tokens=4, reward=True, reward_ckpt=str(rm),
                         output_dir=tmp_path / "eval"), None)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_stage_runs_without_a_deprecation_warning(family, llama_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_every_stage("tiny" if family == "gpt2" else str(llama_dir), tmp_path)
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))]
    assert not deprecations, "\n".join(deprecations)
