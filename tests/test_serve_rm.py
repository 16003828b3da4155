"""`rlhf serve-rm` (MLServer, Open Inference Protocol) against `rlhf score --reward-ckpt` and a local PPO run:
the same scores in text and token-id form, one sentence for bad input, and a PPO run that outlives its server."""

import json
import os
import signal
import socket
import subprocess
import time

import httpx
import pytest
from conftest import tiny_reward_ckpt, ROOT, assert_one_sentence, rlhf_cmd, run_cli

from rlhf_cli.checkpoint import latest_checkpoint
from rlhf_cli.errors import UserError
from rlhf_cli.rewards import CheckpointReward
from rlhf_cli.rewards.v2 import V2Reward

PROMPTS = ["SUBREDDIT: r/a\nPOST: my dog ate it.\nTL;DR:", "hello", "x", "a much longer prompt " * 6, "q", "z z"]
OUTS = [" my dog ate my homework.", " there, friend", " y", " short", " " + "long answer " * 8, ""]
PPO_CONFIG = str(ROOT / "stage_configs" / "tldr_ppo.yaml")
PPO_MICRO = [
    "--set", "data.synthetic.num_train=64", "--set", "data.synthetic.num_eval=8", "--set", "train.batch_size=4",
    "--set", "train.max_steps=8", "--set", "ppo.num_rollouts=8", "--set", "ppo.chunk_size=4",
    "--set", "ppo.ppo_epochs=2", "--set", "ppo.num_layers_unfrozen=1", "--set", "ppo.generation.max_new_tokens=8",
    "--set", "eval.num_samples=8", "--set", "eval.generation.max_new_tokens=8", "--set", "checkpoint.interval=4",
]


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:  # the gRPC server takes port + 1
            return port


