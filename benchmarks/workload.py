"""The benchmark's workloads: one model, tokenizer and data set per size, saved to disk, that both
sides (rlhf_cli and TRL) load. Real TL;DR posts and summaries from ../shared/data, cut so that
every sequence fits `max_length` (neither side truncates or filters anything).

    workdir/<size>/model   GPT-2 causal LM + tokenizer (the SFT, DPO and PPO policy)
    workdir/<size>/rm      GPT-2 sequence classifier (num_labels=1) + tokenizer (RM init, PPO reward)
    workdir/<size>/data_sft/{train,test}.jsonl      {"prompt", "label"}
    workdir/<size>/data_rm/{train,test}.jsonl       {"prompt", "chosen", "rejected"}, EOS written out
    workdir/<size>/data_dpo/{train,test}.jsonl      {"prompt", "chosen", "rejected"}
    workdir/<size>/data_prompts/{train,test}.jsonl  {"prompt", "label"} (PPO and GRPO prompts)
    workdir/<size>/spec.json      SIZES[size] plus the paths
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tldr"
EOS = "<|endoftext|>"

# Per method: batch (examples or pairs per optimizer step), steps, learning rate. PPO: rollouts per
# iteration, iterations, mini-batch, PPO epochs, new tokens per rollout. GRPO: G completions of each prompt,
# completions per iteration (one generation batch), iterations, micro-batch x gradient-accumulation steps
# (rollouts = batch_size x grad_accum: one optimizer step per generation batch, TRL's default layout),
# new tokens per completion; beta 0, loss "dapo", one pass (num_iterations 1), reward `length_reward`.
SIZES = {
    "tiny": {
        "model": {"n_layer": 2, "n_embd": 128, "n_head": 4},
        "vocab_size": 2000, "max_length": 128, "max_prompt_length": 96, "max_completion_length": 32,
        "sft": {"batch_size": 8, "steps": 40, "lr": 1e-3},
        "rm": {"batch_size": 8, "steps": 30, "lr": 1e-4},
        "dpo": {"batch_size": 8, "steps": 20, "lr": 1e-4},
        "ppo": {"rollouts": 32, "iterations": 8, "mini_batch": 8, "ppo_epochs": 2, "max_new_tokens": 24,
                "chunk_size": 16, "lr": 1e-5, "kl_coef": 0.05},
        "grpo": {"generations": 4, "rollouts": 32, "iterations": 16, "batch_size": 8, "grad_accum": 4,
                 "max_new_tokens": 24, "lr": 1e-5},
    },
    "medium": {
        "model": {"n_layer": 6, "n_embd": 256, "n_head": 8},
        "vocab_size": 2000, "max_length": 256, "max_prompt_length": 208, "max_completion_length": 48,
        # enough steps that the min-max range of the A/B ratios is tight (1-6 steps were not)
        "sft": {"batch_size": 8, "steps": 24, "lr": 1e-3},
        "rm": {"batch_size": 8, "steps": 16, "lr": 1e-4},
        "dpo": {"batch_size": 8, "steps": 12, "lr": 1e-4},
        "ppo": {"rollouts": 16, "iterations": 3, "mini_batch": 8, "ppo_epochs": 2, "max_new_tokens": 32,
                "chunk_size": 16, "lr": 1e-5, "kl_coef": 0.05},
        "grpo": {"generations": 4, "rollouts": 16, "iterations": 4, "batch_size": 8, "grad_accum": 2,
                 "max_new_tokens": 32, "lr": 1e-5},
    },
}


def rss_mb() -> float | None:
    """This process's resident memory now, MiB (Linux; None elsewhere): the baseline that the GRPO cells'
    peak RSS (ru_maxrss) is also given over."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def length_reward(prompts=None, completions=None, outputs=None, **_):
    """The GRPO cells' reward, the same function on both sides: the completion's length in characters / 100
    (cheap and deterministic, so scoring costs next to nothing on either side). rlhf_cli calls it as
    fn(samples=, prompts=, outputs=, references=) (`reward.fn: workload:length_reward`), TRL as
    fn(prompts=, completions=, completion_ids=, ...); both pass the completion text decoded without
    special tokens."""
    texts = completions if completions is not None else outputs
    return [len(t) / 100 for t in texts]


