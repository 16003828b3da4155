"""TRL's side of one SFT, reward-model or DPO benchmark run (TRL 1.16, the `bench` extra), on the
same workload, settings and batches as ours.py:

- TRL's defaults are kept except where ours differ in what is computed: bf16 and gradient
  checkpointing off (ours runs without both), the same lr / linear decay / no warmup / AdamW betas.
- TRL reads the training examples in the order rlhf_cli's batcher draws them (a sampler built from
  `rlhf_cli.trainers.common.Batcher`), so step 1 sees the same batch on both sides and the first
  losses can be compared.
- The loop is timed from `on_train_begin` to `on_train_end`; tokens are counted from each batch's
  attention mask.

    python benchmarks/trl_side.py --spec WORK/tiny/spec.json --method sft --out result.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

import flops  # benchmarks/flops.py: this script's folder is on sys.path


def rows(path: str) -> list[dict]:
    return [json.loads(x) for x in (Path(path) / "train.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--method", required=True, choices=["sft", "rm", "dpo"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flops", action="store_true", help="count the loop's FLOPs (flops.py; an untimed run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = json.loads(Path(args.spec).read_text())
    m = spec[args.method]

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from rlhf_cli.trainers.common import Batcher

    data = rows(spec[f"data_{args.method}"])
    if args.method == "sft":
        data = [{"prompt": r["prompt"], "completion": r["label"]} for r in data]
    batcher = Batcher(len(data), m["batch_size"], args.seed)
    order = [i for s in range(m["steps"]) for i in batcher.indices(s)]

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if args.method == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(spec["rm_dir"], num_labels=1)
        Trainer, Config = trl.RewardTrainer, trl.RewardConfig
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
        Trainer, Config = (trl.SFTTrainer, trl.SFTConfig) if args.method == "sft" else (trl.DPOTrainer, trl.DPOConfig)

    seen = {"steps": 0, "tokens": 0, "logs": [], "t0": None, "t1": None}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            seen["t0"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            seen["t1"] = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            seen["steps"] += 1

        def on_log(self, args_, state, control, logs=None, **k):
            seen["logs"].append({"step": state.global_step, **(logs or {})})

    class Ordered(Trainer):
        def _get_train_sampler(self, *a, **k):
            return order  # a list of indices is a sampler: ours' batches, in ours' order

        def training_step(self, model, inputs, *a, **k):
            seen["tokens"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *a, **k)

    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            output_dir=tmp, per_device_train_batch_size=m["batch_size"], max_steps=m["steps"],
            learning_rate=m["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, bf16=False, fp16=False,
            gradient_checkpointing=False, logging_steps=1, save_strategy="no", eval_strategy="no",
            report_to="none", seed=args.seed, use_cpu=True, max_length=spec["max_length"],
            dataloader_num_workers=0, disable_tqdm=False,
            **({"beta": 0.1, "loss_type": ["sigmoid"]} if args.method == "dpo" else {}),
        )
        trainer = Ordered(model=model, args=config, train_dataset=Dataset.from_list(data), processing_class=tok,
                          callbacks=[Clock()])
        with (flops.counter() if args.flops else contextlib.nullcontext()) as counter:
            trainer.train()
    first = next(x for x in seen["logs"] if x["step"] == 1 and "loss" in x)
    seconds = seen["t1"] - seen["t0"]
    unit = "tokens" if args.method == "sft" else "pairs"
    work = seen["tokens"] if unit == "tokens" else m["steps"] * m["batch_size"]
    result = {"side": "trl", "version": trl.__version__, "method": args.method, "optimizer_steps": seen["steps"],
              "tokens": seen["tokens"], "work": work, "unit": f"{unit}/s", "loop_seconds": seconds,
              "throughput": work / seconds, "first_loss": first["loss"],
              "first_logps_chosen": first.get("logps/chosen"),
              "flops": counter.get_total_flops() if args.flops else None}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
