"""Loading policies: the embedded tiny GPT-2 (built from a config, BPE trained on the data), a
local checkpoint directory, or a hub name. Checks that a checkpoint is of the kind a stage expects.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import threading
from pathlib import Path

from .errors import UserError, is_corrupt_safetensors
from .hub import hub_error, hub_reachable, no_hub_kernels_offline, offline_mode

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


def build_tiny(tiny_cfg, tokenizer, seed: int, fuse: bool = True):
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
        model = GPT2LMHeadModel(config)
    return fuse_gelu(model) if fuse else model


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
    if any(a.endswith((POLICY_ARCH, "LMHeadModel")) or a in _causal_lm_classes() for a in archs):
        return "policy"
    return None


@functools.lru_cache(maxsize=None)
def _causal_lm_classes() -> frozenset:
    """The classes AutoModelForCausalLM builds: some are named otherwise (Gemma3ForConditionalGeneration)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def expect_kind(path: Path, kind: str, flag: str) -> None:
    """Refuse, before any training, a local checkpoint of the wrong kind."""
    if not (path / "config.json").exists():
        raise UserError(f"{flag} {path} is not a model checkpoint (no config.json)")
    found = checkpoint_kind(path)
    if found is not None and found != kind:
        want = "a policy (causal LM)" if kind == "policy" else "a reward model (sequence classifier)"
        raise UserError(f"{flag} {path} is a {found} checkpoint, but {want} is expected here")


def load_pretrained(loader, name: str, what: str, **kw):
    """`loader.from_pretrained(name)`, local first; one sentence when the hub is out of reach."""
    no_hub_kernels_offline()
    local = Path(name).expanduser()
    if local.exists():
        try:
            return loader.from_pretrained(str(local), **kw)
        except Exception as e:  # OSError, ValueError, safetensors' own error for a truncated file
            if not isinstance(e, (OSError, ValueError)) and not is_corrupt_safetensors(e):
                raise
            why = "a weights file is truncated or corrupt" if is_corrupt_safetensors(e) else str(e).strip().splitlines()[0]
            raise UserError(f"cannot load {what} from {local}: {why}") from None
    if not offline_mode() and not hub_reachable():
        kw = {**kw, "local_files_only": True}  # the cache may have it; skip the slow retries
    try:
        return loader.from_pretrained(name, **kw)
    except Exception as e:  # OSError, requests/httpx errors, HfHubHTTPError, ...
        raise hub_error(what, name, e) from None


def load_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = load_pretrained(AutoTokenizer, name, "tokenizer", trust_remote_code=trust_remote_code, revision=revision)
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
    model = load_pretrained(AutoModelForCausalLM, name, "model", dtype=dtype, revision=model_cfg.revision,
                            trust_remote_code=model_cfg.trust_remote_code, **loading_options(model_cfg))
    if getattr(model_cfg, "load_in_4bit", False) or getattr(model_cfg, "load_in_8bit", False):
        from peft import prepare_model_for_kbit_training  # norms in fp32, input grads for the adapters

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return fuse_gelu(model) if model_cfg.fuse_gelu else model


def loading_options(model_cfg) -> dict:
    """from_pretrained's attention kernel and bitsandbytes quantization (QLoRA), as configured."""
    kw: dict = {}
    if getattr(model_cfg, "attn_implementation", None):
        kw["attn_implementation"] = model_cfg.attn_implementation
    if getattr(model_cfg, "load_in_4bit", False) or getattr(model_cfg, "load_in_8bit", False):
        import torch
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = (BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True) if model_cfg.load_in_4bit else BitsAndBytesConfig(load_in_8bit=True))
    return kw


