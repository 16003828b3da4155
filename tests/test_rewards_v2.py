"""The Open Inference Protocol (KServe v2) reward client against a stand-in server: both input forms,
readiness, retries, concurrency, and every malformed answer as one sentence."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT
from transformers import AutoTokenizer

from rlhf_cli.errors import UserError
from rlhf_cli.rewards import make_reward
from rlhf_cli.rewards.v2 import V2Reward

TOKENIZER = str(ROOT.parent / "shared" / "data" / "gpt2_tokenizer")
PROMPTS = ["SUBREDDIT: r/a\nPOST: my dog ate it.\nTL;DR:", "Q: 2 + 2?\nA:", "hello", "x"]
OUTS = [" my dog ate my homework.", " 4", " there, friend", " y"]


class _V2(BaseHTTPRequestHandler):
    """A v2 server whose model 'reward' scores a sample by its characters (text form: prompt + completion;
    token form: the decoded ids), so both forms must agree."""

    mode, calls, tok = "ok", [], None

    def _send(self, code, payload=None):
        body = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200 if self.path == "/v2/models/reward/ready" else 404, {})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _V2.calls.append((self.headers.get("Authorization"), req))
        if _V2.mode == "flaky" and len(_V2.calls) == 1:
            return self._send(503, {"error": "busy"})
        inputs = {i["name"]: i for i in req["inputs"]}
        if "prompt" in inputs:
            texts = [p + c for p, c in zip(inputs["prompt"]["data"], inputs["completion"]["data"])]
        else:
            n, t = inputs["input_ids"]["shape"]
            ids, mask = inputs["input_ids"]["data"], inputs["attention_mask"]["data"]
            texts = [_V2.tok.decode([ids[r * t + k] for k in range(t) if mask[r * t + k]], skip_special_tokens=True)
                     for r in range(n)]
        scores = [len(x) / 10 for x in texts]
        out = {"name": "rewards", "datatype": "FP32", "shape": [len(scores)], "data": scores}
        if _V2.mode == "shape":
            out["shape"], out["data"] = [len(scores) + 1], scores + [0.0]
        elif _V2.mode == "dtype":
            out["datatype"] = "BYTES"
        elif _V2.mode == "nan":
            out["data"] = [math.nan] * len(scores)
        elif _V2.mode == "name":
            out["name"] = "logits"
        self._send(200, {"model_name": "reward", "outputs": [out]})

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    _V2.tok = AutoTokenizer.from_pretrained(TOKENIZER)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _V2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _V2.calls.clear()
    _V2.mode = "ok"
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_text_and_token_ids_give_the_same_scores_in_concurrent_batches(server, monkeypatch):
    monkeypatch.setenv("RLHF_REWARD_TOKEN", "s3cret")
    text = make_reward(url=server, protocol="v2", batch_size=1, max_concurrency=4)
    want = [len(p + c) / 10 for p, c in zip(PROMPTS, OUTS)]
    assert text.score(PROMPTS, OUTS) == pytest.approx(want)
    assert len(_V2.calls) == 4 and all(auth == "Bearer s3cret" for auth, _ in _V2.calls)
    # the 4 batches went out at once: in any order
    assert {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [PROMPTS[0]]} in [
        body["inputs"][0] for _, body in _V2.calls]
    tokens = make_reward(url=server, protocol="v2", inputs="tokens", tokenizer=TOKENIZER, batch_size=3)
    assert tokens.score(PROMPTS, OUTS) == pytest.approx(want)
    ids = [body["inputs"][0] for _, body in _V2.calls[4:]]
    assert all(x["name"] == "input_ids" and x["datatype"] == "INT64" for x in ids)
    assert sorted(x["shape"][0] for x in ids) == [1, 3]  # batches of 3 and 1


def test_a_server_error_is_retried(server):
    _V2.mode = "flaky"
    assert V2Reward(server, retries=2).score(PROMPTS[:1], OUTS[:1]) == pytest.approx([len(PROMPTS[0] + OUTS[0]) / 10])


@pytest.mark.parametrize("mode,pattern", [
    ("shape", r"answered 'rewards' with shape \[2\] for 1 samples; expected \[1\]"),
    ("dtype", r"answered 'rewards' as BYTES, not a float tensor"),
    ("nan", r"answered a non-finite or non-number score \(nan\) for sample 0"),
    ("name", r"answered without an output 'rewards' \(it has: logits\); set reward.output"),
])
def test_a_malformed_answer_is_one_sentence(server, mode, pattern):
    _V2.mode = mode
    with pytest.raises(UserError, match=pattern):
        V2Reward(server, retries=0).score(PROMPTS[:1], OUTS[:1])


def test_a_wrong_model_name_an_unreachable_server_and_tokens_without_a_tokenizer(server):
    with pytest.raises(UserError, match=r"has no ready model 'rm' \(GET /v2/models/rm/ready answered HTTP 404\)"):
        V2Reward(server, model_name="rm")
    with pytest.raises(UserError, match=r"reward server http://127.0.0.1:9 failed after 2 attempts"):
        V2Reward("http://127.0.0.1:9", retries=1, timeout=2)
    with pytest.raises(UserError, match="reward.inputs: tokens needs the reward model's tokenizer"):
        V2Reward(server, inputs="tokens")


def test_grpo_scores_its_rollouts_on_a_v2_server(server, sft_ckpt, tmp_path):
    from conftest import run_cli
    from test_cli_grpo import GRPO_CONFIG, GRPO_MICRO

    r = run_cli("grpo", "--config", GRPO_CONFIG, "--policy", str(sft_ckpt), *GRPO_MICRO, "--reward-url", server,
                "--set", "reward.protocol=v2", "--set", "train.max_steps=2", "--output-dir", str(tmp_path / "grpo"))
    assert r.exit_code == 0, r.output
    assert any(body["inputs"][0]["name"] == "prompt" for _, body in _V2.calls)
    m = json.loads((tmp_path / "grpo" / "rlhf_stage.json").read_text())
    assert m["metrics"]["eval/reward"] > 0  # characters / 10 of prompt + completion
