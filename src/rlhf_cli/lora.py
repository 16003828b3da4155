"""LoRA (peft) on a stage's language model: `model.lora.r` > 0 trains low-rank adapters beside frozen base
weights, and the reference of DPO is the same model with the adapters switched off (one copy of the base).

The adapters are injected into the transformers model itself (`peft.inject_adapter_in_model`), not wrapped in a
PeftModel, so our heads and loops see the same module tree with or without LoRA. A checkpoint keeps the
contract: merged weights under plain transformers names at its root, and the adapter in `adapter/` in PEFT's
format (`PeftModel.from_pretrained(base, "ckpt/adapter")`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .errors import UserError
from .models import position_ids, tail_only

ADAPTER_DIR = "adapter"


def enabled(cfg) -> bool:
    return cfg.model.lora.r > 0


def _lora_layers(model) -> dict:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def summary(model) -> str:
    """', LoRA: 0.05M of 1.20M parameters train' (empty without adapters), for a stage's start line."""
    if not has_adapters(model):
        return ""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f", LoRA: {trainable / 1e6:.3g}M of {sum(p.numel() for p in model.parameters()) / 1e6:.3g}M train"


def attach(lm, cfg, resume_from: Path | None, base_name: str, full: tuple[str, ...] = ()) -> None:
    """A stage's LoRA set-up, when `model.lora.r` > 0: adapters injected, and restored from the checkpoint
    being resumed (whose root holds merged weights: the base came from `base_name` again)."""
    if not enabled(cfg):
        return
    inject(lm, cfg.model.lora, base_name, full)
    if resume_from is not None:
        load_adapter(lm, resume_from)


def has_adapters(model) -> bool:
    return any(hasattr(m, "peft_config") for m in model.modules())


def inject(lm, lora_cfg, base_name: str | None = None, full: tuple[str, ...] = ()):
    """Adapters into `lm` (in place; base weights frozen, the adapters trainable); `lm` is returned.
    `full`: modules of `lm` that train in full beside them (a reward model's score head), saved with the
    adapter as PEFT's `modules_to_save`."""
    import warnings

    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError  # type: ignore[attr-defined]

    targets = lora_cfg.target_modules
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        task_type="SEQ_CLS" if full else "CAUSAL_LM", exclude_modules=list(full) or None,
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        base_model_name_or_path=base_name)
    try:
        with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself and says so
            warnings.simplefilter("ignore")
            inject_adapter_in_model(config, lm)
    except (NoMatchingPeftModuleError, ValueError) as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)
                        or type(m).__name__ == "Conv1D"})
        raise UserError(f"model.lora.target_modules {targets}: {str(e).splitlines()[0].rstrip('.')}; this model's "
                        f"linear layers are {', '.join(names)} (or use all-linear)") from None
    for name in full:  # trained as they are (no peft wrapper around them: the module tree stays plain)
        lm.get_submodule(name).requires_grad_(True)
    lm.peft_config["default"].modules_to_save = list(full) or None  # what PeftModel.from_pretrained restores
    return lm


@contextlib.contextmanager
def adapters_off(model):
    """The model without its adapters for the duration (the reference: base weights only)."""
    layers = list(_lora_layers(model).values())
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


class Reference:
    """The KL reference of the online methods (heads.Reference's interface) as the policy with its adapters
    off: the base weights, shared, nothing copied."""

    def __init__(self, policy):
        self.policy = policy

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, num_logits: int) -> torch.Tensor:
        with adapters_off(self.policy), tail_only(self.policy, num_logits):
            return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                               position_ids=position_ids(attention_mask), logits_to_keep=num_logits).logits


def _lm_prefix(model) -> str:
    """Where the adapted language model sits in `model` ('' for itself, 'policy.' inside a value-head model)."""
    name = next(n for n, m in model.named_modules() if hasattr(m, "peft_config"))
    return f"{name}." if name else ""


