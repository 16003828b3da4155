"""Usage mistakes: one error style (`error: ...`, exit 2, the help to read), suggestions, --version."""

import os
import re

import pytest
from conftest import ROOT, assert_planned_then_refused_here, rlhf_cmd, run_cli


def _one_error_line(r) -> str:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Usage:" not in r.output and "Error:" not in r.output and "Traceback" not in r.output
    return lines[0]


def test_version():
    from rlhf_cli.version import __version__

    r = run_cli("--version")
    assert r.exit_code == 0 and r.output.startswith(f"rlhf-cli {__version__} (torch ")


@pytest.mark.parametrize("args,expect", [  # (the program is "rlhf" when installed; the test runner names it otherwise)
    (["rm"], r"no such command 'rm'; did you mean 'train-rm'\? See '\w+ --help'\.$"),
    (["stf"], r"no such command 'stf'; did you mean 'sft'\? See '\w+ --help'\.$"),
    (["sft", "--bogus"], r"no such option: --bogus; see '\w+ sft --help'\.$"),
    (["score"], r"missing option '--data'; see '\w+ score --help'\.$"),
    (["sft", "--seed", "x"], r"invalid value for '--seed'"),
])
def test_usage_mistakes_are_one_sentence_in_the_one_style(args, expect):
    line = _one_error_line(run_cli(*args))
    assert re.search(expect, line), line


def test_a_mistyped_set_key_is_blamed_on_set_not_the_config_file(tmp_path):
    line = _one_error_line(run_cli("sft", "--config", str(ROOT / "stage_configs" / "tldr_sft.yaml"), "--dry-run",
                                   "--output-dir", str(tmp_path / "o"), "--set", "train.lerning_rate=1"))
    assert re.search(r"unknown key 'train.lerning_rate' in --set; did you mean 'train.learning_rate'", line), line
    bad_file = tmp_path / "c.yaml"
    bad_file.write_text("stage: sft\ntrain:\n  lerning_rate: 1\n")
    line = _one_error_line(run_cli("sft", "--config", str(bad_file), "--dry-run", "--output-dir", str(tmp_path / "o")))
    assert f"in {bad_file}" in line


def test_a_held_out_set_too_small_to_measure_is_warned_about(tmp_path):
    import json

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "label": f" c{i}"}) + "\n" for i in range(50)))
    r = run_cli("sft", "--config", str(ROOT / "stage_configs" / "tldr_sft.yaml"), "--dry-run",
                "--output-dir", str(tmp_path / "o"), "--set", f"data.source={data}")
    flat = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 0 and "warning: only 2 held-out rows" in flat, r.output


def test_a_run_logging_to_a_file_shows_progress_lines_while_it_runs(tmp_path):
    """nohup / Slurm / CI: no terminal, so rich would draw nothing until the end; plain lines instead."""
    import subprocess
    import time

    from conftest import MICRO, SFT_CONFIG, rlhf_cmd

    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([*rlhf_cmd(), "sft", "--config", SFT_CONFIG, "--output-dir", str(tmp_path / "o"), *MICRO,
                                 "--set", "train.max_steps=12", "--set", "logging.print_every=4",
                                 "--set", "checkpoint.interval=0"], stdout=f, stderr=f)
        seen_while_running = False
        while proc.poll() is None:
            seen_while_running |= "sft step 4/12" in log.read_text()
            time.sleep(0.05)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    assert seen_while_running, text
    lines = [line for line in text.splitlines() if line.startswith("sft step ")]
    assert [line.split()[2] for line in lines] == ["4/12", "8/12", "12/12"], text
    assert re.search(r"loss \d+\.\d{4} lr \d\.\d\de-\d\d grad-norm \d+\.\d{3} \d+ tokens/s ETA 0:00:\d\d$", lines[0])


def test_wandb_writes_under_the_output_dir(tmp_path, monkeypatch):
    """W&B's run folder lands in the checkpoint (wandb/), not in the current directory."""
    import sys
    import types

    from conftest import MICRO, SFT_CONFIG

    calls = {}

    def init(**kw):
        calls.update(kw)
        (__import__("pathlib").Path(kw["dir"]) / "wandb" / "offline-run-1").mkdir(parents=True)
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)

    import importlib.machinery

    fake = types.ModuleType("wandb")
    fake.__spec__, fake.init = importlib.machinery.ModuleSpec("wandb", None), init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(tmp_path)
    r = run_cli("sft", "--config", SFT_CONFIG, "--output-dir", str(tmp_path / "o"), *MICRO, "--set", "logging.wandb=true")
    assert r.exit_code == 0, r.output
    assert calls["dir"] == str(tmp_path / "o.partial")
    assert (tmp_path / "o" / "wandb" / "offline-run-1").is_dir() and not (tmp_path / "wandb").exists()


