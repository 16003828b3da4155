import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from rlhf_cli.errors import UserError
from rlhf_cli.rewards import CallableReward, DeltaReward, HttpReward, make_reward

PROMPTS, OUTS = ["p1 ", "p2 "], ["a", "bb"]


def test_callable_gets_trlx_arguments(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(samples, prompts, outputs, **kw):\n"
        "    assert samples == [p + o for p, o in zip(prompts, outputs)]\n"
        "    return [len(o) for o in outputs]\n"
        "def short(samples, prompts, outputs, **kw):\n    return [1.0]\n"
        "def nan(samples, prompts, outputs, **kw):\n    return [1.0, float('nan')]\n"
        "def boom(samples, prompts, outputs, **kw):\n    raise KeyError('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert CallableReward("my_rewards:length").score(PROMPTS, OUTS) == [1.0, 2.0]
    with pytest.raises(UserError, match="returned 1 scores for 2 samples"):
        CallableReward("my_rewards:short").score(PROMPTS, OUTS)
    with pytest.raises(UserError, match="non-finite score"):
        CallableReward("my_rewards:nan").score(PROMPTS, OUTS)
    with pytest.raises(UserError, match="raised KeyError"):
        CallableReward("my_rewards:boom").score(PROMPTS, OUTS)
    with pytest.raises(UserError, match="has no function 'nope'"):
        CallableReward("my_rewards:nope")
    with pytest.raises(UserError, match="module:function"):
        CallableReward("my_rewards.length")


def test_scores_are_strictly_numbers(tmp_path, monkeypatch):
    """A string, a bool or None is a bug in the reward code: refused, naming the sample. Numeric arrays pass."""
    (tmp_path / "typed_rewards.py").write_text(
        "import numpy as np, torch\n"
        "def text(samples, prompts, outputs, **kw):\n    return [1.0, '1e30']\n"
        "def digits(samples, prompts, outputs, **kw):\n    return ['3', '4']\n"
        "def flags(samples, prompts, outputs, **kw):\n    return [True, 0.5]\n"
        "def nothing(samples, prompts, outputs, **kw):\n    return None\n"
        "def arrays(samples, prompts, outputs, **kw):\n    return np.array([1.5, 2])\n"
        "def tensors(samples, prompts, outputs, **kw):\n    return [torch.tensor(0.25), np.float32(3), 4]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"returned str '1e30' for sample 1; a score must be a number"):
        CallableReward("typed_rewards:text").score(PROMPTS, OUTS)
    with pytest.raises(UserError, match=r"returned str '3' for sample 0"):
        CallableReward("typed_rewards:digits").score(PROMPTS, OUTS)
    with pytest.raises(UserError, match=r"returned bool 'True' for sample 0"):
        CallableReward("typed_rewards:flags").score(PROMPTS, OUTS)
    with pytest.raises(UserError, match="must return a list of numbers, got NoneType"):
        CallableReward("typed_rewards:nothing").score(PROMPTS, OUTS)
    assert CallableReward("typed_rewards:arrays").score(PROMPTS, OUTS) == [1.5, 2.0]
    assert CallableReward("typed_rewards:tensors").score(PROMPTS + ["p3"], OUTS + ["c"]) == [0.25, 3.0, 4.0]


def test_a_reward_function_that_exits_is_an_error(tmp_path, monkeypatch):
    """SystemExit (sys.exit) from user code must not end a run with exit 0 and no word."""
    (tmp_path / "exiting_rewards.py").write_text(
        "import sys\ndef bye(samples, prompts, outputs, **kw):\n    sys.exit(0)\n")
    (tmp_path / "exit_at_import.py").write_text("import sys\nsys.exit('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="reward function exiting_rewards:bye raised SystemExit: 0"):
        CallableReward("exiting_rewards:bye").score(PROMPTS, OUTS)
    with pytest.raises(UserError, match="cannot import reward module 'exit_at_import': SystemExit: no GPU here"):
        CallableReward("exit_at_import:f")


def test_rlhf_score_with_an_exiting_reward_function_exits_2(tmp_path):
    import subprocess

    from conftest import rlhf_cmd

    (tmp_path / "exiting_rewards.py").write_text(
        "import sys\ndef bye(samples, prompts, outputs, **kw):\n    sys.exit(0)\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    r = subprocess.run([*rlhf_cmd(), "score", "--data", "rows.jsonl", "--reward-fn", "exiting_rewards:bye"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.strip() == "error: reward function exiting_rewards:bye raised SystemExit: 0."


def test_gold_scorer_is_a_ready_reward_function():
    from rlhf_cli.data.synthetic import generate

    row = generate("tldr", 1, 0)[0]
    r = make_reward(fn="rlhf_cli.data.synthetic:gold_reward_fn")
    assert r.score([row["prompt"]], [row["label"]]) == [row["gold"]]


def test_delta_subtracts_the_reference_score():
    class Len:
        name = "len"

        def score(self, prompts, completions, **kw):
            return [float(len(c)) for c in completions]

    d = DeltaReward(Len())
    assert d.score(PROMPTS, ["abc", "a"], references=["a", "abcd"]) == [2.0, -3.0]
    with pytest.raises(UserError, match="reference"):
        d.score(PROMPTS, OUTS)


class _Handler(BaseHTTPRequestHandler):
    calls: list = []
    mode = "ok"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.calls.append((self.headers.get("Authorization"), body))
        if _Handler.mode == "flaky" and len(_Handler.calls) == 1:
            self.send_response(503)
            self.end_headers()
            return
        payload = b"not json" if _Handler.mode == "garbage" else json.dumps(
            {"rewards": [len(c) for c in body["completions"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Handler.calls.clear()
    yield f"http://127.0.0.1:{srv.server_address[1]}/score"
    srv.shutdown()


def test_http_reward_batches_and_sends_the_token_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("RLHF_REWARD_TOKEN", "s3cret")
    _Handler.mode = "ok"
    assert HttpReward(server, batch_size=1).score(PROMPTS, OUTS) == [1.0, 2.0]
    assert len(_Handler.calls) == 2 and _Handler.calls[0][0] == "Bearer s3cret"
    assert _Handler.calls[0][1] == {"prompts": ["p1 "], "completions": ["a"]}


def test_http_reward_retries_a_server_error(server):
    _Handler.mode = "flaky"
    assert HttpReward(server, retries=2).score(PROMPTS, OUTS) == [1.0, 2.0]
    assert len(_Handler.calls) == 2


def test_http_reward_garbage_and_unreachable_are_one_sentence(server):
    _Handler.mode = "garbage"
    with pytest.raises(UserError, match="did not answer with JSON"):
        HttpReward(server, retries=0).score(PROMPTS, OUTS)
    with pytest.raises(UserError, match=r"reward URL http://127.0.0.1:9/x failed after 2 attempts"):
        HttpReward("http://127.0.0.1:9/x", retries=1, timeout=2).score(PROMPTS, OUTS)


def test_exactly_one_source():
    with pytest.raises(UserError, match="exactly one"):
        make_reward()
    with pytest.raises(UserError, match="exactly one"):
        make_reward(fn="a:b", url="http://x")


def test_lexicon_sentiment_counts_words_and_negations():
    import math

    from rlhf_cli.rewards.sentiment import lexicon_score, lexicon_sentiment

    assert lexicon_score("a great and wonderful film") == pytest.approx(math.tanh(1.0))
    assert lexicon_score("boring.") == pytest.approx(math.tanh(-0.5))
    assert lexicon_score("it was not good") == pytest.approx(math.tanh(-0.5))  # negation flips
    assert lexicon_score("the plot") == 0.0
    assert lexicon_sentiment(samples=["x great"], prompts=["x"], outputs=[" great"]) == [pytest.approx(math.tanh(0.5))]


def test_synthetic_reviews_are_deterministic_and_mixed():
    from rlhf_cli.data.synthetic import generate
    from rlhf_cli.rewards.sentiment import lexicon_score

    a, b = generate("reviews", 200, seed=3), generate("reviews", 200, seed=3)
    assert a == b and set(a[0]) == {"text"}
    mean = sum(lexicon_score(r["text"]) for r in a) / len(a)
    assert -0.3 < mean < 0.3  # about half positive, half negative: PPO has room both ways
    with pytest.raises(ValueError):
        generate("reviews", 2, seed=0, kind="pairs")
