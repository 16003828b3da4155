"""Every stage on every causal-LM family, no list of names in the code: tiny random-init models of each
family (tests/tiny_families.py) run sft -> train-rm -> dpo, ilql, ppo -> eval -> score, and every checkpoint loads
in plain transformers as the family's own class. The wide matrix is `make test-slow`; the fast suite runs
GPT-2 and Llama (with every warning recorded: none is a deprecation; transformers 5.24 deprecates
`past_key_values=` for `cache=`, our calls use the new keyword) and OPT, whose blocks sit one level deeper."""

import json
import warnings

import pytest
import tiny_families
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

from rlhf_cli import train
from rlhf_cli.models import freeze_bottom, train_top_blocks, transformer_blocks

CONFIGS = ROOT / "stage_configs"
MICRO = {"data.synthetic.num_train": 48, "data.synthetic.num_eval": 4, "train.batch_size": 4, "train.max_steps": 2,
         "eval.num_samples": 2, "eval.generation.max_new_tokens": 4, "checkpoint.interval": 0,
         "tokenizer.vocab_size": 300, "model.tiny.n_layer": 2, "model.tiny.n_embd": 32, "model.tiny.n_head": 2}
PPO = {"ppo.num_rollouts": 4, "ppo.chunk_size": 4, "ppo.ppo_epochs": 1, "ppo.num_layers_unfrozen": 1,
       "ppo.generation.max_new_tokens": 4}
FAST_FAMILIES = {"opt"}  # its blocks at model.decoder.layers: what the attribute guesses used to miss


@pytest.fixture(scope="module")
def tok():
    """A BPE tokenizer trained on the synthetic task (vocabulary 300)."""
    from rlhf_cli.data.synthetic import generate
    from rlhf_cli.models import train_tokenizer

    rows = generate("tldr", 200, seed=0)
    return train_tokenizer([r["prompt"] + r["label"] for r in rows], 300, 256)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tok):
    """family -> a tiny random-init model of that family with `tok`, saved like a hub model."""
    return lambda family: tiny_families.save(family, tok, tmp_path_factory.mktemp(family) / "model")


def run_every_stage(base: str, tmp_path) -> dict:
    """Every stage a few steps, from `base`; the output directory of each."""
    def stage(name, config, **extra):
        return train(name, config=CONFIGS / config, output_dir=tmp_path / name, overrides={**MICRO, **extra})
    sft = stage("sft", "tldr_sft.yaml", **{"model.name_or_path": base}).output_dir
    rm = stage("train-rm", "tldr_rm.yaml", init_from=str(sft)).output_dir
    dpo = stage("dpo", "tldr_dpo.yaml", policy=str(sft)).output_dir
    ilql = stage("ilql", "tldr_ilql.yaml", policy=str(sft), **{"ilql.gen_betas": [1.0]}).output_dir
    ppo = stage("ppo", "tldr_ppo.yaml", policy=str(sft), **{"reward.ckpt": str(rm), **PPO}).output_dir
    from rlhf_cli.report import EvalRequest, run_eval

    ckpts = [str(sft), str(ppo), str(dpo), str(ilql)]
    result = run_eval(EvalRequest(ckpts, num_samples=2, max_new_tokens=4, reward=True, reward_ckpt=str(rm),
                                  beta=1.0, output_dir=tmp_path / "eval"), None)
    assert len(result.rows) == len(ckpts)
    from rlhf_cli.report import score_file
    from rlhf_cli.rewards import make_reward

    rows = tmp_path / "eval" / "to_score.jsonl"  # `rlhf score` of the eval's own samples by the family's RM
    rows.write_text("".join(json.dumps({"prompt": s["prompt"], "completion": s[str(sft)]["completion"]}) + "\n"
                            for s in map(json.loads, (tmp_path / "eval" / "samples.jsonl").open())))
    scores = score_file(rows, make_reward(str(rm), None, None, batch_size=2))
    assert len(scores) == 2 and all(s == s for s in scores)  # finite, not NaN
    return {"sft": sft, "train-rm": rm, "dpo": dpo, "ilql": ilql, "ppo": ppo}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_stage_runs_without_a_deprecation_warning(family, family_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_every_stage("tiny" if family == "gpt2" else str(family_dir("llama")), tmp_path)
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))]
    assert not deprecations, "\n".join(deprecations)