def fuse_gelu(model):
    """GPT-2's `gelu_new` is eight elementwise ops in Python (each a pass over the 4H-wide MLP
    activations, forward and backward); PyTorch's tanh-approximated GELU is the same function in one
    kernel: up to a third of a small GPT-2's step on CPU. Only the module changes: the saved config
    still says gelu_new and loads anywhere."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
    return model


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
        model = build_tiny(cfg.model.tiny, tok, cfg.seed, cfg.model.fuse_gelu)
        return with_chat_template(tok, cfg), model
    tok = load_tokenizer(cfg.tokenizer.name_or_path or cfg.model.name_or_path, cfg.model.trust_remote_code,
                         cfg.model.revision)
    model = load_causal_lm(cfg.model.name_or_path, cfg.model)
    check_vocab(tok, model, cfg.tokenizer.name_or_path or cfg.model.name_or_path)
    default_pad_id(model, tok)
    return with_chat_template(tok, cfg), model


# the tiny model's chat template when its data is conversational (its tokenizer is ours to give one)
TINY_CHAT_TEMPLATE = Path(__file__).resolve().parent / "stage_configs" / "chatml.jinja"


def with_chat_template(tok, cfg):
    """`data.chat_template` becomes the tokenizer's own, so the checkpoint's tokenizer renders prompts the
    way its policy was trained (for the next stage and for plain transformers)."""
    template = getattr(getattr(cfg, "data", None), "chat_template", None)
    if template:
        tok.chat_template = Path(template).expanduser().read_text(encoding="utf-8")
    return tok


def text_config(model):
    """The config that holds the text model's token ids: the model's own, or a multimodal one's `text_config`
    (where transformers reads the pad id, e.g. to pool a sequence classifier)."""
    return model.config.get_text_config()


def default_pad_id(model, tok) -> None:
    """The tokenizer's pad id where the checkpoint names none."""
    text = text_config(model)
    if getattr(text, "pad_token_id", None) is None:
        text.pad_token_id = tok.pad_token_id


def check_policy_source(path: str, stage: str) -> None:
    """`--policy` of a later stage, checked before anything is created: not 'tiny', and a policy if local."""
    if path == "tiny":
        raise UserError(f"{stage} needs a trained policy to start from: pass --policy runs/sft")
    local = Path(path).expanduser()
    if local.exists():
        expect_kind(local, "policy", "--policy")


def load_trained_policy(cfg, path: str, stage: str):
    """(tokenizer, causal LM) of the policy a later stage starts from (`--policy`): a trained checkpoint or a
    hub name, never 'tiny'; its kind and vocabulary are checked and its pad id set."""
    check_policy_source(path, stage)
    tok = load_tokenizer(cfg.tokenizer.name_or_path or path, cfg.model.trust_remote_code, cfg.model.revision)
    model = load_causal_lm(path, cfg.model)
    check_vocab(tok, model, cfg.tokenizer.name_or_path or path)
    default_pad_id(model, tok)
    return with_chat_template(tok, cfg), model


def load_reward_model(name: str, model_cfg, tokenizer):
    """A sequence classifier with one output (the TRL/OpenRLHF convention) from a policy or RM checkpoint."""
    import torch
    from transformers import AutoModelForSequenceClassification

    dtype = "auto" if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype)
    model = load_pretrained(AutoModelForSequenceClassification, name, "model", num_labels=1, dtype=dtype,
                            revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                            **loading_options(model_cfg))
    check_vocab(tokenizer, model, name)
    text_config(model).pad_token_id = tokenizer.pad_token_id  # HF's own pooling finds the last token by it
    return fuse_gelu(model) if model_cfg.fuse_gelu else model


def build_tiny_reward(tiny_cfg, tokenizer, seed: int, fuse: bool = True):
    """A tiny GPT-2 sequence classifier built from a config (no SFT parent)."""
    import torch
    from transformers import GPT2ForSequenceClassification

    policy = build_tiny(tiny_cfg, tokenizer, seed, fuse)
    policy.config.num_labels = 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2ForSequenceClassification(policy.config)
    return fuse_gelu(model) if fuse else model


def last_token_index(attention_mask):
    """(B,) index of the last attended token of each row; right or left padding alike.

    attention_mask: (B, T) with 1 on real tokens. The last 1 is at T - 1 - argmax(mask flipped).
    """
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(-1).int().argmax(-1)


def sequence_rewards(model, input_ids, attention_mask):
    """(B,) scalar reward of each sequence, read at its last non-padding token.

    Pools by the attention mask rather than by pad_token_id, so it stays right when the pad token
    equals EOS (GPT-2) and under left padding.
    """
    import torch

    idx = last_token_index(attention_mask)
    with tail_only(model, input_ids.shape[1] - int(idx.min())):  # read from the earliest last token on
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, H)
    return score_head(model)(last).squeeze(-1).float()  # (B,)


def score_head(model):
    """A sequence classifier's head on the pooled hidden state: `score` in most causal-LM families, else its
    one child with weights beside the base model (`classifier` in CTRL)."""
    import torch

    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        base = model.base_model
        heads = [m for m in model.children() if m is not base and next(m.parameters(), None) is not None]
        head = heads[0] if len(heads) == 1 else None
    if head is None:
        raise UserError(f"cannot find the classification head of {type(model).__name__} beside its base model")
    return head


