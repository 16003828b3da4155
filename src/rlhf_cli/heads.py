"""Extra heads a plain Hugging Face model lacks, saved in their own safetensors file beside it.

    PolicyWithValueHead   causal LM + value head (PPO); `save_pretrained` writes the LM exactly as
                          HF does (AutoModelForCausalLM loads it) and the head to value_head.safetensors
    Reference             the KL reference: the initial values of the trainable parameters only, the
                          frozen trunk shared with the policy (trlx's hydra, for any architecture)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from .checkpoint import load_tensors
from .errors import UserError, is_corrupt_safetensors
from .models import forward_with_hidden, position_ids, sequence_rewards, tail_only
from .shared_prompt import completion_logits, completion_rewards

VALUE_HEAD_FILE = "value_head.safetensors"


def hidden_size(source) -> int:
    """The width of the final hidden state, the one the LM head reads (and the value / ILQL heads with it).

    From a model: its LM head's input width, any family. From a config: its named width, OPT's
    `word_embed_proj_dim` first (opt-350m projects the blocks' 1024 down to 512 before the head).
    """
    if isinstance(source, nn.Module):
        width = getattr(source.get_output_embeddings(), "in_features", None)  # a Linear's, also under ZeRO-3
        if width:
            return width
        source = source.config
    c = source.get_text_config() if hasattr(source, "get_text_config") else source
    for name in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model"):
        if getattr(c, name, None):
            return getattr(c, name)
    raise ValueError(f"cannot find the hidden size of {type(source).__name__}")


class PolicyWithValueHead(nn.Module):
    """`forward` returns the logits and values of the last `num_logits` positions.

    The value head is trlx's: Linear(H, 2H) -> ReLU -> Linear(2H, 1) on the final hidden state; its
    last layer starts at zero so the first values are 0 rather than noise.
    """

    def __init__(self, policy, value_head: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        h = hidden_size(policy)
        if value_head is None:
            value_head = nn.Sequential(nn.Linear(h, 2 * h), nn.ReLU(), nn.Linear(2 * h, 1))
            nn.init.zeros_(value_head[2].weight)
            nn.init.zeros_(value_head[2].bias)
        self.value_head = value_head.to(next(policy.parameters()).dtype)

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids, attention_mask, num_logits: int):
        with tail_only(self.policy, num_logits):
            out, hidden = forward_with_hidden(self.policy, input_ids=input_ids, attention_mask=attention_mask,
                                              position_ids=position_ids(attention_mask), use_cache=False,
                                              logits_to_keep=num_logits)
        return out.logits, self.value_head(hidden).squeeze(-1).float()

    def save_pretrained(self, dest, state_dict=None, safe_serialization=True, **kw):
        state_dict = state_dict if state_dict is not None else self.state_dict()
        lm = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        head = {k.removeprefix("value_head."): v.detach().contiguous().cpu()
                for k, v in state_dict.items() if k.startswith("value_head.")}
        self.policy.save_pretrained(dest, state_dict=lm, safe_serialization=True)
        save_file(head, str(Path(dest) / VALUE_HEAD_FILE),
                  metadata={"format": "pt", "architecture": "Linear(H,2H)-ReLU-Linear(2H,1)",
                            "hidden_size": str(hidden_size(self.policy))})

    def load_value_head(self, directory: Path) -> bool:
        """Load value_head.safetensors from `directory` when it has one (a PPO checkpoint)."""
        path = Path(directory) / VALUE_HEAD_FILE
        if not path.is_file():
            return False
        self.value_head.load_state_dict(load_tensors(path))
        return True


class PolicyOnly(nn.Module):
    """A policy trained without a critic (GRPO family), in PolicyWithValueHead's shape for the rollout engine:
    `value_head` is None and the values are 0. Saves as the plain causal LM."""

    value_head = None

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids=None, attention_mask=None, num_logits: int = 0, shared=None):
        """(logits, zero values) of the last `num_logits` positions; with `shared` (a shared_prompt.Shared),
        the completions' logits, each prompt run once (through this forward, so DDP and DeepSpeed see it)."""
        if shared is not None:
            logits = completion_logits(self.policy, shared)
        else:
            with tail_only(self.policy, num_logits):
                logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(
                    attention_mask), use_cache=False, logits_to_keep=num_logits).logits
        return logits, torch.zeros(logits.shape[:2], device=logits.device)

    def save_pretrained(self, dest, state_dict=None, safe_serialization=True, **kw):
        state_dict = state_dict if state_dict is not None else self.state_dict()
        self.policy.save_pretrained(dest, state_dict={k.removeprefix("policy."): v for k, v in state_dict.items()},
                                    safe_serialization=True)


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
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                      use_cache=False, logits_to_keep=num_logits)
        with tail_only(self.policy, num_logits):
            return functional_call(self.policy, self.params, args=(), kwargs=kwargs, strict=False).logits