def _posts() -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(prompt, summary) and (prompt, chosen, rejected) with ' summary' completions."""
    sft = []
    for line in (DATA / "tldr_sft_carper_format.jsonl").read_text().splitlines():
        r = json.loads(line)
        sft.append((r["prompt"], " " + r["label"].strip()))
    pairs = []
    for line in (DATA / "tldr_pairs_gpt4judged.jsonl").read_text().splitlines():
        r = json.loads(line)
        c, j = (" " + s.strip().removeprefix("TL;DR:").strip() for s in (r["chosen"], r["rejected"]))
        if c != j:
            pairs.append((r["prompt"].rstrip() + "\nTL;DR:", c, j))
    return sft, pairs


def _fit(tok, prompt: str, completions: list[str], size: dict) -> tuple[str, list[str]] | None:
    """Cut the prompt's head and the completions' tails (at token boundaries, then re-checked) so that
    prompt + completion + EOS fits max_length whether tokenized jointly (TRL) or separately (ours)."""
    def n(s):
        return len(tok(s, add_special_tokens=False)["input_ids"])

    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) > size["max_prompt_length"]:
        prompt = tok.decode(ids[-size["max_prompt_length"]:])
        # start the kept prompt at a word (joint and separate tokenization then agree); re-tokenized
        # text can be longer than the ids it came from, so drop words until it fits
        while " " in prompt and n(prompt := prompt[prompt.find(" ") + 1:]) > size["max_prompt_length"]:
            pass
        if n(prompt) > size["max_prompt_length"]:
            return None
    out = []
    for c in completions:
        cids = tok(c, add_special_tokens=False)["input_ids"][: size["max_completion_length"]]
        c = tok.decode(cids).rstrip()
        if len(c.strip()) < 3:
            return None
        out.append(c)
    for c in out:
        joint = n(prompt + c)
        if joint != n(prompt) + n(c) or joint + 1 > size["max_length"]:
            return None
    return prompt, out


def build(workdir: Path, size_name: str, seed: int = 0) -> dict:
    """Build (once) and return the spec of `size_name`'s workload."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from rlhf_cli.models import train_tokenizer

    size = SIZES[size_name]
    root = workdir / size_name
    spec_path = root / "spec.json"
    if spec_path.exists():  # reused unless SIZES changed since it was built
        spec = json.loads(spec_path.read_text())
        if all(spec.get(k) == v for k, v in size.items()):
            return spec
    root.mkdir(parents=True, exist_ok=True)
    sft_raw, pair_raw = _posts()
    tok = train_tokenizer([p + c for p, c in sft_raw], size["vocab_size"], size["max_length"])

    rng = random.Random(seed)
    sft = [f for p, c in sft_raw if (f := _fit(tok, p, [c], size))]
    pairs = [f for p, c, r in pair_raw if (f := _fit(tok, p, [c, r], size))]
    rng.shuffle(sft)
    rng.shuffle(pairs)
    # ours reads a directory with train/test files (its held-out split, which no timed loop uses)
    def write(name, rows):
        (root / name).mkdir(exist_ok=True)
        for split, part in (("train", rows[:-8]), ("test", rows[-8:])):
            with open(root / name / f"{split}.jsonl", "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in part)

    write("data_sft", [{"prompt": p, "label": c} for p, (c,) in sft])
    # the reward model reads the score at EOS: written out so that TRL (which appends EOS when absent)
    # and ours (which scores the text as given) see the same tokens
    write("data_rm", [{"prompt": p, "chosen": c + EOS, "rejected": r + EOS} for p, (c, r) in pairs])
    write("data_dpo", [{"prompt": p, "chosen": c, "rejected": r} for p, (c, r) in pairs])
    write("data_prompts", [{"prompt": p, "label": c} for p, (c,) in sft])

    m = size["model"]
    config = GPT2Config(vocab_size=len(tok), n_positions=size["max_length"] + 16, n_embd=m["n_embd"],
                        n_layer=m["n_layer"], n_head=m["n_head"], bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1)
    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(config)
    policy.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    torch.manual_seed(seed + 1)
    rm = GPT2ForSequenceClassification(config)
    rm.transformer.load_state_dict(policy.transformer.state_dict())
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")

    spec = {"size": size_name, **size, "root": str(root), "model_dir": str(root / "model"),
            "rm_dir": str(root / "rm"),
            **{f"data_{k}": str(root / f"data_{k}") for k in ("sft", "rm", "dpo", "prompts")}, "num_sft": len(sft), "num_pairs": len(pairs),
            "params": sum(p.numel() for p in policy.parameters())}
    spec_path.write_text(json.dumps(spec, indent=1))
    return spec


if __name__ == "__main__":
    import sys

    for name in sys.argv[2:] or SIZES:
        s = build(Path(sys.argv[1]), name)
        print(name, s["num_sft"], "sft examples,", s["num_pairs"], "pairs,", s["params"], "parameters")