def transformer_blocks(model):
    """The ModuleList of transformer blocks of a causal LM or sequence classifier, of any family."""
    return _find_blocks(unwrap(model))[1]


# Blocks under these words (in the path or the block's class) are a vision or audio tower's, not the text's.
NON_TEXT = ("vision", "visual", "audio", "image")


def _find_blocks(model):
    """(path, ModuleList) of the text blocks, from the model's own structure, not attribute names (GPT-2 `h`,
    Llama `layers`, OPT `decoder.layers`, Gemma 3 `language_model.layers`): the longest ModuleList of the
    decoder-layer classes transformers names in `_no_split_modules`, else the longest of one class."""
    import torch

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    named, uniform = [], []
    for path, m in model.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or len(m) == 0 or _non_text(path, m):
            continue
        classes = {type(b).__name__ for b in m}
        if classes <= layer_classes:  # several layer kinds are fine here (hybrid attention / SSM models)
            named.append((path, m))
        elif len(classes) == 1:
            uniform.append((path, m))
    found = named or uniform
    if not found:
        raise UserError(f"cannot find the transformer blocks of {type(model).__name__}: it has no list of "
                        "layers outside a vision or audio tower")
    return max(found, key=lambda x: len(x[1]))  # the first of equally long ones: the trunk comes first


def _non_text(path: str, blocks) -> bool:
    names = [path.lower()] + [type(b).__name__.lower() for b in blocks]
    return any(word in name for name in names for word in NON_TEXT)


def _below_blocks(model, path: str) -> list:
    """The modules that run before the blocks at `path`: every embedding outside them (input tokens, learned
    positions; not an output head), what the blocks' parent runs before them, and in a multimodal model the
    encoders that feed the text model (vision tower, projector). The final norm and the heads sit above."""
    import torch

    head = model.get_output_embeddings()
    below = [model.get_input_embeddings()]
    below += [m for name, m in model.named_modules()
              if isinstance(m, torch.nn.Embedding) and m is not head and not name.startswith(path + ".")]
    parent, _, blocks_name = path.rpartition(".")
    below += _run_before(model.get_submodule(parent), blocks_name)
    base = getattr(model, "base_model", model)
    module, inside = model, False
    for name in path.split(".")[:-1]:  # the ancestors above the blocks' own parent, from the top
        inside = inside or module is base
        if inside:  # within the base model, a sibling of the text model is an encoder of its input
            below += [child for n, child in module.named_children() if n != name]
        module = getattr(module, name)
    return below


def _run_before(parent, blocks_name: str) -> list:
    """The children of `parent` that its forward uses before the blocks (OPT-350m's `project_in`, BLOOM's
    embedding norm), by where `self.<child>` first appears in the family's own forward code; none when that
    code cannot be read."""
    import inspect
    import re

    try:
        src = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return []

    def first(name):
        found = re.search(rf"self\.{re.escape(name)}\b", src)
        return found.start() if found else None

    start = first(blocks_name)
    if start is None:
        return []
    return [child for name, child in parent.named_children()
            if name != blocks_name and (at := first(name)) is not None and at < start]


def freeze_bottom(model, num_frozen: int) -> None:
    """Freeze the bottom `num_frozen` blocks and everything under them (trlx's recipe).

    Embeddings sit below every block: if they trained, the "frozen" trunk's input would move. A
    tied LM head shares the input embedding's Parameter, so it is frozen with it.
    """
    if num_frozen <= 0:
        return
    model = unwrap(model)
    path, blocks = _find_blocks(model)
    for block in list(blocks)[:num_frozen]:
        block.requires_grad_(False)
    for module in _below_blocks(model, path):
        module.requires_grad_(False)


def train_top_blocks(model, k: int) -> None:
    """Train only the top k blocks (and what sits above them: final norm, head); -1 trains everything."""
    if k < 0:
        return
    n = len(transformer_blocks(model))
    if k > n:
        raise UserError(f"ppo.num_layers_unfrozen is {k} but the model has only {n} blocks")
    freeze_bottom(model, n - k)
    if k == 0:
        for block in transformer_blocks(model):
            block.requires_grad_(False)


