"""Triton Inference Server, Python backend: a reward checkpoint exported by `rlhf export-triton`.

Copied as `<repository>/<name>/1/model.py`; the checkpoint sits beside it in `1/ckpt/`. Triton's Python needs
rlhf-cli (`pip install rlhf-cli` in the server image): the scores are then exactly `rlhf score --reward-ckpt`'s.
Inputs: `prompt` and `completion` (TYPE_STRING, [N]) or `input_ids` and `attention_mask` (TYPE_INT64, [N, T]).
Output: `rewards` (TYPE_FP32, [N]).
"""

import json
import os

import triton_python_backend_utils as pb_utils

from rlhf_cli.serving import BadRequest, RewardScorer

INPUTS = ("prompt", "completion", "input_ids", "attention_mask")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu"
        ckpt = os.path.join(args["model_repository"], args["model_version"], "ckpt")
        self.scorer = RewardScorer(ckpt, device=device, max_length=int(params.get("max_length", "512")))
        self.output = params.get("output", "rewards")

    def execute(self, requests):
        responses = []
        for request in requests:  # one response per request, in order; a bad one fails alone
            inputs = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            try:
                scores = self.scorer(inputs)
            except BadRequest as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, scores)]))
        return responses
