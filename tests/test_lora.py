"""LoRA (`model.lora.r` > 0, peft): one copy of the base weights, the reference is the policy with adapters off,
checkpoints hold merged weights plus a PEFT adapter, resume equals an uninterrupted run, bad input is one sentence."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import MICRO, ROOT, SFT_CONFIG, assert_one_sentence, rlhf_cmd, run_cli

from rlhf_cli import lora
from rlhf_cli.checkpoint import latest_checkpoint

DPO_CONFIG = str(ROOT / "stage_configs" / "tldr_dpo.yaml")
LORA = ["--set", "model.lora.r=4", "--set", "model.lora.alpha=8"]


def _dpo(sft_ckpt, out, *extra):
    return run_cli("dpo", "--config", DPO_CONFIG, "--policy", str(sft_ckpt), "--output-dir", str(out), *MICRO, *LORA,
                   "--set", "train.learning_rate=1e-2", *extra)


@pytest.fixture(scope="module")
def lora_dpo(sft_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "dpo"
    r = _dpo(sft_ckpt, out)
    assert r.exit_code == 0, r.output
    return out


def _storage(*modules) -> int:
    """Bytes of distinct tensor storage held by the modules' parameters and buffers together."""
    seen = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _built_dpo_stage(sft_ckpt, tmp_path, *overrides):
    from rich.console import Console

    from rlhf_cli import api
    from rlhf_cli.trainers import distributed
    from rlhf_cli.trainers.dpo import DPOStage

    values = {"policy": str(sft_ckpt), "data.synthetic.num_train": 16, "data.synthetic.num_eval": 4,
              "train.batch_size": 4, **dict(overrides)}
    cfg, out = api.resolve("dpo", DPO_CONFIG, values, output_dir=tmp_path / "unused")
    acc = distributed.setup_accelerator(cfg)
    stage = DPOStage(cfg, out, None, Console(quiet=True))
    stage.world = (0, 1)
    stage.prepare_data()
    return stage, stage.build(acc)


def test_lora_dpo_holds_one_copy_of_the_base_weights(sft_ckpt, tmp_path):
    full, policy = _built_dpo_stage(sft_ckpt, tmp_path)
    one_copy = _storage(policy)
    assert _storage(policy, full.ref) == 2 * one_copy  # full fine-tune: the reference is a second copy
    stage, policy = _built_dpo_stage(sft_ckpt, tmp_path, ("model.lora.r", 4))
    adapters = sum(p.numel() * p.element_size() for n, p in policy.named_parameters() if ".lora_" in n)
    assert stage.ref is policy and 0 < adapters < one_copy / 10
    assert _storage(policy, stage.ref) == one_copy + adapters  # the base once, plus the adapters