def test_the_packaged_recipes_work_from_any_directory(tmp_path, monkeypatch):
    """`--config tldr_sft.yaml` from an empty directory finds the recipe shipped in the package, and the
    paths inside it (a GPU preset's accelerate and DeepSpeed files) are read relative to the recipe."""
    monkeypatch.chdir(tmp_path)
    r = run_cli("sft", "--config", "tldr_sft.yaml", "--dry-run", "--output-dir", "o")
    assert r.exit_code == 0, r.output
    assert "the packaged recipe" in r.output and "tldr_sft.yaml" in r.output
    from pathlib import Path

    from rlhf_cli.config import load_config

    cfg = load_config("stage_configs/tldr_dpo.yaml", "dpo", [], "gptj")  # as `--preset gptj` reads it
    for path in (cfg.distributed.accelerate_config, cfg.distributed.deepspeed_config):
        assert Path(path).is_absolute() and Path(path).is_file(), path
    r = run_cli("dpo", "--config", "tldr_dpo.yaml", "--preset", "gptj", "--dry-run", "--output-dir", "o")
    assert_planned_then_refused_here(r)  # the accelerate config was found: it asks for 8 GPUs
    line = _one_error_line(run_cli("sft", "--config", "nope.yaml"))
    assert "config file nope.yaml does not exist (packaged recipes: arith_grpo.yaml, arith_sft.yaml, chat_dpo.yaml, chat_ppo.yaml, chat_rm.yaml" in line


CARD = """rlhf sft --config tldr_sft.yaml
rlhf train-rm --init-from runs/sft
rlhf ppo --reward-ckpt runs/rm
rlhf eval --rouge --reward"""


