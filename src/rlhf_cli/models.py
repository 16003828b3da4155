"""Loading policies: the embedded tiny GPT-2 (built from a config, BPE trained on the data), a
local checkpoint directory, or a hub name. Checks that a checkpoint is of the kind a stage expects.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .hub import hub_error, hub_reachable, offline_mode

EOS = "<|endoftext|>"
PAD = "<|pad|>"

POLICY_ARCH = "ForCausalLM"
REWARD_ARCH = "ForSequenceClassification"


def train_tokenizer(texts, vocab_size: int, model_max_length: int):
    """A byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer.

    EOS doubles as BOS/UNK (GPT-2's convention); PAD is its own token so padding never masks an
    EOS the model must learn to emit.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=PAD, model_max_length=model_max_length)


def build_tiny(tiny_cfg, tokenizer, seed: int):
    """A GPT-2-architecture causal LM built from `tiny_cfg` (no download)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if tiny_cfg.n_embd % tiny_cfg.n_head:
        raise UserError(f"model.tiny.n_embd ({tiny_cfg.n_embd}) must be divisible by model.tiny.n_head "
                        f"({tiny_cfg.n_head})")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=tiny_cfg.n_positions, n_embd=tiny_cfg.n_embd,
        n_layer=tiny_cfg.n_layer, n_head=tiny_cfg.n_head, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=tiny_cfg.dropout, embd_pdrop=tiny_cfg.dropout, attn_pdrop=tiny_cfg.dropout,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def read_model_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def checkpoint_kind(path: Path) -> str | None:
    """'policy', 'reward' or None, from the architectures in a local checkpoint's config.json."""
    archs = read_model_config(path).get("architectures") or []
    if any(a.endswith(REWARD_ARCH) for a in archs):
        return "reward"
    if any(a.endswith((POLICY_ARCH, "LMHeadModel")) for a in archs):
        return "policy"
    return None


def expect_kind(path: Path, kind: str, flag: str) -> None:
    """Refuse, before any training, a local checkpoint of the wrong kind."""
    if not (path / "config.json").exists():
        raise UserError(f"{flag} {path} is not a model checkpoint (no config.json)")
    found = checkpoint_kind(path)
    if found is not None and found != kind:
        want = "a policy (causal LM)" if kind == "policy" else "a reward model (sequence classifier)"
        raise UserError(f"{flag} {path} is a {found} checkpoint, but {want} is expected here")


def _pretrained(loader, name: str, what: str, **kw):
    """`loader.from_pretrained(name)`, local first; one sentence when the hub is out of reach."""
    local = Path(name).expanduser()
    if local.exists():
        try:
            return loader.from_pretrained(str(local), **kw)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load {what} from {local}: {str(e).strip().splitlines()[0]}") from None
    if not offline_mode() and not hub_reachable():
        kw = {**kw, "local_files_only": True}  # the cache may have it; skip the slow retries
    try:
        return loader.from_pretrained(name, **kw)
    except Exception as e:  # OSError, requests/httpx errors, HfHubHTTPError, ...
        raise hub_error(what, name, e) from None


def load_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = _pretrained(AutoTokenizer, name, "tokenizer", trust_remote_code=trust_remote_code, revision=revision)
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer '{name}' has no EOS token; completions could not be terminated")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # GPT-2 convention; labels are masked by position, not by id
    return tok


def load_causal_lm(name: str, model_cfg):
    import torch
    from transformers import AutoModelForCausalLM

    local = Path(name).expanduser()
    if local.exists():
        expect_kind(local, "policy", "model.name_or_path")
    dtype = "auto" if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype)
    return _pretrained(AutoModelForCausalLM, name, "model", dtype=dtype, revision=model_cfg.revision,
                       trust_remote_code=model_cfg.trust_remote_code)


def check_vocab(tokenizer, model, where: str) -> None:
    n_tok, n_emb = len(tokenizer), model.get_input_embeddings().weight.shape[0]
    if n_tok > n_emb:
        raise UserError(
            f"the tokenizer of {where} has {n_tok} tokens but the model's embedding has only {n_emb} rows; "
            "they do not belong together"
        )


def load_policy(cfg, train_texts=None):
    """(tokenizer, model) of `cfg.model` / `cfg.tokenizer`; 'tiny' builds both from the data."""
    if cfg.model.name_or_path == "tiny":
        if cfg.tokenizer.name_or_path:
            tok = load_tokenizer(cfg.tokenizer.name_or_path)
        else:
            if not train_texts:
                raise UserError("the tiny model trains its tokenizer on the data, but there is no training text")
            tok = train_tokenizer(train_texts, cfg.tokenizer.vocab_size, cfg.model.tiny.n_positions)
        model = build_tiny(cfg.model.tiny, tok, cfg.seed)
        return tok, model
    tok = load_tokenizer(cfg.tokenizer.name_or_path or cfg.model.name_or_path, cfg.model.trust_remote_code,
                         cfg.model.revision)
    model = load_causal_lm(cfg.model.name_or_path, cfg.model)
    check_vocab(tok, model, cfg.tokenizer.name_or_path or cfg.model.name_or_path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return tok, model


def max_positions(model) -> int | None:
    c = model.config
    return getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
