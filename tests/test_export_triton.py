"""`rlhf export-triton`: a model repository Triton accepts (config.pbtxt parsed by Triton's own ModelConfig
schema) whose model.py, run with only `triton_python_backend_utils` stubbed, scores as `rlhf score` does."""

import importlib.util
import sys
import types

import numpy as np
import pytest
from conftest import tiny_reward_ckpt, assert_one_sentence, run_cli

from rlhf_cli.rewards import CheckpointReward

PROMPTS = ["SUBREDDIT: r/a\nPOST: my dog ate it.\nTL;DR:", "hello", "x"]
OUTS = [" my dog ate my homework.", " there, friend", ""]


@pytest.fixture(scope="module")
def rm_ckpt(sft_ckpt, tmp_path_factory):
    return tiny_reward_ckpt(tmp_path_factory.mktemp("triton") / "rm", sft_ckpt, seed=1)


class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


def _stub_backend_utils():
    """The boundary Triton provides to a Python-backend model: tensors in and out, responses, errors."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor
    pb.TritonError = type("TritonError", (), {"__init__": lambda self, msg: setattr(self, "msg", msg)})

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error
    pb.InferenceResponse = InferenceResponse
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    return pb


def _load_model_py(path, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stub_backend_utils())
    spec = importlib.util.spec_from_file_location("exported_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exported_repository_scores_as_rlhf_score(rm_ckpt, tmp_path, monkeypatch):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    r = run_cli("export-triton", str(tmp_path / "repo"), "--ckpt", str(rm_ckpt), "--max-length", "200")
    assert r.exit_code == 0, r.output
    model_dir = tmp_path / "repo" / "reward"
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "python" and [i.name for i in config.input] == ["prompt", "completion", "input_ids",
                                                                               "attention_mask"]
    assert (model_dir / "1" / "ckpt" / "model.safetensors").is_file()

    model = _load_model_py(model_dir / "1" / "model.py", monkeypatch).TritonPythonModel()
    # what Triton passes: the model config as JSON (proto field names, as Triton writes it), the model's directory and version, the instance kind
    model.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
                      "model_repository": str(model_dir),
                      "model_version": "1", "model_instance_kind": "CPU"})
    tok = CheckpointReward(str(rm_ckpt)).tokenizer
    ids = [tok(p + c)["input_ids"] for p, c in zip(PROMPTS, OUTS)]
    width = max(map(len, ids))
    text_request = {"prompt": _Tensor("prompt", np.array([p.encode() for p in PROMPTS], dtype=object)),
                    "completion": _Tensor("completion", np.array([c.encode() for c in OUTS], dtype=object))}
    token_request = {"input_ids": _Tensor("input_ids", [x + [0] * (width - len(x)) for x in ids]),
                     "attention_mask": _Tensor("attention_mask", [[1] * len(x) + [0] * (width - len(x)) for x in ids])}
    bad_request = {"input_ids": _Tensor("input_ids", [[1, 10**6]])}
    text, tokens, bad = model.execute([text_request, token_request, bad_request])

    local = CheckpointReward(str(rm_ckpt), max_length=200).score(PROMPTS, OUTS)
    assert text.error is None and text.output_tensors[0].name() == "rewards"
    assert text.output_tensors[0].as_numpy().dtype == np.float32
    assert text.output_tensors[0].as_numpy().tolist() == pytest.approx(local, abs=1e-5)
    assert tokens.output_tensors[0].as_numpy().tolist() == pytest.approx(local, abs=1e-5)
    assert bad.output_tensors == [] and "outside the model's vocabulary" in bad.error.msg


def test_export_refuses_a_policy_and_an_existing_repository(sft_ckpt, rm_ckpt, tmp_path):
    assert_one_sentence(run_cli("export-triton", str(tmp_path / "a"), "--ckpt", str(sft_ckpt)),
                        r"is a policy checkpoint, but a reward model")
    assert run_cli("export-triton", str(tmp_path / "b"), "--ckpt", str(rm_ckpt)).exit_code == 0
    assert_one_sentence(run_cli("export-triton", str(tmp_path / "b"), "--ckpt", str(rm_ckpt)),
                        r"already exists; pass --overwrite")
    assert run_cli("export-triton", str(tmp_path / "b"), "--ckpt", str(rm_ckpt), "--overwrite").exit_code == 0
