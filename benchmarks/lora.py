"""LoRA against a full fine-tune on CPU: peak memory and step time of `rlhf dpo` and `rlhf ppo` on a ~26M-parameter
Llama. Writes its section of benchmarks/RESULTS.md (between `<!-- lora:begin -->` and `<!-- lora:end -->`).

    python benchmarks/lora.py [--repeats 2] [--workdir .bench] [--results benchmarks/RESULTS.md]

The model: LlamaForCausalLM from LlamaConfig (SHAPE below), random init, with the medium workload's tokenizer
(workload.py: a 2000-token byte-level BPE trained on TL;DR) and its data (pairs and prompts cut to 256 tokens).
The regime is a LoRA user's: micro-batches of one pair / one rollout, 4 accumulated per optimizer step, so that
a micro-batch's activations (~0.35 MiB per token in fp32 at this shape, ~100 MiB for a ~290-token pair) are
about the weights' size (98 MiB); at micro-batch 4 they would be four times it, a regime an 8B model does not
reach at these lengths. PPO samples 4 rollouts per generation call for the same reason: the no-grad prefill of
16 prompts of ~210 tokens holds ~130 MiB of MLP activations and keys/values at this shape (more than the
weights; an 8B model's prefill of 16 x 512 tokens is a few percent of its 16 GB). Each cell is one stage run in its own process with one thread, configured by ours.py's
`stage_config` (fp32, AdamW, seed 0, same data), with the activations kept for the backward pass or recomputed
(gradient checkpointing; `--regimes`): `full` trains every weight (the
reference is a frozen copy of the policy), `lora` sets `model.lora` = LORA (the reference is the policy with
its adapters off). PPO's reward is workload.length_reward: no reward model is loaded, the memory is the
policy's. Repeats are interleaved (full, lora; then lora, full; ...); every number is the median of the repeats.

Measured in the child process (run with `--method`): peak RSS = ru_maxrss of the whole process (the final
checkpoint save included). Two things keep it to what the stage holds: glibc's malloc maps blocks of 128 KiB and
more (mallopt M_MMAP_THRESHOLD) and so returns a freed tensor's pages at once, as a GPU allocator's peak counts
live tensors (by default freed heap pages stay resident, and a run's varied shapes fragment the heap); and the
baseline is the process's VmRSS after a warm-up, the same cell run on a ~0.3M-parameter Llama of the same
vocabulary (every import and one-time set-up the stage makes, in both modes: transformers' Llama module, torch's
checkpointing, peft, the trainers), no model loaded. Over baseline = peak - baseline: what the stage adds
(weights, gradients, optimizer state, reference, activations, data). Time: the stage's own `train_loop` seconds
(rlhf_stage.json) / optimizer steps (DPO) or / iterations (PPO: sampling, reference, updates).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
import ours  # noqa: E402
import workload  # noqa: E402

BEGIN, END = bench.LORA_MARKERS
SHAPE = {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1408, "num_attention_heads": 8,
         "num_key_value_heads": 4, "max_position_embeddings": 512}
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}
DPO = {"batch_size": 1, "grad_accum": 4, "steps": 8, "lr": 1e-5}  # batch_size: the micro-batch
PPO = {"rollouts": 16, "iterations": 3, "mini_batch": 1, "grad_accum": 4, "ppo_epochs": 1, "max_new_tokens": 24,
       "chunk_size": 4, "lr": 1e-5, "kl_coef": 0.05}  # chunk_size: rollouts per generation call
REGIMES = {"kept": False, "recomputed": True}  # activations kept for the backward pass, or gradient checkpointing
CELLS = [f"{m}_{mode}_{regime}" for regime in REGIMES for m in ("dpo", "ppo") for mode in ("full", "lora")]
# the warm-up run's model: the same family and vocabulary, a few hundred KiB of weights
WARM_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 512}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def build(work: Path) -> dict:
    """The spec: the medium workload's data and tokenizer, our Llama beside it (built once)."""
    base = workload.build(work / "work", "medium")
    root = work / "work" / "lora"
    spec_path = root / "spec.json"
    spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    if (spec.get("shape") != SHAPE or spec.get("lora") != LORA or spec.get("base") != base["root"]
            or not (root / "warm" / "config.json").is_file()):
        from types import SimpleNamespace

        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from rlhf_cli import lora

        tok = AutoTokenizer.from_pretrained(base["model_dir"])
        config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **SHAPE)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.save_pretrained(root / "model")
        tok.save_pretrained(root / "model")
        warm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **WARM_SHAPE))
        warm.save_pretrained(root / "warm")
        tok.save_pretrained(root / "warm")
        params = sum(p.numel() for p in model.parameters())
        lora.inject(model, SimpleNamespace(**LORA))  # counted only: the saved model is the plain one
        spec = {"shape": SHAPE, "lora": LORA, "base": base["root"], "vocab_size": len(tok), "params": params,
                "adapter_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    # rm_dir: ours.stage_config names it for PPO's reward, which child() replaces with length_reward
    spec.update({k: base[k] for k in ("max_length", "max_prompt_length", "max_completion_length", "data_dpo",
                                      "data_prompts", "rm_dir")}, model_dir=str(root / "model"), warm_dir=str(root / "warm"), dpo=DPO,
                ppo=PPO)
    root.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1))
    return spec