def plain_state_dict(model, state_dict: dict) -> dict:
    """`state_dict` of a model with adapters as the merged model's, under plain transformers names:
    W + scaling * B @ A (transposed for GPT-2's Conv1D), computed from the state dict's own tensors (so it
    also holds for the gathered weights of ZeRO-3) and never written back into the training model."""
    layers = _lora_layers(model)
    state_dict = _dequantized(model, state_dict)
    out = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.")
            if leaf == "weight":
                layer = layers[prefix]
                a, b = state_dict[f"{prefix}.lora_A.default.weight"], state_dict[f"{prefix}.lora_B.default.weight"]
                delta = (b.float() @ a.float()) * layer.scaling["default"]
                # each merged weight leaves the device as it is made: a save holds no second copy of the base there
                value = (value.float() + (delta.T if layer.fan_in_fan_out else delta)).to("cpu", value.dtype)
            key = f"{prefix}.{leaf}"
        out[key] = value
    return out


def _dequantized(model, state_dict: dict) -> dict:
    """bitsandbytes' packed weights (QLoRA's 4-bit, or 8-bit) back as bf16 under their plain keys, their
    quantization state dropped: a merged checkpoint loads without bitsandbytes. (Run on GPUs only.) Only
    bitsandbytes' own layers: peft's LoRA layer around one bears the same class name, and its adapter keys stay."""
    quantized = {n: m for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")
                 and type(m).__module__.startswith("bitsandbytes")}
    if not quantized:
        return state_dict
    from peft.utils.integrations import dequantize_module_weight

    out = dict(state_dict)
    for name, module in quantized.items():
        for key in [k for k in out if k.startswith(f"{name}.") and k != f"{name}.bias"]:
            del out[key]  # weight, weight.absmax, weight.quant_map, ..., SCB
        out[f"{name}.weight"] = dequantize_module_weight(module).to(torch.bfloat16).cpu()
    return out


def save_adapter(model, state_dict: dict, dest: Path) -> None:
    """The adapter in PEFT's format: adapter_config.json and adapter_model.safetensors."""
    from safetensors.torch import save_file

    prefix = _lm_prefix(model)
    lm = model.get_submodule(prefix[:-1]) if prefix else model
    full = tuple(f"{prefix}{n}." for n in lm.peft_config["default"].modules_to_save or ())
    tensors = {"base_model.model." + k[len(prefix):].replace(".default.", "."): v.detach().contiguous().cpu()
               for k, v in state_dict.items() if ".lora_" in k and k.startswith(prefix) or k.startswith(full)}
    dest.mkdir(parents=True, exist_ok=True)
    lm.peft_config["default"].save_pretrained(str(dest))
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_model(model, dest: Path, state_dict: dict) -> None:
    """`model.save_pretrained(dest, state_dict)`, with merged weights and `adapter/` when it has adapters."""
    if has_adapters(model):
        save_adapter(model, state_dict, dest / ADAPTER_DIR)
        state_dict = plain_state_dict(model, state_dict)
    model.save_pretrained(dest, state_dict=state_dict, safe_serialization=True)


def load_adapter(lm, src: Path) -> None:
    """The adapter weights of a checkpoint's `adapter/` into `lm`'s injected adapters (to resume)."""
    from safetensors.torch import load_file

    path = src / ADAPTER_DIR / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{src} has no {ADAPTER_DIR}/adapter_model.safetensors to resume the LoRA adapters from")
    saved = {k.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.")
             .replace(".lora_B.", ".lora_B.default."): v for k, v in load_file(str(path)).items()}
    full = tuple(f"{n}." for n in lm.peft_config["default"].modules_to_save or ())
    wanted = {k: v.shape for k, v in lm.state_dict().items() if ".lora_" in k or k.startswith(full)}
    if set(saved) != set(wanted) or any(saved[k].shape != shape for k, shape in wanted.items()):
        raise UserError(f"the adapter in {src / ADAPTER_DIR} does not fit this model's LoRA layers (its base "
                        f"model is {adapter_base(src) or 'unnamed'}; another base, model.lora.r or target_modules?)")
    lm.load_state_dict(saved, strict=False)


def adapter_base(src: Path) -> str | None:
    """The base model an adapter directory names (adapter_config.json's base_model_name_or_path)."""
    config = src / ADAPTER_DIR / "adapter_config.json"
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
