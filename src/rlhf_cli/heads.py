"""Extra heads a plain Hugging Face model lacks, saved in their own safetensors file beside it.

    PolicyWithValueHead   causal LM + value head (PPO); `save_pretrained` writes the LM exactly as
                          HF does (AutoModelForCausalLM loads it) and the head to value_head.safetensors
    Reference             the KL reference: the initial values of the trainable parameters only, the
                          frozen trunk shared with the policy (trlx's hydra, for any architecture)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


def hidden_size(config) -> int:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(c, name, None):
            return getattr(c, name)
    raise ValueError(f"cannot find the hidden size of {type(config).__name__}")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at position 0 (as in generate)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyWithValueHead(nn.Module):
    """`forward` returns the logits and values of the last `num_logits` positions.

    The value head is trlx's: Linear(H, 2H) -> ReLU -> Linear(2H, 1) on the final hidden state; its
    last layer starts at zero so the first values are 0 rather than noise.
    """

    def __init__(self, policy, value_head: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        h = hidden_size(policy.config)
        if value_head is None:
            value_head = nn.Sequential(nn.Linear(h, 2 * h), nn.ReLU(), nn.Linear(2 * h, 1))
            nn.init.zeros_(value_head[2].weight)
            nn.init.zeros_(value_head[2].bias)
        self.value_head = value_head.to(next(policy.parameters()).dtype)

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids, attention_mask, num_logits: int):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                          output_hidden_states=True, use_cache=False, logits_to_keep=num_logits)
        hidden = out.hidden_states[-1][:, -num_logits:]
        return out.logits, self.value_head(hidden).squeeze(-1).float()

    def save_pretrained(self, dest, state_dict=None, safe_serialization=True, **kw):
        from safetensors.torch import save_file

        state_dict = state_dict if state_dict is not None else self.state_dict()
        lm = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        head = {k.removeprefix("value_head."): v.detach().contiguous().cpu()
                for k, v in state_dict.items() if k.startswith("value_head.")}
        self.policy.save_pretrained(dest, state_dict=lm, safe_serialization=True)
        save_file(head, str(Path(dest) / VALUE_HEAD_FILE),
                  metadata={"format": "pt", "architecture": "Linear(H,2H)-ReLU-Linear(2H,1)",
                            "hidden_size": str(hidden_size(self.policy.config))})

    def load_value_head(self, directory: Path) -> bool:
        """Load value_head.safetensors from `directory` when it has one (a PPO checkpoint)."""
        from safetensors.torch import load_file

        path = Path(directory) / VALUE_HEAD_FILE
        if not path.is_file():
            return False
        self.value_head.load_state_dict(load_file(str(path)))
        return True


class Reference:
    """The frozen initial policy for the KL penalty, storing only what training changes.

    Parameters that do not train are shared with the policy (they are the same tensors either way);
    a copy is kept of the trainable ones only, and `logits` runs the policy's own forward with those
    copies swapped in (torch.func.functional_call). With every layer trainable this is a full frozen
    copy; with `num_layers_unfrozen` = k it costs the memory of k blocks, as trlx's hydra heads.
    """

    def __init__(self, policy: nn.Module):
        self.policy = policy
        self.params = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, num_logits: int) -> torch.Tensor:
        from torch.func import functional_call

        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                      use_cache=False, logits_to_keep=num_logits)
        return functional_call(self.policy, self.params, args=(), kwargs=kwargs, strict=False).logits
