"""rlhf_cli against TRL on identical work: SFT, reward model, DPO, PPO and GRPO at two sizes, A/B
alternating, one process per run, one CPU thread each; and the peak memory of `rlhf grpo` against
`rlhf ppo` at equal batch. Writes benchmarks/RESULTS.md.

    make bench                        # or: python benchmarks/bench.py [--sizes tiny] [--repeats 3]
    python benchmarks/bench.py --methods grpo,mem     # only the GRPO cells and the memory rows

Both sides load the same model, tokenizer and data from disk (workload.py), use the same batch
size, sequence lengths, steps and learning rate, and see the same batches in the same order; each
pair of runs is checked for the same optimizer steps and tokens and (SFT, RM, DPO) the same
first-step loss. PPO compares against TRL 1.12's experimental PPOTrainer (TRL >= 1.14 ships no
PPO) in a second virtual environment, .bench/trl112, that holds only that TRL and reads everything
else (torch, transformers, ...) from this one, so the two sides differ in the trainer alone.

GRPO (`grpo`) compares `rlhf grpo` with TRL 1.16's GRPOTrainer (trl_grpo.py: what is matched, and how);
`mem` runs `rlhf grpo` and `rlhf ppo` at the same batch and compares their processes' peak RSS. Their
rows are a section of RESULTS.md of their own: a run of only grpo/mem rewrites that section and keeps
the rest of the file, a run of only sft/rm/dpo/ppo keeps that section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402

UNITS = {"sft": "tokens/s", "rm": "pairs/s", "dpo": "pairs/s", "ppo": "episodes/s", "grpo": "episodes/s"}
TARGETS = {"tiny": {"sft": 1.3, "rm": 1.3, "dpo": 1.5, "ppo": 3.0, "grpo": 2.0},
           "medium": {"sft": 1.3, "ppo": 2.5, "grpo": 2.0}}
NAMES = {"sft": "SFT", "rm": "Reward model", "dpo": "DPO", "ppo": "PPO", "grpo": "GRPO"}
MAIN = ("sft", "rm", "dpo", "ppo")  # the main table; grpo and mem have a section of their own
TRL_SCRIPT = {"ppo": "trl_ppo.py", "grpo": "trl_grpo.py"}  # one method each (no --method); else trl_side.py
GRPO_BEGIN, GRPO_END = "<!-- GRPO section: bench.py --methods grpo,mem -->", "<!-- end of GRPO section -->"
SERVER_MARKERS = ("<!-- reward-server:begin -->", "<!-- reward-server:end -->")  # reward_server.py writes it
LORA_MARKERS = ("<!-- lora:begin -->", "<!-- lora:end -->")  # lora.py writes it
# gpu.py writes the table between its markers; the heading and the discussion above it are hand-written
GPU_MARKERS = ("## GPU checks", "<!-- gpu:end -->")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
       "PYTHONWARNINGS": "ignore"}


def trl112_python(where: Path) -> str:
    """A virtual environment with trl==1.12.0 on top of this interpreter's packages (made once)."""
    py = where / "bin" / "python"
    if not (where / ".ready").exists():
        venv.create(where, with_pip=True, clear=True)
        site = subprocess.check_output([str(py), "-c", "import site; print(site.getsitepackages()[0])"], text=True)
        import site as this_site

        Path(site.strip(), "_rlhf_bench_base.pth").write_text(this_site.getsitepackages()[0] + "\n")
        subprocess.check_call([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "trl==1.12.0"], env=ENV)
        (where / ".ready").touch()
    return str(py)


