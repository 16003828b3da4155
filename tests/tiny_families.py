"""Tiny random-init models of every causal-LM family the toolkit is tested on (hidden 32, 2 blocks), built
from each family's own config class: no download. Used by the family x stage matrix and by the speed-path
equivalence tests."""

import torch
import transformers

# hidden 32, 4 heads of 8 (2 key/value heads where the family has grouped-query attention), 2 blocks
_GQA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
FAMILIES = {
    "llama": ("LlamaConfig", _GQA),
    "qwen2": ("Qwen2Config", _GQA),
    "qwen3": ("Qwen3Config", {**_GQA, "head_dim": 8}),
    "mistral": ("MistralConfig", _GQA),
    "gemma3": ("Gemma3TextConfig", {**_GQA, "head_dim": 8}),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=256)),
    "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=256)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    # OPT-350m's shape: embeddings narrower than the blocks, projected in before them and out after them
    "opt_projected": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                        word_embed_proj_dim=16, max_position_embeddings=256)),
}
NUM_LAYERS = 2
# a multimodal checkpoint: Gemma3ForConditionalGeneration, the text model beside a SigLIP vision tower of 3
# blocks (more than the text's, so that the longest list of blocks alone would be the wrong one)
MULTIMODAL = "gemma3_vision"
ALL = [*FAMILIES, MULTIMODAL]


def config(family: str, vocab_size: int = 300, bos: int = 0, eos: int = 0, pad: int = 1, **extra):
    if family == MULTIMODAL:
        return _multimodal_config(config("gemma3", vocab_size + 3, bos, eos, pad, **extra))
    name, kw = FAMILIES[family]
    return getattr(transformers, name)(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                                       **{**kw, **extra})


def positions(family: str, n: int) -> dict:
    """The config keyword that sets `family`'s number of positions to n."""
    return {"n_positions" if "n_positions" in FAMILIES[family][1] else "max_position_embeddings": n}


# Sliding-window attention over 4 tokens where a family has it: shorter than the test sequences, so the
# windowed masks and caches are exercised (the real windows, 512 to 4096, are longer than any test).
_WINDOW = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}
SLIDING = {"mistral": {"sliding_window": 4}, "gemma3": {"sliding_window": 4}, MULTIMODAL: {"sliding_window": 4},
           "qwen2": _WINDOW, "qwen3": _WINDOW}


def _multimodal_config(text):
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=28, patch_size=14)
    n = text.vocab_size  # three image tokens above the text's vocabulary: the text never holds one
    return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                     image_token_index=n - 1, boi_token_index=n - 3, eoi_token_index=n - 2)


def build(family: str, head: str = "causal", seed: int = 0, **kw):
    """A tiny `family` causal LM (`head` 'causal') or one-output sequence classifier ('reward')."""
    auto = transformers.AutoModelForCausalLM if head == "causal" else transformers.AutoModelForSequenceClassification
    cfg = config(family, **kw)
    if head != "causal":
        cfg.num_labels = 1
    torch.manual_seed(seed)
    return auto.from_config(cfg)


def save(family: str, tok, out):
    """A tiny `family` policy with `tok` (its special-token ids in the config), saved like a hub model."""
    model = build(family, vocab_size=len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
