"""Rough training-memory estimate per device, for `--dry-run` (no download: sizes of known models,
else the size written in the model's name, e.g. "pythia-1.4b").

Per parameter, mixed-precision AdamW keeps: fp32 weights 4 B, fp32 gradients 4 B, Adam moments 8 B,
so 16 B if it trains and 4 B if frozen (2 B in bf16 for frozen copies). ZeRO-1/2/3 shard the moments /
+ gradients / + weights over the processes. Activations, the KV cache and fragmentation come on top:
the number is a floor, not a promise.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

# hub name -> (parameters, transformer blocks)
KNOWN = {
    "carperai/openai_summarize_tldr_sft": (6.05e9, 28),
    "eleutherai/gpt-j-6b": (6.05e9, 28),
    "eleutherai/gpt-neox-20b": (20.6e9, 44),
    "eleutherai/pythia-125m-deduped": (0.125e9, 12),
    "eleutherai/pythia-1.4b-deduped": (1.41e9, 24),
    "eleutherai/pythia-6.9b-deduped": (6.86e9, 32),
    "dahoas/pythia-125m-static-sft": (0.125e9, 12),
    "dahoas/pythia-1b-static-sft": (1.01e9, 16),
    "dahoas/pythia-6b-static-sft": (6.86e9, 32),
    "lvwerra/gpt2-imdb": (0.124e9, 12),
    "qwen/qwen2.5-0.5b-instruct": (0.494e9, 24),
    "meta-llama/llama-3.1-8b-instruct": (8.03e9, 32),
}
GiB = 1024 ** 3


def model_size(name: str) -> tuple[float, int | None] | None:
    """(parameters, blocks) of a hub model without downloading it, or None when unknown."""
    if name.lower() in KNOWN:
        return KNOWN[name.lower()]
    m = re.search(r"(\d+(?:\.\d+)?)([mb])(?![a-z])", name.lower())
    if m is None:
        return None
    return float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9), None


def lora_params(lora_cfg, params: float, blocks: int | None) -> float:
    """Adapter parameters, roughly: hidden size h from the parameter count (12 L h^2 per model, L blocks), and
    r (in + out) per adapted linear layer: ~20 r h per block for all-linear (4 attention, 3 MLP projections)."""
    h = 2048 * (params / 1.4e9) ** (1 / 3)  # 125M: ~900, 1.4B: 2048, 8B: ~3700 (real: 768, 2048, 4096)
    layers = blocks or max(12, round(params / (12 * h * h)))
    per_block = 20 if lora_cfg.target_modules == "all-linear" else 2 * len(lora_cfg.target_modules)
    return per_block * lora_cfg.r * h * layers


def estimate(cfg, name: str) -> str | None:
    """GiB per device for `cfg`'s stage: as configured, and with ZeRO-2 / ZeRO-3 over 8 devices."""
    size = model_size(name)
    if size is None:
        return None
    zero, n = 0, cfg.distributed.num_processes
    acc_cfg = cfg.distributed.accelerate_config
    if acc_cfg and Path(acc_cfg).is_file():  # its processes over all machines
        raw = yaml.safe_load(Path(acc_cfg).read_text()) or {}
        n = int(raw.get("num_processes", n))
    if cfg.distributed.deepspeed_config:
        m = re.search(r"zero(\d)", cfg.distributed.deepspeed_config)
        zero = int(m.group(1)) if m else 2
    lines = [_estimate(cfg, size, n, zero)]
    lines += [_estimate(cfg, size, 8, z, short=True) for z in (2, 3) if (n, zero) != (8, z)]
    return "; ".join(lines)


def _beside(cfg, params: float, trainable: float, zero: int) -> float:
    """Bytes beyond the trained model: the reference, a reward model, ILQL's heads."""
    stage, reward = cfg.stage, 2 * params  # a reward model of the policy's size, bf16
    if cfg.model.lora.r > 0:  # the reference is the policy with its adapters off: no copy
        return reward if stage in ("ppo", "grpo") else 0.1 * params if stage == "ilql" else 0.0
    if stage == "dpo" and not cfg.precompute_ref_logps:
        return 2 * params  # frozen bf16 reference
    if stage == "ppo":  # reference: a copy of what trains (a whole copy under ZeRO-3)
        return (4 * params if zero >= 3 else 4 * trainable) + reward
    if stage == "grpo":  # a full reference copy only when beta > 0
        return reward + (4 * params if cfg.grpo.beta else 0)
    if stage == "ilql":
        return 0.1 * params  # Q / target / V heads (vocabulary-wide), roughly
    return 0.0


def _estimate(cfg, size, n: int, zero: int, short: bool = False) -> str:
    params, blocks = size
    stage = cfg.stage
    trainable = params
    if stage == "train-rm":
        trainable = params * (1 - cfg.freeze_fraction)
    elif stage == "ppo" and cfg.ppo.num_layers_unfrozen >= 0 and blocks:
        trainable = params * min(1.0, cfg.ppo.num_layers_unfrozen / blocks)
    lora = cfg.model.lora.r > 0
    if lora:  # adapters only: r (in + out) per adapted linear layer, ~20 r h per block for all-linear
        trainable = lora_params(cfg.model.lora, params, blocks)
    frozen = params - trainable
    base = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4  # bytes per weight as loaded
    weights, grads, adam = base * frozen + 4 * trainable, 4 * trainable, 8 * trainable
    shard = max(1, n)
    per = (weights / (shard if zero >= 3 else 1) + grads / (shard if zero >= 2 else 1)
           + adam / (shard if zero >= 1 else 1))
    total = (per + _beside(cfg, params, trainable, zero)) / GiB
    how = f"ZeRO-{zero} over {n}" if zero else (f"DDP over {n}" if n > 1 else "1 process")
    if lora:
        how += f", LoRA r {cfg.model.lora.r}"
    if short:
        return f"{how}: ~{total:.1f} GiB"
    return (f"~{total:.1f} GiB per device with {how} ({params / 1e9:.2f}B parameters, {trainable / 1e9:.2f}B "
            f"trained, {frozen / 1e9:.2f}B frozen; weights + gradients + Adam, activations excluded)")