def child(spec_path: str, cell: str, out: str) -> None:
    """One stage run in this process (bench.run_one starts it): its timing, peak RSS and baseline."""
    import ctypes
    import gc

    import torch

    # glibc keeps the heap pages of freed tensors (RSS would count what was once live, and how a run's varied
    # shapes fragment it); blocks of 128 KiB and more are mapped and unmapped instead, so the peak follows the
    # live tensors, as a GPU allocator's peak does
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    torch.set_num_threads(1)
    method, mode, regime = cell.split("_")
    spec = json.loads(Path(spec_path).read_text())
    # the warm-up: the same cell on a tiny model, so the baseline holds every import and one-time set-up the
    # stage makes (transformers' Llama module, torch's checkpointing and dynamo, peft, the trainers), in both modes
    run_stage(dict(spec, model_dir=spec["warm_dir"]), method, mode, regime, warm=True)
    gc.collect()
    base_rss = workload.rss_mb()
    loop, first = run_stage(spec, method, mode, regime)
    units = loop["optimizer_steps"] if method == "dpo" else loop["episodes"] // spec["ppo"]["rollouts"]
    result = {"cell": cell, "seconds": loop["seconds"], "units": units, "s_per_unit": loop["seconds"] / units,
              "optimizer_steps": loop["optimizer_steps"], "tokens": loop["tokens"], "first_loss": first.get("train/loss"),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base_rss}
    Path(out).write_text(json.dumps(result, indent=1))


