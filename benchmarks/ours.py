"""rlhf_cli's side of one benchmark run: the stage's own command (`rlhf sft|train-rm|dpo|ppo|grpo`) on a
workload from workload.py, in this process with one thread; the timing is the stage's own
`train_loop` record (rlhf_stage.json), the first-step loss its metrics.jsonl; the process's peak RSS
(ru_maxrss) goes with it.

    python benchmarks/ours.py --spec WORK/tiny/spec.json --method sft --out result.json

`--method ppo_eqbatch` is `rlhf ppo` at the GRPO cell's batch (the peak-memory comparison, not a speed
cell): the same policy, completions per iteration (all sampled in one generation call, as GRPO's are),
micro-batch x gradient accumulation, max_new_tokens, iterations, one pass, and the same reward function;
what differs is the method (PPO's value head and its frozen reference copy for the KL penalty; GRPO with
beta 0 has neither).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

STAGE = {"sft": "sft", "rm": "train-rm", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo", "ppo_eqbatch": "ppo"}
LENGTH_REWARD = "workload:length_reward"  # benchmarks/workload.py, importable: this script's folder is on sys.path


def stage_config(spec: dict, method: str, seed: int) -> dict:
    if method in ("grpo", "ppo_eqbatch"):
        return online_config(spec, method, seed)
    m = spec[method]
    # TRL's defaults where ours differ (AdamW betas, linear decay, no warmup); bf16 and gradient
    # checkpointing off on both sides; no eval or checkpoint inside the timed loop
    train = {"batch_size": m.get("batch_size", m.get("mini_batch")), "learning_rate": m["lr"], "scheduler": "linear",
             "warmup_steps": 0, "warmup_ratio": 0.0, "weight_decay": 0.0, "adam_betas": [0.9, 0.999],
             "max_grad_norm": 1.0, "mixed_precision": "no", "gradient_checkpointing": False,
             "group_by_length": False, "log_interval": 1}
    cfg = {"stage": method, "seed": seed,
           "model": {"name_or_path": spec["model_dir"]},
           "data": {"source": spec[f"data_{'prompts' if method == 'ppo' else method}"],
                    "max_length": spec["max_length"], "max_prompt_length": spec["max_prompt_length"]},
           "train": train, "eval": {"at_start": False, "interval": 0, "num_samples": 1, "batch_size": 1},
           "checkpoint": {"interval": 0}}
    if method in ("sft", "rm", "dpo"):
        train["max_steps"] = m["steps"]
    if method == "rm":
        cfg.update(init_from=spec["rm_dir"], freeze_fraction=0.0, loss={"use_margin": False, "center_coef": 0.0})
    if method == "dpo":
        cfg.update(policy=spec["model_dir"], precompute_ref_logps=False,
                   loss={"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "rpo_alpha": 0.0})
    if method == "ppo":
        cfg["data"]["max_examples"] = m["rollouts"] * m["iterations"]
        train["epochs"] = 1
        train["scheduler"] = "linear"
        gen = {"max_new_tokens": m["max_new_tokens"], "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
        cfg.update(policy=spec["model_dir"], reward={"ckpt": spec["rm_dir"], "delta": False},
                   ppo={"num_rollouts": m["rollouts"], "chunk_size": m["chunk_size"], "ppo_epochs": m["ppo_epochs"],
                        "init_kl_coef": m["kl_coef"], "target": None, "gamma": 1.0, "lam": 0.95, "cliprange": 0.2,
                        "cliprange_value": 0.2, "vf_coef": 0.1, "cliprange_reward": None, "scale_reward": "none",
                        "generation": gen})
        cfg["eval"]["generation"] = gen
    return cfg


def online_config(spec: dict, method: str, seed: int) -> dict:
    """`rlhf grpo` as trl_grpo.py runs TRL's GRPOTrainer (see its docstring for what is matched), or
    `rlhf ppo` at the same batch (method ppo_eqbatch)."""
    g = spec["grpo"]
    G, R, iters, B, ga = g["generations"], g["rollouts"], g["iterations"], g["batch_size"], g["grad_accum"]
    train = {"batch_size": B, "gradient_accumulation_steps": ga, "learning_rate": g["lr"], "scheduler": "linear",
             "warmup_steps": 0, "warmup_ratio": 0.0, "weight_decay": 0.0, "adam_betas": [0.9, 0.999],
             "max_grad_norm": 1.0, "mixed_precision": "no", "gradient_checkpointing": False,
             "group_by_length": False, "log_interval": 1, "max_steps": iters * R // (B * ga)}
    gen = {"max_new_tokens": g["max_new_tokens"], "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    per_prompt = G if method == "grpo" else 1
    cfg = {"stage": STAGE[method], "seed": seed, "model": {"name_or_path": spec["model_dir"]},
           "policy": spec["model_dir"],
           # exactly the prompts the run uses: one Batcher epoch of R / per_prompt prompts per iteration
           "data": {"source": spec["data_prompts"], "max_length": spec["max_length"],
                    "max_prompt_length": spec["max_prompt_length"], "max_examples": iters * R // per_prompt},
           "train": train, "reward": {"fn": LENGTH_REWARD, "delta": False},
           "eval": {"at_start": False, "interval": 0, "num_samples": 1, "batch_size": 1, "generation": gen},
           "checkpoint": {"interval": 0}}
    if method == "grpo":
        cfg["grpo"] = {"num_generations": G, "num_rollouts": R, "chunk_size": R // G, "num_iterations": 1,
                       "advantage": "grpo", "scale_rewards": "group", "loss_type": "dapo", "epsilon": 0.2,
                       "epsilon_high": None, "importance": "token", "beta": 0.0, "mask_truncated_completions": False,
                       "generation": gen}
    else:
        cfg["ppo"] = {"num_rollouts": R, "chunk_size": R, "ppo_epochs": 1, "init_kl_coef": spec["ppo"]["kl_coef"],
                      "target": None, "gamma": 1.0, "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2,
                      "vf_coef": 0.1, "cliprange_reward": None, "scale_reward": "none", "generation": gen}
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--method", required=True, choices=list(STAGE))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flops", action="store_true", help="count the loop's FLOPs (flops.py; an untimed run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = json.loads(Path(args.spec).read_text())

    import yaml

    from rlhf_cli import cli

    flops = [0]
    if args.flops:  # every optimizer step (the experience phase of PPO / GRPO included), not the final eval
        import flops as flop_counting

        from rlhf_cli.trainers import loop

        step = loop._Loop.step

        def counted(self):
            with flop_counting.counter() as c:
                out = step(self)
            flops[0] += c.get_total_flops()
            return out

        loop._Loop.step = counted
    base_rss = None
    if args.method in ("grpo", "ppo_eqbatch"):  # the memory comparison: the same modules loaded before both
        import rlhf_cli.trainers.grpo  # noqa: F401
        import rlhf_cli.trainers.ppo  # noqa: F401
        import workload

        base_rss = workload.rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out = Path(tmp) / "stage.yaml", Path(tmp) / "run"
        cfg_path.write_text(yaml.safe_dump(stage_config(spec, args.method, args.seed)))
        sys.argv = ["rlhf", STAGE[args.method], "--config", str(cfg_path), "--output-dir", str(out)]
        try:
            cli.main()
        except SystemExit as e:
            if e.code:
                raise
        manifest = json.loads((out / "rlhf_stage.json").read_text())
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    loop = manifest["train_loop"]
    unit = {"sft": "tokens", "rm": "pairs", "dpo": "pairs"}.get(args.method, "episodes")
    work = loop["tokens"] if unit == "tokens" else loop["pairs" if unit == "pairs" else "episodes"]
    result = {"side": "ours", "method": args.method, "optimizer_steps": loop["optimizer_steps"],
              "tokens": loop["tokens"], "work": work, "unit": f"{unit}/s", "loop_seconds": loop["seconds"],
              "throughput": work / loop["seconds"],
              "first_loss": first.get("train/loss", first.get("train/policy_loss")),
              "first_logps_chosen": first.get("train/logps/chosen"),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base_rss,
              "flops": flops[0] if args.flops else None}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