def start_server(ckpt, port, *extra):
    proc = subprocess.Popen([*rlhf_cmd(), "serve-rm", "--ckpt", str(ckpt), "--port", str(port), "--host", "127.0.0.1",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve-rm did not become ready in 120 s")


def stop(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.fixture(scope="module")
def rm_ckpt(sft_ckpt, tmp_path_factory):
    return tiny_reward_ckpt(tmp_path_factory.mktemp("served") / "rm", sft_ckpt, seed=0)


@pytest.fixture(scope="module")
def server(rm_ckpt):
    port = _free_port()
    proc = start_server(rm_ckpt, port, "--max-batch-size", "16")
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def test_served_scores_equal_rlhf_score(server, rm_ckpt, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(PROMPTS, OUTS)))
    local, served = tmp_path / "local.jsonl", tmp_path / "served.jsonl"
    r = run_cli("score", "--data", str(rows), "--reward-ckpt", str(rm_ckpt), "--output", str(local))
    assert r.exit_code == 0, r.output
    r = run_cli("score", "--data", str(rows), "--reward-url", server, "--reward-protocol", "v2", "--output", str(served))
    assert r.exit_code == 0, r.output
    a = [json.loads(x)["score"] for x in local.read_text().splitlines()]
    b = [json.loads(x)["score"] for x in served.read_text().splitlines()]
    assert b == pytest.approx(a, abs=1e-5) and len(set(a)) > 1


def test_token_ids_and_texts_give_the_same_scores(server, rm_ckpt):
    """The token form is padded to reward.max_length (the server's, capped by the model's 256 positions); requests in flight at once are merged by MLServer's
    adaptive batching (batch_size 2, 3 in flight), and every score is still the local checkpoint's."""
    from rlhf_cli.models import load_tokenizer

    local = CheckpointReward(str(rm_ckpt)).score(PROMPTS, OUTS)
    text = V2Reward(server, batch_size=2, max_concurrency=3).score(PROMPTS, OUTS)
    tokens = V2Reward(server, inputs="tokens", tokenizer=load_tokenizer(str(rm_ckpt)), max_length=256, batch_size=2,
                      max_concurrency=3).score(PROMPTS, OUTS)
    assert text == pytest.approx(local, abs=1e-5)
    assert tokens == pytest.approx(text, abs=1e-5)


def test_bad_requests_get_http_400_with_the_reason(server):
    url = f"{server}/v2/models/reward/infer"

    def infer(*inputs):
        return httpx.post(url, json={"inputs": list(inputs)}, timeout=10)
    ids = {"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 99999]}
    r = infer(ids, {**ids, "name": "attention_mask", "data": [1, 1]})
    assert r.status_code == 400 and "outside the model's vocabulary" in r.text
    r = infer({"name": "question", "shape": [1], "datatype": "BYTES", "data": ["hi"]})
    assert r.status_code == 400 and "expected 'prompt' and 'completion'" in r.text
    r = infer({**ids, "data": [1, 2]}, {**ids, "name": "attention_mask", "data": [1, 0, 0, 0], "shape": [2, 2]})
    assert r.status_code == 400 and "attention_mask of the same shape" in r.text
    r = infer({**ids, "data": [1, 2]}, {**ids, "name": "attention_mask", "data": [0, 0]})
    assert r.status_code == 400 and "all zeros" in r.text


def test_a_wrong_model_name_is_one_sentence(server):
    with pytest.raises(UserError, match="has no ready model 'rm'.*reward.model_name"):
        V2Reward(server, model_name="rm", retries=0)


def test_serve_rm_refuses_a_policy_checkpoint_and_a_busy_port(sft_ckpt, rm_ckpt, server):
    assert_one_sentence(run_cli("serve-rm", "--ckpt", str(sft_ckpt)), r"is a policy checkpoint, but a reward model")
    assert_one_sentence(run_cli("serve-rm", "--ckpt", str(rm_ckpt) + "-missing"), r"does not exist")
    port = int(server.rsplit(":", 1)[1])
    assert_one_sentence(run_cli("serve-rm", "--ckpt", str(rm_ckpt), "--port", str(port), "--host", "127.0.0.1"),
                        rf"port {port} is already in use")


def _rollout_rewards(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["rollout/reward"] for r in rows if "rollout/reward" in r]


def test_ppo_with_the_served_reward_equals_the_local_checkpoint(server, sft_ckpt, rm_ckpt, tmp_path):
    base = ["ppo", "--config", PPO_CONFIG, "--policy", str(sft_ckpt), *PPO_MICRO]
    r = run_cli(*base, "--reward-ckpt", str(rm_ckpt), "--output-dir", str(tmp_path / "local"))
    assert r.exit_code == 0, r.output
    r = run_cli(*base, "--reward-url", server, "--set", "reward.protocol=v2", "--output-dir", str(tmp_path / "served"))
    assert r.exit_code == 0, r.output
    local, served = _rollout_rewards(tmp_path / "local"), _rollout_rewards(tmp_path / "served")
    assert len(local) == 2 and served == pytest.approx(local, abs=1e-5)
    a, b = (json.loads((tmp_path / d / "rlhf_stage.json").read_text())["metrics"] for d in ("local", "served"))
    assert b["eval/reward"] == pytest.approx(a["eval/reward"], abs=1e-5)


def test_ppo_outlives_a_killed_reward_server_with_resume(sft_ckpt, rm_ckpt, tmp_path):
    port = _free_port()
    url, out = f"http://127.0.0.1:{port}", tmp_path / "ppo"
    cmd = [*rlhf_cmd(), "ppo", "--config", PPO_CONFIG, "--policy", str(sft_ckpt), *PPO_MICRO, "--reward-url", url,
           "--set", "reward.protocol=v2", "--set", "train.max_steps=16", "--output-dir", str(out)]
    proc = start_server(rm_ckpt, port)
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    while latest_checkpoint(out) is None and run.poll() is None:
        time.sleep(0.05)
    stop(proc)  # killed mid-run, the first checkpoint just written
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 2, stderr
    lines = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"reward server {url} failed after 4 attempts" in lines[0] and "continue with --resume" in lines[0], lines[0]
    assert not (out / "rlhf_stage.json").exists() and latest_checkpoint(out) is not None  # in progress, resumable
    proc = start_server(rm_ckpt, port)
    try:
        done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        stop(proc)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["step"] == 16