def run_stage(spec: dict, method: str, mode: str, regime: str, warm: bool = False) -> tuple[dict, dict]:
    """`rlhf METHOD` on the spec's model, configured by ours.py: its train_loop record and first metrics row.
    warm: one optimizer step (DPO) or one iteration (PPO)."""
    import yaml

    from rlhf_cli import cli

    cfg = ours.stage_config(spec, method, seed=0)
    cfg["train"]["gradient_accumulation_steps"] = spec[method]["grad_accum"]
    cfg["train"]["gradient_checkpointing"] = REGIMES[regime]
    if method == "ppo":
        cfg["reward"] = {"fn": ours.LENGTH_REWARD, "delta": False}
    if mode == "lora":
        cfg["model"]["lora"] = LORA
    if warm and method == "dpo":
        cfg["train"]["max_steps"] = 1
    elif warm:
        cfg["data"]["max_examples"] = spec["ppo"]["rollouts"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, run = Path(tmp) / "stage.yaml", Path(tmp) / "run"
        cfg_path.write_text(yaml.safe_dump(cfg))
        sys.argv = ["rlhf", method, "--config", str(cfg_path), "--output-dir", str(run)]
        try:
            cli.main()
        except SystemExit as e:
            if e.code:
                raise
        loop = json.loads((run / "rlhf_stage.json").read_text())["train_loop"]
        first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return loop, first


def same_work(full: list[dict], lora: list[dict]) -> str:
    """Equal optimizer steps (and, DPO, tokens and first-step loss: LoRA's B = 0 starts at the same model)."""
    problems = set()
    for a, b in zip(full, lora):
        if a["optimizer_steps"] != b["optimizer_steps"]:
            problems.add(f"optimizer steps {a['optimizer_steps']} vs {b['optimizer_steps']}")
        if a["cell"].startswith("dpo") and (a["tokens"] != b["tokens"] or abs(a["first_loss"] - b["first_loss"]) > 1e-4):
            problems.add(f"tokens {a['tokens']} vs {b['tokens']}, first loss {a['first_loss']:.5f} vs {b['first_loss']:.5f}")
    return "yes" if not problems else "NO: " + "; ".join(sorted(problems))


def render(spec: dict, runs: dict, args, minutes: float) -> str:
    med = {c: {k: statistics.median(r[k] for r in runs[c]) for k in ("peak_rss_mb", "base_rss_mb", "s_per_unit")}
           for c in CELLS if runs.get(c)}
    for m in med.values():
        m["over"] = m["peak_rss_mb"] - m["base_rss_mb"]
    s, w_mib = spec["shape"], spec["params"] * 4 / 2**20
    lines = [BEGIN, "## LoRA against a full fine-tune: peak memory and step time (DPO, PPO)", "",
             f"Regenerated by `python benchmarks/lora.py`; do not edit by hand. Machine: {bench.machine()}, one thread "
             f"per run, no GPU. torch {version('torch')}, transformers {version('transformers')}, peft {version('peft')}. "
             f"{args.repeats} repeat(s), interleaved (full then LoRA, then LoRA then full, ...), each run its own "
             f"process; medians over the repeats. Whole run: {minutes:.1f} min.", "",
             f"- Model: Llama (`LlamaForCausalLM` from `LlamaConfig`, random init), hidden {s['hidden_size']}, "
             f"{s['num_hidden_layers']} layers, MLP {s['intermediate_size']}, {s['num_attention_heads']} heads / "
             f"{s['num_key_value_heads']} key-value heads, vocabulary {spec['vocab_size']} (the medium workload's "
             f"byte-level BPE), untied embeddings: **{spec['params']:,} parameters** ({w_mib:.0f} MiB in fp32). LoRA: "
             f"r {LORA['r']}, alpha {LORA['alpha']:g}, dropout {LORA['dropout']:g}, {LORA['target_modules']} (every "
             f"linear layer of the blocks, not the LM head): {spec['adapter_params']:,} trainable parameters "
             f"({100 * spec['adapter_params'] / spec['params']:.1f}%).",
             f"- DPO: {DPO['steps']} optimizer steps of {DPO['batch_size']} x {DPO['grad_accum']} TL;DR pairs "
             f"(micro-batch x gradient accumulation; sequences <= "
             f"{spec['max_length']} tokens, prompts <= {spec['max_prompt_length']}), sigmoid loss, reference "
             "log-probs computed each step (not precomputed).",
             f"- PPO: {PPO['iterations']} iterations x {PPO['rollouts']} rollouts of <= {PPO['max_new_tokens']} sampled "
             f"tokens (generation calls of {PPO['chunk_size']} rollouts), {PPO['ppo_epochs']} PPO epoch of optimizer steps of "
             f"{PPO['mini_batch']} x {PPO['grad_accum']} rollouts, value head on the policy (trains in full in both "
             "modes), reward "
             "`workload.length_reward` (no reward model).",
             "- Micro-batches of one, generation calls of four: a LoRA user's regime, where a micro-batch's activations "
             "(~100 MiB for a "
             "~290-token pair here) are about the weights' size, not several times it.",
             "- Both: fp32, fused AdamW, seed 0, ours.py's `stage_config`; each pair of runs once with the activations "
             "kept for the backward pass and once recomputed (`train.gradient_checkpointing`, as LoRA users of large "
             "models run). The reference: "
             "full = a frozen copy of the policy; LoRA = the policy with its adapters off. Expected from the weights "
             f"alone: full = weights + gradients + 2 Adam moments + reference = 5 x {w_mib:.0f} = {5 * w_mib:.0f} MiB; "
             f"LoRA = the weights once ({w_mib:.0f} MiB) + the adapters' share.",
             "- Peak RSS: ru_maxrss of the run's whole process (Python, torch and the libraries; the final checkpoint "
             "save included), with glibc's malloc mapping blocks of 128 KiB and more (mallopt M_MMAP_THRESHOLD) so "
             "that a freed tensor leaves the RSS at once, as a GPU allocator's peak counts live tensors. Baseline: the "
             "process's VmRSS after a warm-up, the same cell run on a ~0.3M-parameter Llama of the same vocabulary "
             "(every import and one-time set-up of the stage, in both modes), no model loaded; over baseline = peak "
             "- baseline, what the stage adds, the number the verdict below is on. s / step: the stage's "
             "`train_loop` seconds (rlhf_stage.json) per optimizer step (DPO) or per iteration (PPO: sampling, "
             "reference pass, updates).",
             "", "| method | activations | mode | peak RSS MiB | over baseline MiB | LoRA / full (peak; over baseline) | "
             "s / step | LoRA / full (time) | same work |", "|---|---|---|---:|---:|---|---:|---|---|"]
    verdicts = []
    share = lambda x: f"{100 * x:.0f}% ({'<= 50%' if x <= 0.5 else 'more than 50%'})"  # noqa: E731
    for regime in REGIMES:
        for method in ("dpo", "ppo"):
            full, adapted = f"{method}_full_{regime}", f"{method}_lora_{regime}"
            if full not in med or adapted not in med:
                continue
            f, lo = med[full], med[adapted]
            peak, over, t = (lo[k] / f[k] for k in ("peak_rss_mb", "over", "s_per_unit"))
            unit = "step" if method == "dpo" else "iteration"
            lines.append(f"| {method.upper()} | {regime} | full | {f['peak_rss_mb']:.0f} | {f['over']:.0f} | | "
                         f"{f['s_per_unit']:.2f} s / {unit} | | |")
            lines.append(f"| {method.upper()} | {regime} | LoRA r {LORA['r']} | {lo['peak_rss_mb']:.0f} | {lo['over']:.0f} | "
                         f"**{peak:.2f}; {over:.2f}** | {lo['s_per_unit']:.2f} s / {unit} | **{t:.2f}x** | "
                         f"{same_work(runs[full], runs[adapted])} |")
            verdicts.append(f"- {method.upper()}, activations {regime}: LoRA's peak over the baseline is {share(over)} "
                            f"of the full fine-tune's; the raw peak, the process's libraries included, {share(peak)}.")
    lines += ["", *verdicts, "", "```", f"python benchmarks/lora.py --repeats {args.repeats} --regimes {args.regimes}",
              "```", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=str(bench.ROOT / ".bench"))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--regimes", default=",".join(REGIMES), help="kept (activations kept), recomputed "
                    "(gradient checkpointing), or both")
    ap.add_argument("--method", choices=CELLS, help=argparse.SUPPRESS)  # a child run (bench.run_one's arguments)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        return child(args.spec, args.method, args.out)
    t_start, work = time.perf_counter(), Path(args.workdir)
    res_dir = work / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    log = res_dir / "lora.log"
    log.write_text("")
    spec = build(work)
    print(f"Llama {spec['params']:,} parameters, LoRA {spec['adapter_params']:,} trainable", flush=True)
    spec_path = work / "work" / "lora" / "spec.json"
    runs: dict = {c: [] for c in CELLS}
    cells = [(m, regime) for regime in args.regimes.split(",") for m in ("dpo", "ppo")]
    for r in range(args.repeats):
        for method, regime in cells:
            modes = ["full", "lora"] if r % 2 == 0 else ["lora", "full"]
            for mode in modes:
                cell = f"{method}_{mode}_{regime}"
                res = bench.run_one(sys.executable, "lora.py", spec_path, cell, res_dir / f"lora_{cell}_{r}.json", log)
                runs[cell].append(res)
                print(f"repeat {r + 1} {cell:20s}: peak {res['peak_rss_mb']:.0f} MiB, baseline {res['base_rss_mb']:.0f} "
                      f"MiB, {res['s_per_unit']:.2f} s per {'step' if method == 'dpo' else 'iteration'}", flush=True)
    section = render(spec, runs, args, (time.perf_counter() - t_start) / 60)
    bench.write_section(Path(args.results), section, BEGIN, END)
    (res_dir / "lora_summary.json").write_text(json.dumps(runs, indent=1))
    print(section)


if __name__ == "__main__":
    main()
