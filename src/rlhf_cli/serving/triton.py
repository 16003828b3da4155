"""`rlhf export-triton`: a Triton model repository (Python backend) serving a reward checkpoint.

    OUT/NAME/config.pbtxt       inputs prompt/completion (TYPE_STRING [N]) or input_ids/attention_mask
                                (TYPE_INT64 [N, T]), output rewards (TYPE_FP32 [N])
    OUT/NAME/1/model.py         serving/triton_model.py: RewardScorer, the scorer `rlhf serve-rm` runs
    OUT/NAME/1/ckpt/            the checkpoint's weights, config and tokenizer

`max_batch_size: 0`: Triton's dynamic batcher would need every input declared as [N, 1] (dims [1]), which
the Open Inference Protocol clients here (and trlx's) do not send; a request's own batch is the batch, and
`--instances` model copies serve requests in parallel.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UserError
from ..models import expect_kind

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "prompt", data_type: TYPE_STRING, dims: [ -1 ], optional: true }},
  {{ name: "completion", data_type: TYPE_STRING, dims: [ -1 ], optional: true }},
  {{ name: "input_ids", data_type: TYPE_INT64, dims: [ -1, -1 ], optional: true }},
  {{ name: "attention_mask", data_type: TYPE_INT64, dims: [ -1, -1 ], optional: true }}
]
output [
  {{ name: "{output}", data_type: TYPE_FP32, dims: [ -1 ] }}
]
instance_group [ {{ count: {instances}, kind: {kind} }} ]
parameters [
  {{ key: "max_length", value: {{ string_value: "{max_length}" }} }},
  {{ key: "output", value: {{ string_value: "{output}" }} }}
]
"""
CKPT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja", "rlhf_stage.json")


def export_triton(ckpt: str, out: str, name: str = "reward", max_length: int = 512, output: str = "rewards",
                  instances: int = 1, gpu: bool = False, overwrite: bool = False) -> Path:
    src, dest = Path(ckpt).expanduser(), Path(out).expanduser() / name
    if not src.is_dir():
        raise UserError(f"--ckpt {ckpt} does not exist")
    expect_kind(src, "reward", "--ckpt")
    weights = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.safetensors.index.json"))
    if not weights:
        raise UserError(f"--ckpt {ckpt} has no safetensors weights")
    if dest.exists() and not overwrite:
        raise UserError(f"{dest} already exists; pass --overwrite to replace it")
    if instances < 1:
        raise UserError(f"--instances must be at least 1, got {instances}")
    tmp = dest.with_name(f".{name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "1" / "ckpt").mkdir(parents=True)
    for f in [*weights, *(src / n for n in CKPT_FILES if (src / n).is_file())]:
        shutil.copy2(f, tmp / "1" / "ckpt" / f.name)
    shutil.copy2(Path(__file__).with_name("triton_model.py"), tmp / "1" / "model.py")
    (tmp / "config.pbtxt").write_text(CONFIG.format(name=name, output=output, instances=instances, max_length=max_length,
                                                    kind="KIND_GPU" if gpu else "KIND_CPU"))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)  # whole or not at all
    return dest