class Held:
    """A reference policy already held (DPO's frozen reference) behind the reference interface: no copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, num_logits: int) -> torch.Tensor:
        with tail_only(self.model, num_logits):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), use_cache=False,
                              logits_to_keep=num_logits).logits


class FrozenCopy(Held):
    """A whole frozen copy of the initial policy: the reference under ZeRO-3, where the policy's own
    weights are sharded and cannot be swapped in (each process holds the full copy)."""

    def __init__(self, policy: nn.Module):
        super().__init__(copy.deepcopy(policy).eval().requires_grad_(False))


ILQL_HEADS_FILE = "ilql_heads.safetensors"


def _mlp(h: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(h, 2 * h), nn.ReLU(), nn.Linear(2 * h, out))


class ILQLHeads(nn.Module):
    """trlx's ILQL heads on the LM's final hidden state: Q heads (two with `two_qs`), their Polyak
    target copies, and a V head. Saved to ilql_heads.safetensors beside the plain HF policy."""

    def __init__(self, hidden: int, vocab: int, two_qs: bool = True):
        super().__init__()
        self.two_qs = two_qs
        self.qs = nn.ModuleList(_mlp(hidden, vocab) for _ in range(2 if two_qs else 1))
        self.target_qs = nn.ModuleList(_mlp(hidden, vocab) for _ in range(2 if two_qs else 1))
        self.target_qs.load_state_dict(self.qs.state_dict())
        self.target_qs.requires_grad_(False)
        self.v = _mlp(hidden, 1)

    def forward(self, hidden: torch.Tensor):
        """(qs, target_qs, v) for hidden (B, T, H): lists of (B, T, vocab) and (B, T)."""
        with torch.no_grad():
            target = [q(hidden) for q in self.target_qs]
        return [q(hidden) for q in self.qs], target, self.v(hidden).squeeze(-1)

    def save(self, directory, state_dict=None) -> None:
        sd = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(Path(directory) / ILQL_HEADS_FILE),
                  metadata={"format": "pt", "two_qs": str(self.two_qs), "architecture": "Linear(H,2H)-ReLU-Linear(2H,out)"})

    @classmethod
    def load(cls, directory) -> "ILQLHeads":
        path = Path(directory) / ILQL_HEADS_FILE
        try:
            with safe_open(str(path), "pt") as f:
                two_qs = f.metadata().get("two_qs") == "True"
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            if is_corrupt_safetensors(e):
                raise UserError(f"{path} is truncated or corrupt ({str(e).strip()}); it cannot be read") from None
            raise
        hidden, vocab = sd["qs.0.0.weight"].shape[1], sd["qs.0.2.weight"].shape[0]
        heads = cls(hidden, vocab, two_qs)
        heads.load_state_dict(sd)
        return heads


class PolicyWithILQLHeads(nn.Module):
    def __init__(self, policy, heads: ILQLHeads):
        super().__init__()
        self.policy, self.heads = policy, heads

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids, attention_mask):
        out, hidden = forward_with_hidden(self.policy, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        qs, target_qs, v = self.heads(hidden)
        return out.logits, qs, target_qs, v

    def save_pretrained(self, dest, state_dict=None, safe_serialization=True, **kw):
        state_dict = state_dict if state_dict is not None else self.state_dict()
        lm = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        self.policy.save_pretrained(dest, state_dict=lm, safe_serialization=True)
        self.heads.save(dest, {k.removeprefix("heads."): v for k, v in state_dict.items() if k.startswith("heads.")})


class PooledReward(nn.Module):
    """A reward model's training forward: one scalar per sequence, read at its last real token.

    A module of its own so that DDP / DeepSpeed wrap the whole computation (the score head included);
    `save_pretrained` writes the plain sequence classifier inside.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids=None, attention_mask=None, shared=None):
        """Rewards of the rows of `input_ids`, or of the completions of a `shared_prompt.Shared` batch."""
        if shared is not None:
            return completion_rewards(self.model, shared)
        return sequence_rewards(self.model, input_ids, attention_mask)

    def save_pretrained(self, dest, state_dict=None, safe_serialization=True, **kw):
        sd = None if state_dict is None else {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.model.save_pretrained(dest, state_dict=sd, safe_serialization=True)