def run_one(python: str, script: str, spec: Path, method: str, out: Path, log: Path, flops: bool = False) -> dict:
    cmd = [python, str(HERE / script), "--spec", str(spec), "--out", str(out)] + (["--flops"] if flops else [])
    if script not in TRL_SCRIPT.values():
        cmd += ["--method", method]
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(cmd, env=ENV, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        raise SystemExit(f"benchmark run failed (exit {rc}): {' '.join(cmd)}; see {log}")
    return json.loads(out.read_text())


def same_work(method: str, a: dict, b: dict) -> list[str]:
    """What differs between the two sides' work (empty: the same)."""
    problems = []
    if a["optimizer_steps"] != b["optimizer_steps"]:
        problems.append(f"optimizer steps {a['optimizer_steps']} vs {b['optimizer_steps']}")
    if method in ("ppo", "grpo"):
        if a["work"] != b["work"]:
            problems.append(f"episodes {a['work']} vs {b['work']}")
        # sampled lengths differ run to run; the responses must be of similar total length
        if abs(a["tokens"] - b["tokens"]) > 0.1 * max(a["tokens"], b["tokens"]):
            problems.append(f"response tokens {a['tokens']} vs {b['tokens']}")
        return problems
    if a["tokens"] != b["tokens"]:
        problems.append(f"tokens {a['tokens']} vs {b['tokens']}")
    if abs(a["first_loss"] - b["first_loss"]) > 1e-3 * max(1.0, abs(b["first_loss"])):
        problems.append(f"first-step loss {a['first_loss']:.6f} vs {b['first_loss']:.6f}")
    if method == "dpo" and abs(a["first_logps_chosen"] - b["first_logps_chosen"]) > 1e-3 * abs(b["first_logps_chosen"]):
        problems.append(f"first-step chosen log-prob {a['first_logps_chosen']:.4f} vs {b['first_logps_chosen']:.4f}")
    return problems


def matmul_peak() -> float:
    """Best fp32 GFLOP/s of a square matmul on one thread (the MFU denominator), in this process."""
    import torch

    torch.set_num_threads(1)
    best = 0.0
    for n in (256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        reps = max(3, int(2e9 / (2 * n**3)))
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def model_flops_per_token(spec: dict) -> float:
    """Training FLOPs per token: 6 x (block + LM-head parameters) + attention (PaLM's 12·L·T·d)."""
    d, L, T = spec["model"]["n_embd"], spec["model"]["n_layer"], spec["max_length"]
    block = 12 * d * d + 13 * d  # qkv, proj, 4d MLP, norms
    return 6 * (L * block + d * spec["vocab_size"]) + 12 * L * T * d / 2  # causal: half of T


def summarize(results: dict, counted: dict | None = None) -> list[dict]:
    """A row per cell; with `counted` ((size, method) -> {"ours": run, "trl": run} of the --flops runs), the
    FLOPs each side executes per unit of work: ratio = work (TRL FLOPs / ours, per unit) x speed per FLOP
    (ours FLOP/s / TRL's), exactly, as throughput = FLOP/s / (FLOPs per unit)."""
    rows = []
    for (size, method), pairs in results.items():
        ours = [p["ours"]["throughput"] for p in pairs]
        trl = [p["trl"]["throughput"] for p in pairs]
        ratios = [o / t for o, t in zip(ours, trl)]
        problems = sorted({x for p in pairs for x in same_work(method, p["ours"], p["trl"])})
        row = {"size": size, "method": method, "ours": statistics.median(ours), "trl": statistics.median(trl),
               "ratio": statistics.median(ours) / statistics.median(trl), "min": min(ratios), "max": max(ratios),
               "repeats": len(pairs), "problems": problems, "first": pairs[0]}
        c = (counted or {}).get((size, method))
        if c:
            per_unit = {side: c[side]["flops"] / c[side]["work"] for side in ("ours", "trl")}
            row.update(flops_per_unit=per_unit, work_ratio=per_unit["trl"] / per_unit["ours"],
                       gflops={"ours": row["ours"] * per_unit["ours"] / 1e9, "trl": row["trl"] * per_unit["trl"] / 1e9})
            row["rate_ratio"] = row["gflops"]["ours"] / row["gflops"]["trl"]
        rows.append(row)
    return rows


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores"


def render_results(rows: list[dict], specs: dict, peak: float, mfu: dict, versions: dict, args,
                   minutes: float, kept: list[dict] = ()) -> str:
    """RESULTS.md's main part (SFT, RM, DPO, PPO); `kept`: rows of cells not run this time (an earlier run's)."""
    kept_cells = ", ".join(f"{r['size']} {NAMES[r['method']]}" for r in kept)
    lines = [
        "# rlhf-cli against TRL: training-loop throughput on identical work",
        "",
        "Regenerated by `make bench` (`python benchmarks/bench.py`); do not edit by hand.",
        "",
        f"- Machine: {machine()}, one thread per run (`torch.set_num_threads(1)`), no GPU.",
        f"- Software: Python {platform.python_version()}, torch {versions['torch']}, transformers "
        f"{versions['transformers']}, rlhf_cli {versions['rlhf_cli']}; TRL {versions['trl']} (SFT, RM, DPO), "
        f"TRL 1.12.0 `trl.experimental.ppo.PPOTrainer` (PPO, in .bench/trl112).",
        f"- {args.repeats} repeats per cell, A/B alternating (ours first in odd repeats, TRL first in even ones), "
        f"each run its own process; the throughput is the training loop's (model loading, tokenization "
        f"and evaluation excluded on both sides). Whole benchmark: {minutes:.1f} min.",
        "- Ratio = median ours / median TRL; the range is the min–max of the per-repeat A/B ratios.",
        *([f"- Kept from the previous run (not run this time, `.bench/results/summary.json`): {kept_cells}; this "
           "run's time covers the others."] if kept else []),
        "",
        "- FLOPs: one more run per side and cell, untimed, counts what its loop executes (torch's "
        "FlopCounterMode, benchmarks/flops.py: matmuls and attention, forward and backward). ratio = less work "
        "(TRL's FLOPs per unit / ours) x faster work (our FLOP/s / TRL's: the throughputs above times the FLOPs "
        "per unit).",
        "",
        "| size | stage | unit | rlhf_cli | TRL | ratio (min–max) | target | same work | GFLOP / unit: ours, TRL "
        "| less work | faster work | GFLOP/s: ours, TRL |",
        "|---|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    lines += cell_rows(rows, flops=True)
    lines += missed_targets(rows, peak)
    lines += ["", "## Where the differences come from (profiles of both sides)", "",
              "- SFT: TRL 1.16 computes the loss with its chunked log-prob kernel (it saves logits memory and "
              "recomputes each tile in the backward pass) and also the per-token entropy; rlhf_cli runs the LM "
              "head only from the first position that predicts a label on (the completion: about a fifth of a "
              "TL;DR sequence) and materialises those logits once.",
              "- Reward model and DPO: rlhf_cli runs each pair's prompt once and both replies on its cached "
              "keys/values (`share_prompt`): P + 2C token-passes instead of TRL's 2(P + C); DPO computes LM-head "
              "logits for reply tokens only, for the policy and the reference.",
              "- PPO: TRL trains a separate value model (two trunks forward and backward per update) and "
              "computes full-vocabulary logits over prompt and response; rlhf_cli's value head shares the "
              "policy trunk, its logits cover response positions only, and the old log-probs and values come "
              "from the sampling pass (no second policy pass). That is the whole margin: per iteration both "
              "sides run the same trunk work otherwise (sampling, the reference's and the reward model's forward "
              "passes, the policy's forward and backward), so the ratio sits near 2-3x and falls as longer runs "
              "amortise TRL's first-iteration cost.",
              "- All stages: the last block runs its MLP, output and query projections and attention rows only at "
              "the positions whose output is read (`models.tail_only`: the response positions of PPO's, GRPO's and "
              "the reference's passes, a sampling prefill's last position, a reward model's last tokens, a shared "
              "prompt's last position; not SFT's training step), computing only keys and values elsewhere; TRL runs "
              "the whole block at every position.",
              "- Sampling: each decode step writes its keys and values into a buffer reserved at the prefill "
              "(`models.new_cache(reserve=)`); transformers' DynamicCache (TRL's generate) concatenates, copying "
              "the whole cache per layer and token.",
              "- All stages: fused AdamW (one kernel for every parameter).",
              "- All stages: GPT-2's `gelu_new` runs as PyTorch's fused tanh GELU (`model.fuse_gelu`).",
              "", "## Workloads", ""]
    for size, s in specs.items():
        m = s["model"]
        lines.append(f"- **{size}**: GPT-2, {m['n_layer']} layers, {m['n_embd']} wide, {m['n_head']} heads, "
                     f"vocabulary {s['vocab_size']} (byte-level BPE trained on the TL;DR sample), "
                     f"{s['params'] / 1e6:.2f}M parameters; real TL;DR posts and summaries (../shared/data) cut to "
                     f"prompt <= {s['max_prompt_length']}, completion <= {s['max_completion_length']}, "
                     f"sequence <= {s['max_length']} tokens.")
        for method in ("sft", "rm", "dpo"):
            w = s[method]
            lines.append(f"  - {NAMES[method]}: {w['steps']} steps x {w['batch_size']} "
                         f"{'examples' if method == 'sft' else 'pairs'}, lr {w['lr']}, fp32, no gradient checkpointing.")
        p = s["ppo"]
        lines.append(f"  - PPO: {p['iterations']} iteration(s) x {p['rollouts']} rollouts of <= {p['max_new_tokens']} "
                     f"sampled tokens (temperature 1, generation batch {p['chunk_size']}), {p['ppo_epochs']} PPO "
                     f"epochs of mini-batches of {p['mini_batch']}, fixed KL coefficient {p['kl_coef']}, reward "
                     "model = a GPT-2 sequence classifier; TRL's value model is initialised from it (its own "
                     "example's recipe), ours is a value head on the policy.")
    lines += ["", "## Model-FLOPs utilisation of rlhf_cli's SFT step", "",
              f"Matmul peak measured in the same run: {peak:.1f} GFLOP/s (fp32, one thread, best of 256/512/1024 "
              "square matmuls). Model FLOPs per token = 6 x (block + LM-head parameters) + causal attention at the maximum length (an upper "
              "bound). These are model FLOPs, as MFU counts them: the LM head runs on completion positions only, so "
              "fewer FLOPs are executed than counted.", ""]
    for size, v in mfu.items():
        lines.append(f"- {size}: {v['tokens_per_s']:.0f} tokens/s x {v['flops_per_token'] / 1e6:.2f} MFLOP/token = "
                     f"{v['gflops']:.2f} GFLOP/s = **{100 * v['mfu']:.0f}% MFU**")
    lines += ["", "## Commands", "", "```",
              "make bench                                  # everything below, then this file",
              "python benchmarks/workload.py .bench/work   # the workloads (model, tokenizer, data) only",
              "python benchmarks/ours.py --spec .bench/work/tiny/spec.json --method dpo --out ours.json",
              "python benchmarks/trl_side.py --spec .bench/work/tiny/spec.json --method dpo --out trl.json",
              ".bench/trl112/bin/python benchmarks/trl_ppo.py --spec .bench/work/tiny/spec.json --out trl_ppo.json",
              "```", "", "Per-run JSON and logs: `.bench/results/`."]
    return "\n".join(lines) + "\n"


def cell_rows(rows: list[dict], flops: bool = False) -> list[str]:
    """A table row per cell: throughputs, the ratio and its range, the target, the same-work check; with
    `flops`, the FLOPs per unit of each side and the ratio's two factors (summarize)."""
    out = []
    for r in rows:
        target = TARGETS.get(r["size"], {}).get(r["method"])
        ok = "yes" if not r["problems"] else "NO: " + "; ".join(r["problems"])
        out.append(f"| {r['size']} | {NAMES[r['method']]} | {UNITS[r['method']]} | {r['ours']:.1f} | {r['trl']:.1f} | "
                   f"**{r['ratio']:.2f}x** ({r['min']:.2f}–{r['max']:.2f}) | "
                   f"{f'{target:.1f}x' if target else '–'}{' met' if target and r['ratio'] >= target else (' MISSED' if target else '')} | {ok} |"
                   + (flop_cells(r) if flops else ""))
    return out


def missed_targets(rows: list[dict], peak: float) -> list[str]:
    """A sentence per missed target: the speed per FLOP over TRL's that reaching it would take, on this work."""
    out = []
    for r in rows:
        target = TARGETS.get(r["size"], {}).get(r["method"])
        if not target or r["ratio"] >= target or "work_ratio" not in r:
            continue
        need = target / r["work_ratio"]
        out.append(f"- {r['size']} {NAMES[r['method']]}: TRL executes {r['work_ratio']:.2f}x our FLOPs per "
                   f"{UNITS[r['method']].split('/')[0][:-1]}, so {target:.1f}x needs our loop to run {need:.2f}x TRL's "
                   f"FLOP/s: {need * r['gflops']['trl']:.0f} GFLOP/s over the whole loop (sampling and small matmuls "
                   f"included), against {r['gflops']['ours']:.0f} now and a single-thread matmul peak of {peak:.0f} "
                   "(the best square matmul, measured above).")
    return ["", "Missed targets, in FLOPs:", "", *out] if out else []


def flop_cells(r: dict) -> str:
    """The FLOP columns of a cell's row (– where the cell has no counted runs)."""
    if "work_ratio" not in r:
        return " – | – | – | – |"
    f, g = r["flops_per_unit"], r["gflops"]
    return (f" {f['ours'] / 1e9:.3g}, {f['trl'] / 1e9:.3g} | {r['work_ratio']:.2f}x | {r['rate_ratio']:.2f}x | "
            f"{g['ours']:.0f}, {g['trl']:.0f} |")


def summarize_memory(mem: dict, grpo_pairs: dict) -> list[dict]:
    """Peak RSS (median over repeats) of `rlhf grpo` and `rlhf ppo` at the same batch, per size; TRL's
    GRPOTrainer's from the grpo cell's runs when that cell ran."""
    rows = []
    for size, pairs in mem.items():
        grpo = statistics.median(p["grpo"]["peak_rss_mb"] for p in pairs)
        ppo = statistics.median(p["ppo_eqbatch"]["peak_rss_mb"] for p in pairs)
        over = {k: statistics.median(p[k]["peak_rss_mb"] - p[k]["base_rss_mb"] for p in pairs)
                if all(p[k].get("base_rss_mb") is not None for p in pairs) else None for k in ("grpo", "ppo_eqbatch")}
        trl = ([p["trl"]["peak_rss_mb"] for p in grpo_pairs[size]] if size in grpo_pairs else [])
        problems = sorted({x for p in pairs for x in
                           ([f"optimizer steps {p['grpo']['optimizer_steps']} vs {p['ppo_eqbatch']['optimizer_steps']}"]
                            if p["grpo"]["optimizer_steps"] != p["ppo_eqbatch"]["optimizer_steps"] else [])
                           + ([f"episodes {p['grpo']['work']} vs {p['ppo_eqbatch']['work']}"]
                              if p["grpo"]["work"] != p["ppo_eqbatch"]["work"] else [])})
        rows.append({"size": size, "grpo_mb": grpo, "ppo_mb": ppo, "grpo_over_mb": over["grpo"],
                     "ppo_over_mb": over["ppo_eqbatch"], "trl_grpo_mb": statistics.median(trl) if trl else None,
                     "repeats": len(pairs), "problems": problems})
    return rows


def render_grpo(rows: list[dict], mem_rows: list[dict], specs: dict, versions: dict, args, minutes: float) -> str:
    """RESULTS.md's GRPO section (between GRPO_BEGIN and GRPO_END)."""
    lines = [GRPO_BEGIN, "## GRPO: rlhf_cli against TRL's GRPOTrainer, and peak memory against `rlhf ppo`", "",
             f"Regenerated by `python benchmarks/bench.py --methods grpo,mem` (and `make bench`); do not edit by hand. "
             f"Machine: {machine()}, one thread per run. Software: torch {versions['torch']}, transformers "
             f"{versions['transformers']}, rlhf_cli {versions['rlhf_cli']}, TRL {versions['trl']} `GRPOTrainer`. "
             f"{args.repeats} repeat(s) per cell, A/B alternating, each run its own process; the whole bench.py "
             f"run: {minutes:.1f} min.", ""]
    if rows:
        lines += ["| size | stage | unit | rlhf_cli | TRL | ratio (min–max) | target | same work | GFLOP / unit: ours, "
                  "TRL | less work | faster work | GFLOP/s: ours, TRL |",
                  "|---|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|", *cell_rows(rows, flops=True), ""]
    lines += ["Both sides (trl_grpo.py and ours.py's grpo config): the workload's policy and tokenizer, the same "
              "prompts in the same order (rlhf_cli's batcher replayed as TRL's sampler), G completions of each "
              "prompt, one generation call per iteration, one optimizer step per generation batch (micro-batch x "
              "gradient accumulation: TRL's default layout, so TRL makes no extra old-log-prob pass), temperature 1 / "
              "top-k 0 / top-p 1 up to max_new_tokens, loss `dapo`, beta 0 (no reference model), one pass "
              "(num_iterations 1), clip 0.2, group-scaled advantages, the same reward function (`workload."
              "length_reward`: characters / 100), AdamW with linear decay, fp32, no gradient checkpointing, "
              "no vLLM. Checked per pair: equal optimizer steps and completions, completion tokens within 10% "
              "(sampling differs; the untrained policy rarely stops early).", ""]
    for size, s in specs.items():
        g = s["grpo"]
        lines.append(f"- **{size}**: {g['iterations']} iterations x {g['rollouts']} completions ({g['rollouts'] // g['generations']} "
                     f"prompts x G = {g['generations']}) of <= {g['max_new_tokens']} tokens; optimizer steps of "
                     f"{g['batch_size']} x {g['grad_accum']} completions; lr {g['lr']}.")
    if mem_rows:
        lines += ["", "### Peak memory: `rlhf grpo` against `rlhf ppo` at equal batch", "",
                  "Peak resident memory (ru_maxrss) of each run's whole process (Python, torch and the libraries "
                  "included: most of it at these model sizes), median over the repeats; \"over baseline\": the peak "
                  "less the process's resident memory just before the stage starts (rlhf_cli's grpo and ppo modules "
                  "imported in both runs), i.e. what the stage itself adds. `rlhf ppo` runs at the GRPO "
                  "cell's batch: the same policy, completions per iteration (all in one generation call), micro-batch "
                  "x gradient accumulation, max_new_tokens, iterations and reward function, one PPO epoch; it "
                  "adds PPO's value head and the frozen reference copy of its KL penalty, which GRPO with beta 0 "
                  "does without.", "",
                  "| size | `rlhf grpo` peak | `rlhf ppo` peak (same batch) | grpo / ppo | grpo over baseline | "
                  "ppo over baseline | TRL GRPOTrainer peak | same work |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for m in mem_rows:
            ok = "yes" if not m["problems"] else "NO: " + "; ".join(m["problems"])
            trl = f"{m['trl_grpo_mb']:.0f} MiB" if m["trl_grpo_mb"] is not None else "–"
            over = [f"{m[k]:.0f} MiB" if m[k] is not None else "–" for k in ("grpo_over_mb", "ppo_over_mb")]
            lines.append(f"| {m['size']} | {m['grpo_mb']:.0f} MiB | {m['ppo_mb']:.0f} MiB | "
                         f"**{m['grpo_mb'] / m['ppo_mb']:.2f}** | {over[0]} | {over[1]} | {trl} | {ok} |")
    lines += ["", "```",
              "python benchmarks/bench.py --methods grpo,mem [--sizes tiny] [--repeats 3]",
              "python benchmarks/ours.py --spec .bench/work/tiny/spec.json --method grpo --out ours.json",
              "python benchmarks/trl_grpo.py --spec .bench/work/tiny/spec.json --out trl.json",
              "python benchmarks/ours.py --spec .bench/work/tiny/spec.json --method ppo_eqbatch --out ppo.json",
              "```", GRPO_END]
    return "\n".join(lines) + "\n"


def _cut(text: str, begin: str, end: str) -> tuple[str, str]:
    """(the section between the markers, with them; the text without it)."""
    if begin not in text or end not in text:
        return "", text
    a, b = text.index(begin), text.index(end) + len(end)
    return text[a:b] + "\n", text[:a].rstrip("\n") + "\n\n" + text[b:].lstrip("\n")


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """A section of RESULTS.md that another script regenerates (reward_server.py, lora.py): replace the one
    between its markers, else put it before the main part's discussion, else append it."""
    old = path.read_text() if path.exists() else ""
    anchor = "## Where the differences come from"
    if begin in old and end in old:
        text = old[:old.index(begin)] + section.rstrip("\n") + old[old.index(end) + len(end):]
    elif anchor in old:
        text = old[:old.index(anchor)] + section + "\n" + old[old.index(anchor):]
    else:
        text = (old.rstrip("\n") + "\n\n" if old.strip() else "") + section
    path.write_text(text)


def write_merged(path: Path, main_text: str | None, grpo_text: str | None) -> None:
    """Write RESULTS.md from its main part and its GRPO section; a part that is None (not run this time) is
    kept from the file as it is, and so are reward_server.py's, lora.py's and gpu.py's sections."""
    old = path.read_text() if path.exists() else ""
    old_grpo, old = _cut(old, GRPO_BEGIN, GRPO_END)
    served, old = _cut(old, *SERVER_MARKERS)
    lora, old = _cut(old, *LORA_MARKERS)
    gpu, old = _cut(old, *GPU_MARKERS)
    main = main_text if main_text is not None else old
    grpo = (grpo_text if grpo_text is not None else old_grpo) + "".join("\n" + s for s in (served, lora) if s)
    anchor = "## Where the differences come from"
    if not grpo:
        text = main
    elif anchor in main:  # after the main table
        at = main.index(anchor)
        text = main[:at] + grpo + "\n" + main[at:]
    else:
        text = main.rstrip("\n") + "\n\n" + grpo if main.strip() else grpo
    path.write_text(text.rstrip("\n") + "\n\n" + gpu if gpu else text)  # the GPU section stays last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--methods", default="sft,rm,dpo,ppo,grpo,mem",
                    help="comma-separated: sft, rm, dpo, ppo, grpo (speed cells), mem (GRPO vs PPO peak memory)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / ".bench"))
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    unknown = sorted(set(args.methods.split(",")) - set(NAMES) - {"mem"})
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join([*NAMES, 'mem'])}")
    t_start = time.perf_counter()
    work = Path(args.workdir)
    res_dir = work / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    log = res_dir / "runs.log"
    log.write_text("")
    sizes, methods = args.sizes.split(","), args.methods.split(",")

    import torch
    import transformers
    import trl

    import rlhf_cli

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                "rlhf_cli": rlhf_cli.__version__}
    ppo_python = trl112_python(work / "trl112") if "ppo" in methods else None
    specs = {s: workload.build(work / "work", s) for s in sizes}
    peak = matmul_peak()
    print(f"matmul peak {peak:.1f} GFLOP/s (one thread)", flush=True)

    results: dict = {}
    counted: dict = {}
    for size in sizes:
        spec_path = work / "work" / size / "spec.json"
        for method in (m for m in methods if m != "mem"):
            trl_run = ((ppo_python if method == "ppo" else sys.executable), TRL_SCRIPT.get(method, "trl_side.py"))
            pairs = []
            for r in range(args.repeats):
                sides = [("ours", (sys.executable, "ours.py")), ("trl", trl_run)]
                pair = {}
                for side, (py, script) in (sides if r % 2 == 0 else sides[::-1]):
                    pair[side] = run_one(py, script, spec_path, method, res_dir / f"{size}_{method}_{side}_{r}.json", log)
                pairs.append(pair)
                print(f"{size:6s} {method:3s} repeat {r + 1}: ours {pair['ours']['throughput']:9.1f} "
                      f"trl {pair['trl']['throughput']:9.1f} {UNITS[method]}  "
                      f"ratio {pair['ours']['throughput'] / pair['trl']['throughput']:.2f}", flush=True)
            results[(size, method)] = pairs
            # one more run per side, untimed, that counts the FLOPs its loop executes (flops.py)
            c = counted[(size, method)] = {side: run_one(py, script, spec_path, method,
                                                         res_dir / f"{size}_{method}_{side}_flops.json", log, flops=True)
                                           for side, (py, script) in (("ours", (sys.executable, "ours.py")),
                                                                      ("trl", trl_run))}
            print(f"{size:6s} {method:3s} FLOPs per unit: ours {c['ours']['flops'] / c['ours']['work']:.3g} "
                  f"trl {c['trl']['flops'] / c['trl']['work']:.3g}", flush=True)
    mem: dict = {}  # size -> pairs of ours' runs {"grpo": ..., "ppo_eqbatch": ...}
    for size in sizes if "mem" in methods else []:
        spec_path = work / "work" / size / "spec.json"
        mem[size] = []
        for r in range(args.repeats):
            kinds = ["grpo", "ppo_eqbatch"]
            pair = {k: run_one(sys.executable, "ours.py", spec_path, k, res_dir / f"{size}_mem_{k}_{r}.json", log)
                    for k in (kinds if r % 2 == 0 else kinds[::-1])}
            mem[size].append(pair)
            print(f"{size:6s} mem repeat {r + 1}: peak RSS rlhf grpo {pair['grpo']['peak_rss_mb']:.0f} MiB, "
                  f"rlhf ppo (same batch) {pair['ppo_eqbatch']['peak_rss_mb']:.0f} MiB", flush=True)
    rows = summarize(results, counted)
    # main-table cells not run this time keep their last measured row (a run of `--methods sft` redoes SFT only)
    summary = res_dir / "summary.json"
    previous = json.loads(summary.read_text()) if summary.exists() else {}
    ran = {(r["size"], r["method"]) for r in rows}
    kept = [r for r in previous.get("rows", []) if r["method"] in MAIN and (r["size"], r["method"]) not in ran]
    if any(m in MAIN for m in methods):
        rows += kept
    rows.sort(key=lambda r: (r["size"] != "tiny", r["size"], (*MAIN, "grpo").index(r["method"])))
    mem_rows = summarize_memory(mem, {size: p for (size, m), p in results.items() if m == "grpo"})
    mfu = dict(previous.get("mfu", {}))
    for r in rows:
        if r["method"] == "sft":
            fpt = model_flops_per_token(specs[r["size"]])
            mfu[r["size"]] = {"tokens_per_s": r["ours"], "flops_per_token": fpt, "gflops": r["ours"] * fpt / 1e9,
                              "mfu": r["ours"] * fpt / 1e9 / peak}
    minutes = (time.perf_counter() - t_start) / 60
    main_rows = [r for r in rows if r["method"] in MAIN]
    grpo_rows = [r for r in rows if r["method"] == "grpo"]
    write_merged(Path(args.out),
                 render_results(main_rows, specs, peak, mfu, versions, args, minutes, kept)
                 if any(m in MAIN for m in methods) else None,
                 render_grpo(grpo_rows, mem_rows, specs, versions, args, minutes)
                 if "grpo" in methods or "mem" in methods else None)
    (res_dir / "summary.json").write_text(json.dumps({"rows": rows, "mem": mem_rows, "mfu": mfu, "peak_gflops": peak},
                                                     indent=1, default=str))
    print(Path(args.out).read_text())
    bad = [r for r in rows + mem_rows if r["problems"]]
    if bad:
        raise SystemExit(f"the two sides did different work in {len(bad)} cell(s); see {args.out}")


if __name__ == "__main__":
    main()