@pytest.mark.slow
def test_the_cards_four_commands_verbatim_from_an_empty_directory(tmp_path):
    """The README's four lines, word for word, run by a shell in an empty directory with the full packaged
    recipes (about 7 minutes here): each stage's checkpoint, and the eval of SFT and PPO by the RM."""
    import json
    import os
    import subprocess
    from pathlib import Path

    readme = (ROOT / "README.md").read_text()
    assert all(line in readme for line in CARD.splitlines())  # the test runs what the card says
    env = {**os.environ, "PATH": f"{Path(rlhf_cmd()[0]).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in CARD.splitlines():
        r = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
    for stage in ("sft", "rm", "ppo"):
        assert json.loads((tmp_path / "runs" / stage / "rlhf_stage.json").read_text())["status"] == "complete"
    report = json.loads((tmp_path / "runs" / "eval" / "report.json").read_text())
    assert report["settings"]["checkpoints"] == ["runs/sft", "runs/ppo"] and report["settings"]["reward"][0] == "runs/rm"


def test_config_show_lists_every_key_with_type_default_and_description():
    from rlhf_cli.config import keys

    assert run_cli("config", "show", "ppo").exit_code == 0
    rows = {key: (kind, default, text) for key, kind, default, text in keys("ppo")}
    assert rows["train.learning_rate"][0] == "float" and rows["logging.print_every"][1] == "10"
    assert rows["distributed.deepspeed_config"][:2] == ("str | None", "null")
    assert "Without a terminal" in rows["logging.print_every"][2]
    assert {"ppo.init_kl_coef", "data.source", "model.name_or_path"} <= set(rows)
    assert "unknown stage 'pop'" in _one_error_line(run_cli("config", "show", "pop"))


def test_card_commands_take_the_packaged_recipe_and_the_reward_models_parent(sft_ckpt, tmp_path, monkeypatch):
    """From a directory where earlier stages wrote runs/: no --config takes the stage's packaged recipe,
    and `rlhf ppo --reward-ckpt runs/rm` starts from the SFT checkpoint the reward model came from."""
    import json
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(sft_ckpt, "runs/sft")
    r = run_cli("train-rm", "--init-from", "runs/sft", "--set", "data.synthetic.num_train=16",
                "--set", "data.synthetic.num_eval=4", "--set", "train.batch_size=8", "--set", "train.max_steps=1",
                "--set", "eval.at_start=false")
    assert r.exit_code == 0, r.output
    assert "no --config: the packaged recipe" in r.output and "tldr_rm.yaml" in r.output
    manifest = json.loads((tmp_path / "runs" / "rm" / "rlhf_stage.json").read_text())
    assert manifest["config"]["loss"] and manifest["parent"]["path"] == str((tmp_path / "runs" / "sft").resolve())
    r = run_cli("ppo", "--reward-ckpt", "runs/rm", "--dry-run")
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "tldr_ppo.yaml" in flat and f"no --policy: {(tmp_path / 'runs' / 'sft').resolve()}, the parent of the reward model runs/rm" in flat
    r = run_cli("eval", "--rouge", "--reward", "--num-samples", "4", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    assert "no --ckpt: runs/sft (the policies under runs/)" in r.output and "--reward: the reward model runs/rm" in r.output
    report = json.loads((tmp_path / "runs" / "eval" / "report.json").read_text())
    assert report["settings"]["checkpoints"] == ["runs/sft"] and report["settings"]["reward"][0] == "runs/rm"


@pytest.mark.parametrize("case", ["mistyped", "missing", "not_a_model", "policy_as_reward", "hub_offline",
                                  "bare_hub_name", "no_gpu"])
def test_preflight_refuses_in_seconds_before_any_worker(case, sft_ckpt, tmp_path, monkeypatch):
    """Each one sentence, exit 2, in seconds, before a model loads or a worker is launched; on --dry-run
    too (after the plan), where they used to be accepted and the real run refused them minutes later."""
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    args, pattern = {
        "mistyped": (["dpo", "--policy", "runs/sfft"], r"--policy runs/sfft does not exist; did you mean runs/sft\?"),
        "missing": (["train-rm", "--init-from", str(tmp_path / "gone")], r"--init-from .*gone does not exist"),
        "not_a_model": (["dpo", "--policy", "runs/sft"], r"--policy runs/sft is not a model checkpoint"),
        "policy_as_reward": (["ppo", "--policy", str(sft_ckpt), "--reward-ckpt", str(sft_ckpt)],
                             r"--reward-ckpt .* is a policy checkpoint, but a reward model .* is expected"),
        "hub_offline": (["dpo", "--policy", "someone/missing-model"],
                        r"cannot fetch model 'someone/missing-model'.*hub is unreachable"),
        # a bare hub name (gpt2) is a hub name, not a missing folder
        "bare_hub_name": (["dpo", "--policy", "gpt2"], r"cannot fetch model 'gpt2'.*hub is unreachable"),
        "no_gpu": (["ppo", "--config", "tldr_ppo.yaml", "--preset", "gptj", "--policy", str(sft_ckpt),
                    "--reward-fn", "rlhf_cli.data.synthetic:gold_reward_fn"],
                   r"preset 'gptj' launches 8 GPU processes .* but this machine has 0 GPUs"),
    }[case]
    if case == "no_gpu" and __import__("torch").cuda.device_count() >= 8:
        pytest.skip("this machine has the GPUs")
    for dry in (True, False):
        start = time.perf_counter()
        r = run_cli(*args, *(["--dry-run"] if dry else []))
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        line = lines[-1]  # before it the notes of what was defaulted, and a dry run's plan
        assert [x for x in lines if x.startswith("error:")] == [line], r.output
        assert re.search(pattern, line), line
        assert time.perf_counter() - start < 10 and "launching" not in r.output
        assert not (tmp_path / "runs" / args[0]).exists()


def test_a_hub_name_the_hub_does_not_have_is_refused_before_loading(tmp_path, monkeypatch):
    """Online, a name that is neither a folder nor on the hub is one sentence on --dry-run and before a run
    (it used to reach the model load). The hub is simulated: this machine has none."""
    import huggingface_hub

    from rlhf_cli import preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "repo_exists", lambda name, **kw: name != "someone/no-such-model")
    for extra in (["--dry-run"], []):
        r = run_cli("dpo", "--policy", "someone/no-such-model", *extra)
        errors = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert r.exit_code == 2 and errors == [r.output.strip().splitlines()[-1]], r.output
        assert "--policy someone/no-such-model is neither a local path nor a model on the Hugging Face hub" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_trl_style_model_and_data_shortcuts(sft_ckpt, tmp_path, shared_data):
    import json

    data = shared_data / "tldr" / "tldr_sft_carper_format.jsonl"
    r = run_cli("dpo", "--model", str(sft_ckpt), "--data", "synthetic:tldr", "--dry-run", "--output-dir", str(tmp_path / "d"))
    assert r.exit_code == 0, r.output
    r = run_cli("sft", "--model", str(sft_ckpt), "--data", str(data), "--output-dir", str(tmp_path / "s"),
                "--set", "train.max_steps=1", "--set", "eval.num_samples=2", "--set", "eval.at_start=false",
                "--set", "eval.generation.max_new_tokens=2", "--set", "data.max_length=64", "--set", "data.max_prompt_length=48", "--set", "train.batch_size=2")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "s" / "rlhf_stage.json").read_text())
    assert m["config"]["model"]["name_or_path"] == str(sft_ckpt) and m["config"]["data"]["source"] == str(data)
    line = _one_error_line(run_cli("train-rm", "--model", str(sft_ckpt), "--init-from", "runs/x", "--dry-run"))
    assert "--model and --init-from both name the model to start from" in line


def test_hub_kernels_are_off_without_a_hub_and_a_users_choice_is_kept(monkeypatch):
    """transformers with `kernels` installed fetched Llama's rotary kernel from the hub at the first CUDA load:
    offline, every stage on a GPU failed (seen on an H200). Without a hub our loads turn hub kernels off."""
    import importlib.util

    from rlhf_cli import hub

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "kernels" else None)
    monkeypatch.setenv("USE_HUB_KERNELS", "")  # recorded, so the test leaves the environment as it found it
    monkeypatch.delenv("USE_HUB_KERNELS")
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    hub.no_hub_kernels_offline()
    assert "USE_HUB_KERNELS" not in os.environ  # online: transformers' choice stands
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    hub.no_hub_kernels_offline()
    assert os.environ["USE_HUB_KERNELS"] == "NO"
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    hub.no_hub_kernels_offline()
    assert os.environ["USE_HUB_KERNELS"] == "YES"
