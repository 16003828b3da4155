"""The GPU-only paths of LoRA, run where a CUDA GPU is: QLoRA (4-bit and 8-bit bitsandbytes) on every stage, the
attention kernels, and whether the `llama3.1-8b-lora` presets of chat_dpo.yaml / chat_ppo.yaml fit one 80 GB GPU.

    python benchmarks/gpu.py --tokenizer ../shared/data/gpt2_tokenizer --out gpu.json [--only tiny,attn,dpo8b,ppo8b]
    python benchmarks/gpu.py --write gpu.json        # its section of benchmarks/RESULTS.md

No download: every model is random-init from its config class (Llama-3.1-8B's shape for the presets) with the GPT-2
tokenizer and ChatML, and every dataset is generated, so the numbers are memory and mechanics, not quality. Each
check runs `rlhf` in its own process; the 8B ones are the presets as written, given local paths and long rows
(prompts of 512 tokens, pairs cut at 1024; PPO's random policy rarely ends early, so every rollout is its full 256
new tokens) with fewer steps. Peak memory is torch's max_memory_allocated / max_memory_reserved of that process.
`--smoke` runs the same on CPU at toy sizes (no bitsandbytes, no 8B): the plumbing, before GPU time is spent.
Results go to `--out` after each check, so a check that runs out of time leaves the ones before it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "rlhf_cli" / "stage_configs"
CHATML = (CONFIGS / "chatml.jinja").read_text()
GOLD_FN = "rlhf_cli.data.synthetic:gold_reward_fn"
GiB = 1024 ** 3
CAP_GIB = 79.0  # an 80 GB H100's 79.6 GiB, less the CUDA context's ~0.6
DTYPE = {False: "bfloat16", True: "float32"}  # by --smoke: bf16 matmuls are slow on CPU
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                vocab_size=128256, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
           max_position_embeddings=2048)  # --smoke's stand-in for both, on CPU
SHORT = ["--set", "data.synthetic.num_train=256", "--set", "data.synthetic.num_eval=32", "--set", "train.max_steps=6",
         "--set", "eval.num_samples=16", "--set", "eval.generation.max_new_tokens=16", "--set", "checkpoint.interval=3"]
# the peak of the process that runs the stage, printed as it exits (the stage calls sys.exit)
PEAK = ("import atexit, os, sys, torch\n"
        "cap = float(os.environ.get('GPU_CAP_GIB', 0))\n"
        "if cap and torch.cuda.is_available():  # an 80 GB card's memory on a bigger one: over it is an OOM\n"
        "    torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)\n"
        "def _peak():\n"
        "    if torch.cuda.is_available():\n"
        "        print('PEAK_BYTES', torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), flush=True)\n"
        "atexit.register(_peak)\n"
        "from rlhf_cli.cli import main\n"
        "sys.argv = ['rlhf'] + sys.argv[1:]\n"
        "main()\n")


def child_env(cap_gib: float = 0) -> dict:
    """An `rlhf` process's environment: this checkout's code, offline; with `cap_gib`, the process may allocate
    no more GPU memory than that."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "160", "GPU_CAP_GIB": str(cap_gib)}


def rlhf(args: list[str], log: Path, timeout: float, cap_gib: float = 0) -> dict:
    """One `rlhf` command in its own process: exit code, seconds, peak GPU bytes, the output's last lines."""
    env = child_env(cap_gib)
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-c", PEAK, *args], env=env, capture_output=True, text=True, timeout=timeout)
        code, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code, text = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    log.write_text(text)
    peak = re.search(r"PEAK_BYTES (\d+) (\d+)", text)
    return {"exit": code, "seconds": round(time.time() - t0, 1), "tail": text.strip().splitlines()[-12:],
            **({"peak_allocated_gib": round(int(peak[1]) / GiB, 2), "peak_reserved_gib": round(int(peak[2]) / GiB, 2)}
               if peak else {})}


