"""TRL side of the PPO speed benchmark: trains TRL 1.12's experimental PPOTrainer on a workload built by
benchmarks/workload.py and writes its loop time and throughput as JSON.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 \
        .bench/trl112/bin/python benchmarks/trl_ppo.py --spec WORK/tiny/spec.json --out /tmp/r.json [--seed 0]
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)  # first thing: the benchmark compares single-threaded CPU runs

import argparse
import contextlib
import json
import tempfile
import time

import trl
import trl.experimental.ppo.ppo_trainer as ppo_mod
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
    set_seed,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer

import flops  # benchmarks/flops.py: this script's folder is on sys.path


class Meter(TrainerCallback):
    """Times train() from its first callback to its last, and keeps every logged metric dict."""

    def __init__(self):
        self.t0 = self.t1 = None
        self.logs = []

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        self.t1 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flops", action="store_true", help="count the loop's FLOPs (flops.py; an untimed run)")
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="trl_ppo_")
    with open(a.spec) as fh:
        spec = json.load(fh)
    p = spec["ppo"]
    R, iters, mb = p["rollouts"], p["iterations"], p["mini_batch"]
    assert R % mb == 0, "rollouts must be a multiple of mini_batch"

    tok = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    ref_policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["rm_dir"], num_labels=1)
    # TRL's own example initialises the value model from the reward model
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["rm_dir"], num_labels=1)

    # like TRL's example: input_ids only (no special tokens); the default DataCollatorWithPadding left-pads
    with open(f"{spec['data_prompts']}/train.jsonl") as fh:
        prompts = [json.loads(line)["prompt"] for line, _ in zip(fh, range(R * iters))]
    assert len(prompts) == R * iters
    ds = Dataset.from_dict({"input_ids": tok(prompts, add_special_tokens=False)["input_ids"]})

    # TRL 1.12 derives batch_size = per_device_train_batch_size * grad_accum (rollouts per iteration),
    # mini_batch_size = batch_size / num_mini_batches, and steps the optimizer once per micro batch of
    # per_device_train_batch_size inside a mini batch (clipped to the mini batch). So per_device = rollouts,
    # grad_accum = 1 gives `rollouts` rollouts per iteration and one optimizer step per `mini_batch`
    # examples. (per_device = mini_batch with grad_accum = 1 would make an iteration only mini_batch rollouts;
    # grad_accum = rollouts/mini_batch would make accelerate skip all but every rollouts/mini_batch-th step.)
    out_dir = tmp.name  # nothing is saved (save_strategy="no"); removed at exit
    cfg = PPOConfig(
        output_dir=out_dir, seed=a.seed, use_cpu=True,
        per_device_train_batch_size=R, gradient_accumulation_steps=1, num_mini_batches=R // mb,
        num_ppo_epochs=p["ppo_epochs"], local_rollout_forward_batch_size=p["chunk_size"],
        total_episodes=R * iters, response_length=p["max_new_tokens"], temperature=1.0,
        stop_token="eos", missing_eos_penalty=None, kl_coef=p["kl_coef"], learning_rate=p["lr"],
        # TRL defaults bf16 and gradient checkpointing on; our side uses neither
        bf16=False, fp16=False, gradient_checkpointing=False,
        num_sample_generations=0, report_to="none", save_strategy="no", logging_steps=1,
        eval_strategy="no", disable_tqdm=True,
    )
    # PPOTrainer skips Trainer.__init__ (which seeds everything) and seeds only torch itself, so its numpy
    # mini-batch permutations would be unseeded: seed python/numpy/torch here for reproducible runs.
    set_seed(a.seed)
    meter = Meter()
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=ds, value_model=value_model,
                         callbacks=[meter])
    assert cfg.batch_size == R and cfg.mini_batch_size == mb, (cfg.batch_size, cfg.mini_batch_size)

    # Count real optimizer steps with a post-step hook on the torch optimizer under accelerate's wrapper.
    steps = [0]
    getattr(trainer.optimizer, "optimizer", trainer.optimizer).register_step_post_hook(
        lambda *_: steps.__setitem__(0, steps[0] + 1))

    # Count response tokens (up to and including the first EOS, else the whole generated width): the train
    # loop passes every raw generated response through the module-level truncate_response once.
    n_tokens = [0]
    truncate = ppo_mod.truncate_response

    def counting_truncate(stop_id, pad_id, responses):
        eos = responses == stop_id
        n_tokens[0] += int(torch.where(eos.any(1), eos.int().argmax(1) + 1, responses.shape[1]).sum())
        return truncate(stop_id, pad_id, responses)

    ppo_mod.truncate_response = counting_truncate

    with (flops.counter() if a.flops else contextlib.nullcontext()) as counter:
        trainer.train()
    loop = meter.t1 - meter.t0
    expected = R // mb * p["ppo_epochs"] * iters
    assert steps[0] == expected, (steps[0], expected)
    episodes = trainer.state.episode
    result = {"side": "trl", "method": "ppo", "version": trl.__version__, "episodes": episodes,
              "iterations": trainer.state.global_step, "optimizer_steps": steps[0],
              "response_tokens": n_tokens[0], "tokens": n_tokens[0], "work": episodes,
              "loop_seconds": loop, "throughput": episodes / loop, "first_loss": None,
              "unit": "episodes/s",
              "flops": counter.get_total_flops() if a.flops else None, "logs": meter.logs}
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "logs"}))


if __name__ == "__main__":
    main()