def test_the_reference_is_the_starting_policy_with_adapters_off(sft_ckpt, tmp_path):
    """After the adapters moved (as training moves them), the reference's log-probs are still exactly the
    starting policy's, and the adapted policy's differ."""
    from rlhf_cli.trainers.pair_logps import batch_logps

    start, _ = _built_dpo_stage(sft_ckpt, tmp_path)
    stage, policy = _built_dpo_stage(sft_ckpt, tmp_path, ("model.lora.r", 4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    chunk = stage.feats[:4]
    with torch.inference_mode():
        want = batch_logps(start.ref.eval(), start.tokenizer, chunk, "cpu")
        with stage.reference():
            ref = batch_logps(stage.ref.eval(), stage.tokenizer, chunk, "cpu")
        adapted = batch_logps(policy, stage.tokenizer, chunk, "cpu")
    for a, b in zip(ref, want):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(adapted[0], want[0], atol=1e-3)


def test_checkpoint_is_merged_weights_plus_a_peft_adapter(lora_dpo, sft_ckpt):
    """Plain transformers loads the merged model; peft's PeftModel loads base + adapter; both give the same
    logits (1e-5), and they differ from the base's (the adapter learned something)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    m = json.loads((lora_dpo / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["reference"] == "the policy with its LoRA adapters off"
    assert not any(".lora_" in k or "base_layer" in k for k in load_file(str(lora_dpo / "model.safetensors")))
    assert (lora_dpo / "best" / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(lora_dpo).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_ckpt), lora_dpo / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(sft_ckpt).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        a, b, c = (x(input_ids=ids).logits for x in (merged, adapted, base))
    assert torch.allclose(a, b, atol=1e-5)
    assert (a - c).abs().max() > 1e-3


def test_a_later_stage_uses_the_merged_weights(lora_dpo, tmp_path):
    r = run_cli("dpo", "--config", DPO_CONFIG, "--policy", str(lora_dpo), "--output-dir", str(tmp_path / "again"),
                *MICRO, "--set", "train.max_steps=1")
    assert r.exit_code == 0, r.output


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_resume_of_a_killed_lora_run_equals_the_uninterrupted_one(sft_ckpt, tmp_path):
    args = [*rlhf_cmd(), "sft", "--config", SFT_CONFIG, *MICRO, *LORA, "--set", "train.max_steps=60",
            "--set", "checkpoint.interval=5", "--set", "eval.at_start=false", "--set", "train.log_interval=1",
            "--set", "train.learning_rate=1e-2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert subprocess.run([*args, "--output-dir", str(straight)], capture_output=True).returncode == 0
    proc = subprocess.Popen([*args, "--output-dir", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while latest_checkpoint(killed) is None and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = latest_checkpoint(killed)
    assert saved is not None and (saved / "adapter" / "adapter_model.safetensors").is_file()
    r = subprocess.run([*args, "--output-dir", str(killed), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _losses(killed) == pytest.approx(_losses(straight), rel=1e-5)
    a, b = (json.loads((d / "rlhf_stage.json").read_text())["metrics"] for d in (straight, killed))
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_bad_lora_settings_are_one_sentence_and_write_nothing(sft_ckpt, tmp_path):
    out = tmp_path / "dpo"
    assert_one_sentence(_dpo(sft_ckpt, out, "--set", "model.lora.target_modules=[q_proj]"),
                        r"model.lora.target_modules \['q_proj'\].*not found.*c_attn.*all-linear")
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    assert_one_sentence(_dpo(sft_ckpt, out, "--set", "model.lora.r=-1"), r"model.lora.r")
    assert not out.exists()


def _q_adapted_llama():
    """A one-block Llama with LoRA (r 2, alpha 6) on q_proj, B not zero: (model, q_proj's base weight, q_proj)."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                         num_key_value_heads=1, vocab_size=32))
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lora.inject(model, SimpleNamespace(r=2, alpha=6.0, dropout=0.0, target_modules=["q_proj"]))
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B["default"].weight.normal_()
    return model, w, q


def test_merged_state_dict_by_hand():
    """W + (alpha / r) * B @ A for a Linear; transposed for GPT-2's Conv1D (fan_in_fan_out)."""
    from transformers import LlamaForCausalLM

    model, w, q = _q_adapted_llama()
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    plain = lora.plain_state_dict(model, model.state_dict())
    assert torch.allclose(plain["model.layers.0.self_attn.q_proj.weight"], w + 3.0 * b @ a, atol=1e-6)
    assert not any("lora" in k or "base_layer" in k for k in plain)
    assert set(plain) == set(LlamaForCausalLM(model.config).state_dict())


def test_merged_state_dict_of_quantized_base_weights(monkeypatch):
    """QLoRA's save: bitsandbytes' packed base weights (here stand-ins: a uint8 weight and its absmax) come back
    dequantized and merged with the adapter, and peft's LoRA layer around them, whose class bears the same
    name (Linear4bit), keeps its adapter keys. Named by class alone, the first run on a GPU lost them (KeyError)."""
    import peft.utils.integrations
    from transformers import LlamaForCausalLM

    model, w, q = _q_adapted_llama()
    q.base_layer.__class__ = type("Linear4bit", (type(q.base_layer),), {"__module__": "bitsandbytes.nn.modules"})
    q.__class__ = type("Linear4bit", (type(q),), {"__module__": "peft.tuners.lora.bnb"})
    monkeypatch.setattr(peft.utils.integrations, "dequantize_module_weight", lambda module: w)
    key = "model.layers.0.self_attn.q_proj.base_layer.weight"
    state = {**model.state_dict(), key: torch.zeros(w.numel() // 2, 1, dtype=torch.uint8),
             f"{key}.absmax": torch.ones(4)}
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    plain = lora.plain_state_dict(model, state)
    merged = plain["model.layers.0.self_attn.q_proj.weight"]
    assert merged.dtype == torch.bfloat16
    assert torch.allclose(merged.float(), (w.bfloat16().float() + 3.0 * b @ a), atol=2e-2)
    assert set(plain) == set(LlamaForCausalLM(model.config).state_dict())


PPO_CONFIG = str(ROOT / "stage_configs" / "tldr_ppo.yaml")
GOLD_FN = "rlhf_cli.data.synthetic:gold_reward_fn"


def _built_online_stage(stage_name, sft_ckpt, tmp_path, *overrides):
    from rich.console import Console

    from rlhf_cli import api
    from rlhf_cli.trainers import distributed
    from rlhf_cli.trainers.grpo import GRPOStage
    from rlhf_cli.trainers.ppo import PPOStage

    values = {"policy": str(sft_ckpt), "reward.fn": GOLD_FN, "reward.delta": False, "data.synthetic.num_train": 16,
              "data.synthetic.num_eval": 4, **dict(overrides)}
    config = PPO_CONFIG if stage_name == "ppo" else str(ROOT / "stage_configs" / "tldr_grpo.yaml")
    cfg, out = api.resolve(stage_name, config, values, output_dir=tmp_path / "unused")
    acc = distributed.setup_accelerator(cfg)
    stage = (PPOStage if stage_name == "ppo" else GRPOStage)(cfg, out, None, Console(quiet=True))
    stage.world = (0, 1)
    stage.prepare_data()
    return stage, stage.build(acc)


def _reference_tensors(ref):
    return [*getattr(ref, "params", {}).values()]  # heads.Reference copies what trains; lora.Reference nothing


@pytest.mark.parametrize("stage_name", ["ppo", "grpo"])
def test_lora_online_reference_is_the_base_held_once(stage_name, sft_ckpt, tmp_path):
    from rlhf_cli.models import load_causal_lm, position_ids

    method = {"ppo": ("ppo.num_layers_unfrozen", -1), "grpo": ("grpo.beta", 0.04)}[stage_name]
    full, model = _built_online_stage(stage_name, sft_ckpt, tmp_path, method)
    copied = sum(t.numel() * t.element_size() for t in _reference_tensors(full.reference))
    assert copied >= _storage(model.policy) * 0.99  # a full fine-tune's reference: a second copy
    stage, model = _built_online_stage(stage_name, sft_ckpt, tmp_path, ("model.lora.r", 4), method)
    assert isinstance(stage.reference, lora.Reference) and stage.reference.policy is model.policy
    assert not [n for n, p in model.policy.named_parameters() if p.requires_grad and ".lora_" not in n]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    mask = torch.ones_like(ids)
    start = load_causal_lm(str(sft_ckpt), stage.cfg.model).eval()
    with torch.no_grad():
        want = start(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        adapted = model.policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    assert torch.allclose(stage.reference.logits(ids, mask, ids.shape[1]), want, atol=1e-5)
    assert not torch.allclose(adapted, want, atol=1e-3)


def test_lora_ppo_end_to_end_keeps_the_value_head_and_the_adapter(sft_ckpt, tmp_path):
    out = tmp_path / "ppo"
    r = run_cli("ppo", "--config", PPO_CONFIG, "--policy", str(sft_ckpt), "--reward-fn", GOLD_FN, "--no-delta",
                "--output-dir", str(out), *LORA, "--set", "data.synthetic.num_train=64", "--set", "data.synthetic.num_eval=8",
                "--set", "train.batch_size=4", "--set", "train.max_steps=8", "--set", "ppo.num_rollouts=8",
                "--set", "ppo.chunk_size=4", "--set", "ppo.ppo_epochs=2", "--set", "ppo.generation.max_new_tokens=8",
                "--set", "eval.num_samples=4", "--set", "eval.generation.max_new_tokens=8", "--set", "checkpoint.interval=4")
    assert r.exit_code == 0, r.output
    for name in ("model.safetensors", "value_head.safetensors", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "rlhf_stage.json").read_text())["status"] == "complete"


def test_lora_memory_estimate_by_hand():
    """8.03B parameters in 32 blocks, bf16 base: h ~ 2048 (8.03 / 1.4)^(1/3) = 3665, adapters 20 r h per block =
    37.5M; DPO holds 2 B per frozen weight + 16 B per adapter weight and no reference: 15.45 GiB (a full
    fine-tune: 16 B per weight + a 2 B reference = 134.6 GiB)."""
    from rlhf_cli.config import load_config
    from rlhf_cli.memory import _estimate, lora_params

    cfg = load_config(DPO_CONFIG, "dpo", ["model.lora.r=16", "model.dtype=bfloat16"], None)
    assert lora_params(cfg.model.lora, 8.03e9, 32) == pytest.approx(20 * 16 * 2048 * (8.03 / 1.4) ** (1 / 3) * 32)
    t = lora_params(cfg.model.lora, 8.03e9, 32)
    assert f"~{(2 * (8.03e9 - t) + 16 * t) / 1024 ** 3:.1f} GiB" in _estimate(cfg, (8.03e9, 32), 1, 0)
    assert "~15.4 GiB" in _estimate(cfg, (8.03e9, 32), 1, 0)
    full = load_config(DPO_CONFIG, "dpo", [], None)
    assert "~134.6 GiB" in _estimate(full, (8.03e9, 32), 1, 0)


def test_gpu_only_options_and_a_foreign_adapter_are_one_sentence(sft_ckpt, lora_dpo, tmp_path):
    from rlhf_cli.errors import UserError
    from rlhf_cli.models import load_causal_lm
    from rlhf_cli.config import load_config

    out = tmp_path / "dpo"
    if not torch.cuda.is_available():
        assert_one_sentence(_dpo(sft_ckpt, out, "--set", "model.load_in_4bit=true"),
                            r"model.load_in_4bit needs a CUDA GPU and this machine has none")
        assert_one_sentence(_dpo(sft_ckpt, out, "--set", "model.attn_implementation=flash_attention_2"),
                            r"flash_attention_2 needs a CUDA GPU.*use sdpa or eager")
    assert_one_sentence(_dpo(sft_ckpt, out, "--set", "model.load_in_8bit=true", "--set", "model.lora.r=0"),
                        r"quantized base weights do not train")
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    # the DPO run's adapter (r 4, on the micro SFT model) onto the same model with r 8: refused, by name
    cfg = load_config(DPO_CONFIG, "dpo", ["model.lora.r=8"], None)
    other = lora.inject(load_causal_lm(str(sft_ckpt), cfg.model), cfg.model.lora)
    with pytest.raises(UserError, match=r"does not fit this model's LoRA layers \(its base model is .*sft"):
        lora.load_adapter(other, lora_dpo)


def test_lora_reward_model_trains_its_score_head_in_full_and_saves_it_with_the_adapter(sft_ckpt, tmp_path):
    """train-rm with LoRA: adapters on the trunk, the score head in full (PEFT's modules_to_save); the merged
    checkpoint and PeftModel(base + adapter) give the same rewards. ILQL with LoRA runs and keeps its heads."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from rlhf_cli.rewards import CheckpointReward

    out = tmp_path / "rm"
    r = run_cli("train-rm", "--config", str(ROOT / "stage_configs" / "tldr_rm.yaml"), "--init-from", str(sft_ckpt),
                "--output-dir", str(out), *MICRO, *LORA, "--set", "train.learning_rate=1e-2")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"
    base = AutoModelForSequenceClassification.from_pretrained(sft_ckpt, num_labels=1)
    base.config.pad_token_id = CheckpointReward(str(out)).tokenizer.pad_token_id
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = CheckpointReward(str(out))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        want = merged.model(input_ids=ids).logits
        got = adapted(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)

    r = run_cli("ilql", "--config", str(ROOT / "stage_configs" / "tldr_ilql.yaml"), "--policy", str(sft_ckpt),
                "--output-dir", str(tmp_path / "ilql"), *MICRO, *LORA)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ilql" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ilql" / "ilql_heads.safetensors").is_file()