def tokenizer(src: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.chat_template = CHATML
    return tok


def build_llama(dest: Path, tok, shape: dict, device: str, reward: bool = False) -> Path:
    """A random-init Llama of `shape`, saved in bf16 (a sequence classifier with one label when `reward`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(**{**shape, "vocab_size": max(shape.get("vocab_size", 0), len(tok))}, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_labels=1)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: an 8B model in fp32 would be 32 GB
    try:
        with torch.device(device):
            model = (LlamaForSequenceClassification if reward else LlamaForCausalLM)(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dest


def long_rows(dest: Path, n: int, prompt_words: int, reply_words: int, pairs: bool) -> Path:
    """TRL's conversational rows (prompt messages, chosen / rejected replies, or prompts alone) of random words:
    a train and a test split."""
    rng = random.Random(0)
    vocab = "the a model reward policy summary post people time good bad long short data value token step".split()
    words = lambda k: " ".join(rng.choice(vocab) for _ in range(k))  # noqa: E731
    dest.mkdir(parents=True, exist_ok=True)
    for split, k in (("train", n), ("test", max(16, n // 4))):
        with open(dest / f"{split}.jsonl", "w") as f:
            for _ in range(k):
                row = {"prompt": [{"role": "user", "content": words(prompt_words)}]}
                if pairs:
                    row |= {"chosen": [{"role": "assistant", "content": words(reply_words)}],
                            "rejected": [{"role": "assistant", "content": words(reply_words)}]}
                f.write(json.dumps(row) + "\n")
    return dest


def merged_matches_adapter(ckpt: Path, quant: str | None) -> dict:
    """The merged checkpoint loads with plain transformers (no quantization config), and its logits against the
    quantized base + the saved adapter (PeftModel.from_pretrained), the training model's own form."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = json.loads((ckpt / "config.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    merged = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(device).eval()
    base_path = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    kw = {}
    if quant == "4bit":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16,
                                                       bnb_4bit_use_double_quant=True)
    elif quant == "8bit":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16, **kw)
    adapted = PeftModel.from_pretrained(base if quant else base.to(device), ckpt / "adapter").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a, b = merged(ids).logits.float(), adapted(ids).logits.float()
    return {"plain_config": "quantization_config" not in cfg, "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
            "max_abs_diff": round((a - b).abs().max().item(), 4), "logit_scale": round(b.abs().max().item(), 3),
            "rel_diff": round(((a - b).norm() / b.norm()).item(), 5),
            "argmax_agree": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4)}


def tiny_stages(work: Path, tok, smoke: bool, record, background: bool = False) -> None:
    """Every stage with LoRA on 4-bit base weights, DPO also on 8-bit: concurrent processes on the one GPU (in a
    thread when `background`, the model built first: build_llama sets torch's default dtype)."""
    device = "cpu" if smoke else "cuda"
    base = build_llama(work / "tiny_llama", tok, TOY if smoke else TINY, device)
    if background:
        return threading.Thread(target=_run_tiny, args=(work, base, smoke, record)).start()
    _run_tiny(work, base, smoke, record)