def disable_dropout(model) -> None:
    """Dropout off: log-probs of the same tokens must not change between rollout and update (TRL does the same)."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        # rates kept as plain floats for functional dropout (OPT's `dropout`, `layerdrop`; `attention_dropout`)
        for name, value in list(vars(m).items()):
            if "drop" in name and isinstance(value, float):
                setattr(m, name, 0.0)


def frozen_block_count(model, fraction: float) -> int:
    return int(fraction * len(transformer_blocks(model)))


def max_positions(model) -> int | None:
    c = model.config.get_text_config()  # a multimodal model's positions are its text model's
    return getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def position_ids(attention_mask):
    """Positions counted over real tokens only, so a left-padded prompt starts at position 0 (as in generate)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def checkpointing(model, training_only: bool = False) -> bool:
    """Whether a block of `model` recomputes its activations in the backward pass (gradient checkpointing on:
    what transformers itself checks, its `is_gradient_checkpointing` being deprecated); `training_only`: and
    is in training mode, where the recomputation happens."""
    return any(getattr(m, "gradient_checkpointing", False) and (m.training or not training_only)
               for m in unwrap(model).modules())


@contextlib.contextmanager
def tail_only(model, keep: int):
    """Within: the last block computes its queries, attention, output projection and MLP on the last `keep`
    positions only (the rows before them come out as zeros); its keys and values still cover every position.

    For forward passes read at those positions alone (`logits_to_keep=keep`: PPO's and GRPO's response
    positions, a reference's log-probs, a sampling prefill's last position; a reward model's last tokens). No
    kept position needs an earlier one's output of the last block (every block's keys and values are needed at
    every position, and stay), so the kept outputs are unchanged; the skipped rows save the last block's Q, O and
    MLP (10·H² of its 12·H² per position) and their attention rows: a prompt's work in that block, but for its
    keys and values. Each part is skipped where the block has it: the MLP as one `mlp` module (not OPT's
    fc1/fc2, nor a mixture of experts, whose router would see fewer tokens), Q as its own projection (not GPT-2's
    fused c_attn), the attention rows under `sdpa`. A no-op where a backward pass would recompute the block
    (gradient checkpointing runs it again after this context has ended).
    """
    import torch

    try:
        block = transformer_blocks(model)[-1]
    except UserError:  # no list of blocks found: run it whole
        block = None
    c = unwrap(model).config.get_text_config()
    experts = any(getattr(c, k, 0) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    if keep <= 0 or block is None or (torch.is_grad_enabled() and checkpointing(model)):  # keep 0: every position
        yield
        return
    attn = next((m for n in ("self_attn", "attn", "attention", "self_attention")
                 if isinstance(m := getattr(block, n, None), torch.nn.Module)), None)
    rowwise = [None if experts else getattr(block, "mlp", None)]
    rowwise += [getattr(attn, n, None) for n in ("q_proj", "o_proj", "c_proj", "dense", "out_proj")]
    hooks = [h for m in rowwise if isinstance(m, torch.nn.Module) for h in _rows_hooks(m, keep)]
    try:
        with _tail_queries(attn, keep):
            yield
    finally:
        for h in hooks:
            h.remove()


def _rows_hooks(module, keep: int):
    """Hooks that run a position-wise `module` on the last `keep` rows of its (B, T, ...) input, zeros before."""
    from torch.nn.functional import pad

    skipped = []

    def before(_m, args):
        x = args[0]
        skipped.append(x.shape[1] - keep if x.dim() >= 3 else 0)
        return (x[:, -keep:].contiguous(), *args[1:]) if skipped[-1] > 0 else None

    def after(_m, _args, out):
        n = skipped.pop()
        return pad(out, (0, 0, n, 0)) if n > 0 else None

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


# `_tail_queries`: the attention modules whose queries are cut, per thread (and asyncio task), and how many of
# the contexts are open: transformers' sdpa function is replaced while any is, and restored after the last
_TAILS: contextvars.ContextVar[dict] = contextvars.ContextVar("rlhf_tail_queries", default={})
_SDPA = {"open": 0, "inner": None}
_SDPA_LOCK = threading.Lock()


@contextlib.contextmanager
def _tail_queries(attn, keep: int):
    """Within: `attn` (under `sdpa`) attends from its last `keep` query rows alone, over every key; the output's
    earlier rows are zeros. transformers calls the attention function registered under the config's
    implementation name, with the attention module first: while any of these contexts is open, that function
    is `_attend`, which cuts the queries of the modules this thread's open contexts name and passes every other
    call through unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as registry

    if getattr(getattr(attn, "config", None), "_attn_implementation", None) != "sdpa" or not getattr(attn, "is_causal", True):
        yield
        return
    with _SDPA_LOCK:
        if _SDPA["open"] == 0:
            _SDPA["inner"], registry["sdpa"] = registry["sdpa"], _attend
        _SDPA["open"] += 1
    token = _TAILS.set({**_TAILS.get(), id(attn): (attn, keep)})
    try:
        yield
    finally:
        _TAILS.reset(token)
        with _SDPA_LOCK:
            _SDPA["open"] -= 1
            if _SDPA["open"] == 0:
                registry["sdpa"] = _SDPA["inner"]


def _attend(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' sdpa attention, from the last `keep` query rows alone for a module `_tail_queries` names."""
    import torch
    from torch.nn.functional import pad

    inner = _SDPA["inner"]
    named = _TAILS.get().get(id(module))
    keep = named[1] if named is not None and named[0] is module else 0
    T, S = query.shape[2], key.shape[2]
    if not 0 < keep < T or (attention_mask is None and (T != S or kwargs.get("is_causal") is False)):
        return inner(module, query, key, value, attention_mask, *args, **kwargs)
    if attention_mask is None:  # causal (transformers leaves the mask out then): row i sees keys up to S - keep + i
        attention_mask = torch.ones(keep, S, dtype=torch.bool, device=query.device).tril(S - keep)
    elif attention_mask.shape[-2] == T:
        attention_mask = attention_mask[..., -keep:, :]
    out, weights = inner(module, query[:, :, -keep:], key, value, attention_mask, *args, **kwargs)
    return pad(out, (0, 0, 0, 0, T - keep, 0)), weights  # (B, T, heads, head_dim), as the module reshapes it


def forward_with_hidden(model, **inputs):
    """`model(**inputs)` and its final hidden state: the LM head's input (after the final norm, at the positions
    `logits_to_keep` keeps), read by a hook. `output_hidden_states=True` would keep every layer's output alive
    (n_layers + 1 tensors of B x T x H; gigabytes in a large model's no-grad prefill) where the value head and
    ILQL's heads read only the last."""
    seen = []
    hook = unwrap(model).get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        out = model(**inputs)
    finally:
        hook.remove()
    return out, seen[-1]


def new_cache(model, reserve: int = 0):
    """An empty transformers `DynamicCache` for `model`'s next cached forward passes. `reserve`: room for that
    many positions past the first update (a sampler's new tokens), so that each decode step writes its keys and
    values in place: a `DynamicLayer` concatenates, copying the whole cache once per layer and token."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=unwrap(model).config)
    if reserve > 0:  # sliding-window layers (Mistral's, Gemma's) keep their own
        cache.layers = [_reserved_layer()(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.lru_cache(maxsize=None)
def _reserved_layer():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are views of buffers with room to grow: an update that fits is
        a copy of the new positions alone. Any other change (cropping aside) makes new tensors of its own, and
        the next update new buffers."""

        def __init__(self, reserve: int):
            super().__init__()
            self.reserve, self.buffers = reserve, None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, new = self.get_seq_length(), key_states.shape[-2]
            if not self._fits(key_states, n + new):
                cap = n + new + self.reserve
                self.buffers = tuple(x.new_empty(*x.shape[:-2], cap, x.shape[-1]) for x in (key_states, value_states))
                if n:
                    self.buffers[0][..., :n, :].copy_(self.keys)
                    self.buffers[1][..., :n, :].copy_(self.values)
            keys, values = self.buffers
            keys[..., n: n + new, :].copy_(key_states)
            values[..., n: n + new, :].copy_(value_states)
            self.keys, self.values = keys[..., : n + new, :], values[..., : n + new, :]
            return self.keys, self.values

        def _fits(self, key_states, length: int) -> bool:
            if self.buffers is None or self.get_seq_length() == 0:
                return False
            keys, values = self.buffers
            return (keys.shape[-2] >= length and keys.shape[:-2] == key_states.shape[:-2]
                    and self.keys.data_ptr() == keys.data_ptr() and self.values.data_ptr() == values.data_ptr())

    return ReservedLayer


def with_cache(model, cache) -> dict:
    """The keyword that hands `cache` to `model`'s forward: `cache` in transformers >= 5.24, where
    `past_key_values` is deprecated, and `past_key_values` before."""
    return {_cache_keyword(type(unwrap(model))): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def unwrap(model):
    """The model inside DDP / DeepSpeed wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
