"""TRL's side of the GRPO benchmark: TRL 1.16's `GRPOTrainer` (the `bench` extra, in .venv) on a workload
built by workload.py, doing the work ours.py's `rlhf grpo` run does; writes its loop time and throughput as
JSON (the shape of the other scripts' results).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/trl_grpo.py --spec WORK/tiny/spec.json --out /tmp/r.json [--seed 0]

Matched with ours.py's grpo config (spec["grpo"]), and how:
- model, tokenizer, prompts: the workload's GPT-2 policy and tokenizer from disk; the first
  iterations x rollouts / G prompts of data_prompts/train.jsonl (ours: data.max_examples), drawn in
  rlhf_cli's order: the sampler below replays `rlhf_cli.trainers.common.Batcher` (one batch of
  rollouts / G prompts per iteration, ours' grpo.chunk_size), each prompt G times side by side, as TRL's
  RepeatSampler lays a generation batch out. Prompts fit max_prompt_length, so neither side cuts any;
  both tokenize them without special tokens (this tokenizer adds none).
- batching: one generation batch = `rollouts` completions (TRL: generation_batch_size; ours:
  grpo.num_rollouts, sampled in one call: chunk_size x G); optimizer steps of batch_size x grad_accum
  completions (TRL: per_device_train_batch_size x gradient_accumulation_steps; ours: train.batch_size x
  train.gradient_accumulation_steps), so one optimizer step per generation batch (TRL's default layout,
  steps_per_generation = gradient_accumulation_steps, in which TRL needs no extra old-log-prob pass) and
  `iterations` optimizer steps in all (max_steps on both sides).
- sampling: max_new_tokens = max_completion_length, temperature 1, top_k 0, top_p 1, stop at EOS; no vLLM.
  The policy is untrained, so EOS is rare and nearly every completion runs to the limit on both sides;
  bench.py checks that the completion tokens agree within 10%.
- loss: loss_type "dapo", beta 0 (no reference model on either side), num_iterations 1, epsilon 0.2 on
  both sides of the clip, group-scaled advantages (TRL scale_rewards "group", ours advantage grpo /
  scale_rewards group), no truncated-completion masking; reward = workload.length_reward on the decoded
  completion text, the same Python function on both sides.
- optimizer: AdamW lr spec lr, betas (0.9, 0.999), no weight decay, linear decay, no warmup, grad-norm clip
  1.0; fp32 (bf16 off: TRL defaults it on), no gradient checkpointing (TRL defaults it on), dropout off.
- timing: train() from on_train_begin to on_train_end (model loading and dataset building excluded, as
  ours' train_loop record excludes them); optimizer steps counted in on_optimizer_step, completions and
  completion tokens as each generation batch is made.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)  # first thing: the benchmark compares single-threaded CPU runs

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402
import workload  # noqa: E402
from rlhf_cli.trainers.common import Batcher  # noqa: E402


class Meter(TrainerCallback):
    """Times train() from its first callback to its last, counts optimizer steps, keeps every logged dict."""

    def __init__(self):
        self.t0 = self.t1 = None
        self.steps = 0
        self.logs = []

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        self.t1 = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kw):
        self.steps += 1

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append({"step": state.global_step, **(logs or {})})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flops", action="store_true", help="count the loop's FLOPs (flops.py; an untimed run)")
    a = ap.parse_args()
    base_rss = workload.rss_mb()  # after the imports, before the model and data
    spec = json.loads(Path(a.spec).read_text())
    g = spec["grpo"]
    G, R, iters, B, ga = g["generations"], g["rollouts"], g["iterations"], g["batch_size"], g["grad_accum"]
    assert R % G == 0 and R == B * ga, "rollouts must be whole groups and exactly one optimizer step (batch x accum)"
    per_iter = R // G  # prompts per generation batch (ours: grpo.chunk_size)

    with open(Path(spec["data_prompts"]) / "train.jsonl") as fh:
        prompts = [json.loads(line)["prompt"] for line, _ in zip(fh, range(per_iter * iters))]
    assert len(prompts) == per_iter * iters
    # ours' prompt order: Batcher position i is iteration i's prompts; TRL's dataloader yields one generation batch
    # (R indices) per micro step and generates on the first micro step of every steps_per_generation x
    # num_iterations, so each iteration's batch is repeated that often (what RepeatSampler's repeat_count does)
    batcher = Batcher(len(prompts), per_iter, a.seed)
    blocks = [[i for i in batcher.indices(it) for _ in range(G)] for it in range(iters)]
    order = [i for block in blocks for _ in range(ga) for i in block]

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    seen = {"episodes": 0, "tokens": 0, "batches": 0}

    class Ordered(trl.GRPOTrainer):
        def _get_train_sampler(self, *args, **kw):
            return order  # a list of indices is a sampler: ours' prompts, in ours' order

        def _generate_and_score_completions(self, inputs):
            expected = [prompts[i] for i in blocks[seen["batches"]]]
            assert [x["prompt"] for x in inputs] == expected, "TRL's generation batch is not ours' prompts"
            out = super()._generate_and_score_completions(inputs)
            seen["batches"] += 1
            seen["episodes"] += len(inputs)
            seen["tokens"] += int(out["completion_mask"].sum())
            return out

    meter = Meter()
    with tempfile.TemporaryDirectory(prefix="trl_grpo_") as tmp:
        cfg = trl.GRPOConfig(
            output_dir=tmp, seed=a.seed, use_cpu=True,
            per_device_train_batch_size=B, gradient_accumulation_steps=ga, generation_batch_size=R,
            num_generations=G, max_steps=iters, num_iterations=1,
            max_completion_length=g["max_new_tokens"], temperature=1.0, top_k=0, top_p=1.0, use_vllm=False,
            beta=0.0, loss_type="dapo", epsilon=0.2, scale_rewards="group", mask_truncated_completions=False,
            learning_rate=g["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
            # TRL defaults bf16 and gradient checkpointing on; our side uses neither
            bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True,
            logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", log_completions=False,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        assert cfg.steps_per_generation == ga and cfg.generation_batch_size == R, (cfg.steps_per_generation,
                                                                                   cfg.generation_batch_size)
        trainer = Ordered(model=model, reward_funcs=workload.length_reward, args=cfg,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tok,
                          callbacks=[meter])
        with (flops.counter() if a.flops else contextlib.nullcontext()) as counter:
            trainer.train()
    loop = meter.t1 - meter.t0
    assert meter.steps == iters and seen["episodes"] == R * iters, (meter.steps, seen)
    result = {"side": "trl", "method": "grpo", "version": trl.__version__, "episodes": seen["episodes"],
              "iterations": seen["batches"], "optimizer_steps": meter.steps, "response_tokens": seen["tokens"],
              "tokens": seen["tokens"], "work": seen["episodes"], "loop_seconds": loop,
              "throughput": seen["episodes"] / loop, "first_loss": None, "unit": "episodes/s",
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base_rss,
              "flops": counter.get_total_flops() if a.flops else None, "logs": meter.logs}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "logs"}))


if __name__ == "__main__":
    main()