def _run_tiny(work: Path, base: Path, smoke: bool, record) -> None:
    lora = ["--set", "model.lora.r=8", "--set", "model.lora.alpha=16", "--set", f"model.dtype={DTYPE[smoke]}"]
    quant = [] if smoke else ["--set", "model.load_in_4bit=true"]
    c = lambda name: str(CONFIGS / name)  # noqa: E731
    runs = {
        "sft_4bit": ["sft", "--config", c("tldr_sft.yaml"), "--model", str(base)],
        "rm_4bit": ["train-rm", "--config", c("tldr_rm.yaml"), "--init-from", str(base)],
        "dpo_4bit": ["dpo", "--config", c("tldr_dpo.yaml"), "--policy", str(base)],
        "ppo_4bit": ["ppo", "--config", c("tldr_ppo.yaml"), "--policy", str(base), "--reward-fn", GOLD_FN, "--no-delta",
                     "--set", "ppo.num_rollouts=32", "--set", "ppo.chunk_size=16", "--set", "train.batch_size=8"],
        "grpo_4bit": ["grpo", "--config", c("tldr_grpo.yaml"), "--policy", str(base), "--reward-fn", GOLD_FN],
        "ilql_4bit": ["ilql", "--config", c("tldr_ilql.yaml"), "--policy", str(base)],
    }
    procs = {}
    env = child_env()
    cells = {name: [*args, "--output-dir", str(work / name), *SHORT, *lora, *quant] for name, args in runs.items()}
    if not smoke:
        cells["dpo_8bit"] = [*cells["dpo_4bit"][:-2], "--set", "model.load_in_8bit=true"]
        cells["dpo_8bit"][cells["dpo_8bit"].index("--output-dir") + 1] = str(work / "dpo_8bit")
    for name, args in cells.items():
        log = open(work / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, "-c", PEAK, *args], env=env, stdout=log, stderr=subprocess.STDOUT),
                       time.time())
    for name, (p, t0) in procs.items():
        try:
            code = p.wait(timeout=max(1, 180 - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            code = "timeout"
        text = (work / f"{name}.log").read_text()
        peak = re.search(r"PEAK_BYTES (\d+) (\d+)", text)
        out = {"exit": code, "seconds": round(time.time() - t0, 1), "tail": text.strip().splitlines()[-8:],
               **({"peak_reserved_gib": round(int(peak[2]) / GiB, 2)} if peak else {})}
        if code == 0:
            quant_kind = None if smoke else ("8bit" if "8bit" in name else "4bit")
            if name in ("sft_4bit", "dpo_4bit", "dpo_8bit", "ppo_4bit", "grpo_4bit"):
                try:
                    out["merged"] = merged_matches_adapter(work / name, quant_kind)
                except Exception as e:  # a finding, recorded, not a reason to stop the other checks
                    out["merged"] = {"error": f"{type(e).__name__}: {e}"}
        record(name, out)


def attention(work: Path, tok, smoke: bool, record) -> None:
    """eager against sdpa logits on the GPU (bf16), and flash_attention_2's preflight sentence when flash_attn
    is not installed (or a run when it is)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    base = work / "tiny_llama"
    device = "cpu" if smoke else "cuda"
    ids = torch.randint(0, len(tok), (4, 256), generator=torch.Generator().manual_seed(1)).to(device)
    logits = {}
    for impl in ("eager", "sdpa"):
        m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, attn_implementation=impl).to(device)
        with torch.no_grad():
            logits[impl] = m(ids).logits.float()
    d = (logits["eager"] - logits["sdpa"])
    record("attn_eager_vs_sdpa", {"max_abs_diff": round(d.abs().max().item(), 4),
                                  "rel_diff": round((d.norm() / logits["sdpa"].norm()).item(), 5)})
    run = rlhf(["dpo", "--config", str(CONFIGS / "tldr_dpo.yaml"), "--policy", str(base), "--output-dir",
                str(work / "dpo_flash"), *SHORT, "--set", f"model.dtype={DTYPE[smoke]}",
                "--set", "model.attn_implementation=flash_attention_2"], work / "dpo_flash.log", 120)
    run["flash_attn_installed"] = importlib.util.find_spec("flash_attn") is not None
    run["wrote_output"] = (work / "dpo_flash").exists()
    record("dpo_flash_attention_2", run)
    run = rlhf(["dpo", "--config", str(CONFIGS / "tldr_dpo.yaml"), "--policy", str(base), "--output-dir",
                str(work / "dpo_sdpa"), *SHORT, "--set", f"model.dtype={DTYPE[smoke]}",
                "--set", "model.attn_implementation=sdpa"], work / "dpo_sdpa.log", 120)
    record("dpo_sdpa", run)


def preset_8b(stage: str, work: Path, models: Path, tok, smoke: bool, record) -> None:
    """The llama3.1-8b-lora preset of chat_<stage>.yaml on a random-init model of Llama-3.1-8B's shape: a short
    real run and its peak GPU memory (the preset's --dry-run estimate needs no GPU: `write_results` adds it)."""
    shape = TOY if smoke else LLAMA_8B
    device = "cpu" if smoke else "cuda"
    t0 = time.time()
    policy = models / "llama8b"
    if not (policy / "config.json").exists():
        build_llama(policy, tok, shape, device)
    args = [stage, "--config", str(CONFIGS / f"chat_{stage}.yaml"), "--preset", "llama3.1-8b-lora",
            "--policy", str(policy), "--output-dir", str(models / f"{stage}8b_out"),
            "--set", "eval.num_samples=8", "--set", "eval.generation.max_new_tokens=64", "--set", "checkpoint.interval=1000"]
    if stage == "dpo":  # one optimizer step: 8 accumulated micro-batches of 2 pairs
        args += ["--data", str(long_rows(work / "pairs", 64, 700, 600, pairs=True)), "--set", "train.max_steps=1"]
    else:
        reward = models / "rm8b"
        if not (reward / "config.json").exists():
            build_llama(reward, tok, shape, device, reward=True)
        args += ["--data", str(long_rows(work / "prompts", 64, 700, 0, pairs=False)), "--reward-ckpt", str(reward),
                 "--set", "ppo.num_rollouts=8", "--set", "train.max_steps=8"]  # one generation chunk, 2 x 4 epochs
    if smoke:
        args += ["--set", "train.mixed_precision='no'", "--set", "eval.generation.max_new_tokens=8"]
        args += ["--set", "ppo.generation.max_new_tokens=8"] if stage == "ppo" else []
    built = round(time.time() - t0, 1)
    run = rlhf(args, work / f"{stage}8b.log", 240 if stage == "dpo" else 300, cap_gib=0 if smoke else CAP_GIB)
    run |= {"build_seconds": built, "cap_gib": CAP_GIB}
    if not smoke:
        import torch

        run["gpu"] = torch.cuda.get_device_name(0)
        run["fits_80gb"] = run["exit"] == 0 and run.get("peak_reserved_gib", 1e9) <= CAP_GIB
    record(f"{stage}_llama3.1-8b-lora", run)
    shutil.rmtree(models / f"{stage}8b_out", ignore_errors=True)  # 16 GB of merged weights: the disk is small


def environment() -> dict:
    import importlib.metadata as md

    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("transformers", "peft", "accelerate", "bitsandbytes", "flash_attn"):
        try:
            info[pkg] = md.version(pkg.replace("_", "-"))
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


def write_results(path: Path, results_md: Path) -> None:
    """benchmarks/RESULTS.md's GPU section from a results file."""
    r = json.loads(path.read_text())
    env = r["environment"]
    lines = [f"Run with `python benchmarks/gpu.py` on one {env['gpu']} (torch {env['torch']}, CUDA {env['cuda']}, "
             f"transformers {env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, "
             f"flash_attn {env['flash_attn'] or 'not installed'}); random-init models, generated data.", "",
             "| check | exit | seconds | peak reserved GiB | merged checkpoint vs quantized base + adapter |",
             "|---|---|---:|---:|---|"]
    for name, v in r["checks"].items():
        if "exit" not in v:
            continue
        peak = re.search(r"PEAK_BYTES (\d+) (\d+)", "\n".join(v.get("tail", [])))
        v.setdefault("peak_reserved_gib", round(int(peak[2]) / GiB, 2) if peak else "")
        error = next((t.removeprefix("error: ") for t in v.get("tail", []) if t.startswith("error:")), "")
        m = v.get("merged", {"error": error[:90]})
        merged = (f"plain config {m['plain_config']}, rel. diff {m['rel_diff']}, argmax agree {m['argmax_agree']}"
                  if "rel_diff" in m else m.get("error", ""))
        lines.append(f"| {name} | {v['exit']} | {v['seconds']} | {v.get('peak_reserved_gib', '')} | {merged} |")
    sys.path.insert(0, str(ROOT / "src"))
    from rlhf_cli.config import load_config
    from rlhf_cli.memory import estimate

    for stage in ("dpo", "ppo"):
        v = r["checks"].get(f"{stage}_llama3.1-8b-lora")
        if v:
            cfg = load_config(CONFIGS / f"chat_{stage}.yaml", stage, preset="llama3.1-8b-lora")
            lines.append(f"\n`chat_{stage}.yaml --preset llama3.1-8b-lora` (random-init Llama-3.1-8B shape, capped at "
                         f"{v['cap_gib']} GiB): exit {v['exit']}, peak {v.get('peak_allocated_gib')} GiB allocated / "
                         f"{v.get('peak_reserved_gib')} GiB reserved; --dry-run estimate: "
                         f"{estimate(cfg, cfg.model.name_or_path).split('); ')[0]})."
)
    begin, end = "<!-- gpu:begin -->", "<!-- gpu:end -->"
    text = results_md.read_text()
    block = f"{begin}\n" + "\n".join(lines) + f"\n{end}"
    text = re.sub(f"{begin}.*?{end}", block, text, flags=re.S) if begin in text else text + f"\n## GPU checks\n\n{block}\n"
    results_md.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "data" / "gpt2_tokenizer"))
    ap.add_argument("--work", default="/tmp/rlhf_gpu")
    ap.add_argument("--models", default=None, help="where the 8B checkpoints go (default: --work)")
    ap.add_argument("--out", default="gpu.json")
    ap.add_argument("--only", default="tiny,attn,dpo8b,ppo8b", help="in order; tiny& runs beside the next ones")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: the plumbing only")
    ap.add_argument("--write", default=None, help="write RESULTS.md's GPU section from this results file")
    a = ap.parse_args()
    if a.write and not Path(a.write).is_file():
        ap.error(f"--write {a.write}: no such results file (python benchmarks/gpu.py --out FILE writes one)")
    if a.write:
        return write_results(Path(a.write), ROOT / "benchmarks" / "RESULTS.md")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "checks": {}}
    out = Path(a.out)

    lock = threading.Lock()

    def record(name, value):
        with lock:
            results["checks"][name] = value
            out.write_text(json.dumps(results, indent=1))
            print(name, json.dumps(value)[:600], flush=True)

    record("started", {"time": time.strftime("%H:%M:%S")})
    tok = tokenizer(a.tokenizer)
    models = Path(a.models or work)
    steps = {"tiny": lambda: tiny_stages(work, tok, a.smoke, record),
             "tiny&": lambda: tiny_stages(work, tok, a.smoke, record, background=True),
             "attn": lambda: attention(work, tok, a.smoke, record),
             "dpo8b": lambda: preset_8b("dpo", work, models, tok, a.smoke, record),
             "ppo8b": lambda: preset_8b("ppo", work, models, tok, a.smoke, record)}
    for name in a.only.split(","):
        try:
            steps[name]()
        except Exception as e:  # recorded; the next check still runs
            record(f"{name}_error", {"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