@pytest.mark.parametrize("family", [f if f in FAST_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                    for f in tiny_families.ALL])
def test_every_stage_of_every_family_loads_in_plain_transformers(family, family_dir, tmp_path):
    base = family_dir(family)
    model_type = tiny_families.config(family).model_type
    dirs = run_every_stage(str(base), tmp_path)
    loaded = {"base": AutoModelForCausalLM.from_pretrained(base)}
    for name, path in dirs.items():
        if name == "train-rm":
            model = AutoModelForSequenceClassification.from_pretrained(path)
            assert model.config.num_labels == 1
            assert type(model).__name__ == MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type]
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
            assert type(model).__name__ == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], name
        assert json.loads((path / "config.json").read_text())["model_type"] == model_type, name
        assert len(transformer_blocks(model)) == tiny_families.NUM_LAYERS
        loaded[name] = model
    for name, parent in [("sft", "base"), ("dpo", "sft"), ("ilql", "sft"), ("ppo", "sft")]:  # each one trained
        before = loaded[parent].state_dict()
        assert any(not torch.equal(w, before[k]) for k, w in loaded[name].state_dict().items()), name


# --- finding and freezing the blocks -----------------------------------------------------------------------
# where each family keeps its text blocks (the test's own knowledge; the code finds them from the structure)
BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers", "mistral": "model.layers",
          "gemma3": "model.layers", "gpt_neox": "gpt_neox.layers", "gptj": "transformer.h",
          "opt": "model.decoder.layers", "opt_projected": "model.decoder.layers", "gpt2": "transformer.h"}
BLOCKS[tiny_families.MULTIMODAL] = "model.language_model.layers"  # beside a vision tower of more blocks
CASES = [(f, head) for f in tiny_families.ALL for head in ("causal", "reward")]


def _model(family: str, head: str):
    """(model, the dotted path of its text blocks)."""
    return tiny_families.build(family, head), BLOCKS[family]


@pytest.mark.parametrize("family, head", CASES)
def test_transformer_blocks_are_the_text_models_blocks(family, head):
    model, path = _model(family, head)
    blocks = transformer_blocks(model)
    assert blocks is model.get_submodule(path)
    assert len(blocks) == model.config.get_text_config().num_hidden_layers == tiny_families.NUM_LAYERS


def _above_blocks(model, path: str) -> set:
    """Parameter names of what runs after the blocks: the final norm beside them, OPT-350m's projection out
    of the blocks' width, and an untied head."""
    parent = path.rsplit(".", 1)[0]
    norms = {f"{n}.{pn}" for n, m in model.named_modules() if n.startswith(parent + ".") and
             not n.startswith(path + ".") and "Norm" in type(m).__name__ for pn, _ in m.named_parameters()}
    assert norms, "no final norm beside the blocks"
    # named_parameters() lists a head tied to the input embedding once, under the embedding's name
    return norms | {n for n, _ in model.named_parameters()
                    if n.startswith(("lm_head.", "score.", f"{parent}.project_out."))}


def _trainable(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family, head", CASES)
def test_freezing_leaves_exactly_the_top_blocks_final_norm_and_head_trainable(family, head):
    model, path = _model(family, head)
    top = {n for n, _ in model.named_parameters() if n.startswith(f"{path}.{tiny_families.NUM_LAYERS - 1}.")}
    train_top_blocks(model, 1)
    assert top and _trainable(model) == top | _above_blocks(model, path)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    assert not emb.requires_grad
    assert out is None or out.weight.requires_grad == (out.weight is not emb)  # a tied head is frozen with it

    model.requires_grad_(True)
    freeze_bottom(model, tiny_families.NUM_LAYERS - 1)  # the same freezing, said from below
    assert _trainable(model) == top | _above_blocks(model, path)
    model.requires_grad_(True)
    train_top_blocks(model, 0)
    assert _trainable(model) == _above_blocks(model, path)
