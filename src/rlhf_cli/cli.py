"""The `rlhf` command: parses options, resolves the stage config, calls one trainer. No ML logic."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # typer vendors click
from typer.core import TyperGroup

from .errors import UserError
from .version import __version__

err = Console(stderr=True)  # messages, progress, errors
out = Console()  # results: plans, tables, scores

# names users reach for (trlx, TRL, older versions of this CLI) that are not commands: suggested, not run
ALIASES = {"rm": "train-rm", "reward": "train-rm", "reward-model": "train-rm", "train_rm": "train-rm",
           "trainrm": "train-rm", "evaluate": "eval", "generate": "eval", "finetune": "sft"}


def _say(message: str) -> None:
    """The one error style: `error: <sentence>.`, whoever raised it (we, click, or a usage mistake)."""
    message = message.rstrip()
    # escaped: a message may quote text with brackets (a path, a library's "[file.cc:537]") that rich
    # would otherwise take for markup and fail on
    err.print(f"[bold red]error:[/] {escape(message)}{'' if message.endswith(('.', '?', '!')) else '.'}",
              highlight=False, soft_wrap=True)


class _Group(TyperGroup):
    """Usage mistakes in the same one-sentence style as every other error, with the help to look at."""

    def resolve_command(self, ctx, args):
        if args and args[0] in ALIASES and args[0] not in self.commands:
            raise UsageError(f"no such command '{args[0]}'; did you mean '{ALIASES[args[0]]}'?", ctx)
        return super().resolve_command(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:  # bare `rlhf`: the help
            e.show()
            sys.exit(0)
        except UsageError as e:
            where = e.ctx.command_path if e.ctx else "rlhf"
            text = e.format_message().replace(". Did you mean", "; did you mean").rstrip(".")
            text = text[:1].lower() + text[1:]
            _say(f"{text} See '{where} --help'." if text.endswith("?") else f"{text}; see '{where} --help'")
            sys.exit(2)
        except ClickException as e:
            _say(e.format_message())
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("[yellow]interrupted[/]; nothing was written")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    help="Reinforcement Learning from Human Feedback, one stage per subcommand.\n\n"
    "Example: rlhf sft --config stage_configs/tldr_sft.yaml --output-dir runs/sft",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        import torch
        import transformers

        out.print(f"rlhf-cli {__version__} (torch {torch.__version__}, transformers {transformers.__version__})",
                  highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Reinforcement Learning from Human Feedback, one stage per subcommand."""


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Stage config YAML.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: --set train.learning_rate=1e-4 (repeatable).")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Preset from the config's `presets:` (default: tiny).")]
OutOpt = Annotated[Path | None, typer.Option("--output-dir", "-o", help="Checkpoint directory to write.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory (when the new one is complete).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Validate config, data and model; print the plan; train nothing.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Override the config's seed.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="TRL-style shortcut: the model to start from (sft: "
                                              "model.name_or_path; train-rm: --init-from; dpo, ppo, ilql: --policy).")]
DataOpt = Annotated[str | None, typer.Option("--data", help="TRL-style shortcut for --set data.source=...: a file, "
                                             "folder, hub dataset or synthetic:tldr|hh|reviews.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the hub to run (only for "
                                        "models you trust); off unless given.")]


def _fail(message: str, code: int = 2):
    _say(message)
    raise typer.Exit(code)


def _interrupted(e: KeyboardInterrupt, out: Path | None) -> str:
    """What a Ctrl-C left behind, in words: a training run's checkpoint, or nothing (eval, score)."""
    from .checkpoint import latest_checkpoint
    from .errors import Interrupted

    if isinstance(e, Interrupted):
        return f"[yellow]stopped[/] at step {e.step}; checkpoint saved in {e.path}, continue with --resume"
    if out is None:
        return "[yellow]interrupted[/]; nothing was written"
    last = latest_checkpoint(out)
    if last is None:
        return "[yellow]interrupted[/] before the first checkpoint; --resume starts the run over"
    return f"[yellow]interrupted[/]; the checkpoint {last} is kept, continue with --resume"


def _guard(debug: bool, fn, out: dict | None = None):
    """Run `fn`; bad input -> one sentence and exit 2; Ctrl-C -> exit 130; tracebacks only with --debug.

    `out`: a training command's {"dir": output directory}, filled in by `fn` once it is known.
    """
    if debug:
        return fn()
    import warnings

    warnings.filterwarnings("ignore")
    try:
        return fn()
    except UserError as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        err.print(_interrupted(e, (out or {}).get("dir")))
        raise typer.Exit(130)
    except typer.Exit:
        raise
    except MemoryError:
        _fail("out of memory; lower train.batch_size or data.max_length")
    except OSError as e:  # the operating system refused: say what, and where
        from .errors import os_problem

        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{os_problem(e) or str(e)}{where}")
    except Exception as e:  # an internal error: still one line unless --debug
        _fail(f"internal error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
              "(re-run with --debug for the traceback)", code=1)


def _graceful_signals() -> None:
    """SIGINT / SIGTERM: a training loop saves a checkpoint after its current step, then exits 130."""
    from .errors import STOP

    try:
        signal.signal(signal.SIGTERM, STOP.signal)
        signal.signal(signal.SIGINT, STOP.signal)
    except ValueError:  # not the main thread
        pass


def _quiet_libraries() -> None:
    """Our progress bars and messages only: no per-file bars from datasets / transformers."""
    import datasets
    import torch
    import transformers

    if not torch.cuda.is_available():  # else DeepSpeed, when installed, warns on import that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _print_plan(cfg, info: dict) -> None:
    import yaml
    from rich.syntax import Syntax
    from rich.table import Table

    from .config import to_dict

    out.print(Syntax(yaml.safe_dump(to_dict(cfg), sort_keys=False), "yaml", background_color="default"))
    table = Table(title=f"plan: rlhf {cfg.stage} (dry run, nothing trained)", show_header=False)
    for k, v in info.items():
        table.add_row(k, str(v))
    out.print(table)


def _print_results(result: dict, stage: str) -> None:
    from rich.table import Table

    if "final" not in result:
        return
    first, final = result.get("initial", {}), result["final"]
    table = Table(title=f"{stage}: held-out metrics, before and after ({result['steps']} steps)")
    table.add_column("metric")
    table.add_column("initial model", justify="right")
    table.add_column("trained model", justify="right")
    for k, v in final.items():
        if k.endswith("_stderr"):
            continue
        se = final.get(f"{k}_stderr")
        se0 = first.get(f"{k}_stderr")
        fmt = (lambda x, s: "—" if x is None else f"{x:.4f}" + (f" ± {s:.4f}" if s is not None else ""))
        table.add_row(k.removeprefix("eval/"), fmt(first.get(k), se0), fmt(v, se))
    out.print(table)
    out.print(f"checkpoint: {result['output_dir']}")


def _relaunch(d) -> bool:
    """Run this same command under torchrun / accelerate launch / Ray Train when the config asks for several
    processes and we are not one of them yet. Returns False when this process should train."""
    import subprocess

    if "WORLD_SIZE" in os.environ:
        return False
    if d.num_processes <= 1 and not d.accelerate_config:
        if d.launcher == "ray":
            err.print("distributed.launcher: ray with one process: training in this process, without Ray")
        return False
    if d.launcher == "ray":  # rlhf_cli.ray_launch starts the workers, relays rank 0's output, returns the exit code
        from .ray_launch import launch

        raise typer.Exit(launch(d, sys.argv[1:], note=err.print, say=_say))
    if d.accelerate_config:
        if not Path(d.accelerate_config).is_file():
            raise UserError(f"distributed.accelerate_config {d.accelerate_config} does not exist")
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", d.accelerate_config]
        if d.deepspeed_config:  # the stage config's (read relative to it), not the launch file's own relative path
            launcher += ["--deepspeed_config_file", str(Path(d.deepspeed_config).resolve())]
    else:
        launcher = [sys.executable, "-m", "rlhf_cli.launch", "--standalone", "--nproc_per_node", str(d.num_processes)]
        # torchrun would set 1 thread per process and print a banner saying so; share the cores instead
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // d.num_processes)))
    err.print(f"launching {d.num_processes if not d.accelerate_config else 'the configured'} processes: "
              f"{' '.join(launcher[2:])}")
    proc = subprocess.Popen([*launcher, "-m", "rlhf_cli.cli", *sys.argv[1:]])

    def forward(signum, frame):  # the launcher passes it on to every worker: each saves, then exits
        proc.send_signal(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    raise typer.Exit(proc.wait())


CLEAR = object()  # a stage flag value meaning "set this config key to null"


def _shortcuts(stage: str, model: str | None, data: str | None, fields: dict) -> dict:
    """TRL's flags: --model (where the stage starts: sft's model, the reward model's --init-from, a
    policy stage's --policy) and --data (data.source), as the stage's own fields."""
    if model is not None:
        key, flag = {"sft": ("model__name_or_path", None), "train-rm": ("init_from", "--init-from")}.get(
            stage, ("policy", "--policy"))
        if flag and fields.get(key) not in (None, model):
            _fail(f"--model and {flag} both name the model to start from; give one of them")
        fields = {**fields, key: model}
    return {**fields, "data__source": data} if data is not None else fields


def _set_fields(cfg, fields: dict) -> None:
    """The stage's own flags over the resolved config: reward__ckpt -> cfg.reward.ckpt; CLEAR -> null."""
    for key, value in fields.items():
        if value is not None:
            *parents, leaf = key.split("__")
            target = cfg
            for part in parents:
                target = getattr(target, part)
            setattr(target, leaf, None if value is CLEAR else value)


def _api():
    """torch and the trainers, imported once the input is known to be good: a refusal takes a fraction of a
    second, not the seconds these imports take."""
    from . import api

    return api


def _run_stage(stage: str, config, sets, preset, seed, output_dir, resume, overwrite, dry_run, debug,
               model=None, data=None, **fields) -> None:
    """Resolve the stage config, set the stage's own flags (`fields`), then plan or train."""
    where: dict = {}
    fields = _shortcuts(stage, model, data, fields)

    def go():
        from . import preflight
        from .checkpoint import output_lock
        from .config import default_recipe, find_config, resolve

        recipe = config if config is not None else default_recipe(stage)
        if not Path(recipe).exists() and find_config(recipe).exists():
            err.print(f"{'--config ' + str(config) if config else 'no --config'}: the packaged recipe "
                      f"{find_config(recipe)} (rlhf config show {stage} lists every key)", highlight=False,
                      soft_wrap=True)
        cfg, dest = resolve(stage, recipe, list(sets or []), preset, seed, output_dir)
        _set_fields(cfg, fields)
        for note in preflight.fill_defaults(cfg):
            err.print(note, highlight=False, soft_wrap=True)
        preflight.check_paths(cfg)  # seconds, before any model loads or worker starts
        if dry_run:  # the plan, then whether this machine can run it
            _quiet_libraries()
            _print_plan(cfg, _api().plan(cfg, dest))
            return preflight.check_machine(cfg)
        where["dir"] = dest
        with output_lock(dest):  # taken before any worker is launched (the workers run under it) or torch loads
            preflight.check_machine(cfg)
            _quiet_libraries()
            if _relaunch(cfg.distributed):
                return
            _print_results(_api().run(cfg, dest, resume=resume, overwrite=overwrite, console=err), stage)
    _guard(debug, go, where)


@app.command(epilog="Example: rlhf sft --config stage_configs/tldr_sft.yaml --output-dir runs/sft "
             "--set train.max_steps=50")
def sft(config: ConfigOpt = None, model: ModelOpt = None, data: DataOpt = None, set_: SetOpt = None,
        preset: PresetOpt = None, output_dir: OutOpt = None,
        resume: ResumeOpt = False, overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False,
        seed: SeedOpt = None, trust_remote_code: TrustOpt = False, debug: DebugOpt = False):
    """Supervised fine-tuning of a causal LM on prompt/completion (or plain text) data."""
    _run_stage("sft", config, set_, preset, seed, output_dir, resume, overwrite, dry_run, debug, model, data,
               model__trust_remote_code=trust_remote_code or None)


InitOpt = Annotated[str | None, typer.Option("--init-from", help="Start from this checkpoint (e.g. runs/sft) or hub name.")]


@app.command("train-rm", epilog="Example: rlhf train-rm --config stage_configs/tldr_rm.yaml --init-from runs/sft "
             "--output-dir runs/rm")
def train_rm(config: ConfigOpt = None, init_from: InitOpt = None, model: ModelOpt = None, data: DataOpt = None,
             set_: SetOpt = None, preset: PresetOpt = None,
             output_dir: OutOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
             dry_run: DryRunOpt = False, seed: SeedOpt = None, trust_remote_code: TrustOpt = False, debug: DebugOpt = False):
    """Train a reward model (scalar head, Bradley-Terry loss) on preference pairs."""
    _run_stage("train-rm", config, set_, preset, seed, output_dir, resume, overwrite, dry_run, debug, model, data,
               init_from=init_from, model__trust_remote_code=trust_remote_code or None)


PolicyOpt = Annotated[str | None, typer.Option("--policy", help="Policy checkpoint to start from (e.g. runs/sft).")]


@app.command(epilog="Example: rlhf dpo --config stage_configs/tldr_dpo.yaml --policy runs/sft --output-dir runs/dpo")
def dpo(config: ConfigOpt = None, policy: PolicyOpt = None, model: ModelOpt = None, data: DataOpt = None,
        set_: SetOpt = None, preset: PresetOpt = None,
        output_dir: OutOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
        dry_run: DryRunOpt = False, seed: SeedOpt = None, trust_remote_code: TrustOpt = False, debug: DebugOpt = False):
    """Direct preference optimisation of a policy on preference pairs (no reward model)."""
    _run_stage("dpo", config, set_, preset, seed, output_dir, resume, overwrite, dry_run, debug, model, data,
               policy=policy, model__trust_remote_code=trust_remote_code or None)


@app.command(epilog="Example: rlhf ilql --config stage_configs/tldr_ilql.yaml --policy runs/sft --output-dir runs/ilql")
def ilql(config: ConfigOpt = None, policy: PolicyOpt = None, model: ModelOpt = None, data: DataOpt = None,
        set_: SetOpt = None, preset: PresetOpt = None,
         output_dir: OutOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
         dry_run: DryRunOpt = False, seed: SeedOpt = None, trust_remote_code: TrustOpt = False, debug: DebugOpt = False):
    """Offline RL with ILQL: Q/V heads learned from rewarded samples steer generation."""
    _run_stage("ilql", config, set_, preset, seed, output_dir, resume, overwrite, dry_run, debug, model, data,
               policy=policy, model__trust_remote_code=trust_remote_code or None)


RewardCkptOpt = Annotated[str | None, typer.Option("--reward-ckpt", help="Reward-model checkpoint (e.g. runs/rm).")]
RewardFnOpt = Annotated[str | None, typer.Option("--reward-fn", help="Python reward: module:function.")]
RewardUrlOpt = Annotated[str | None, typer.Option("--reward-url", help="HTTP reward endpoint (token from $RLHF_REWARD_TOKEN).")]


@app.command(epilog="Example: rlhf ppo --config stage_configs/tldr_ppo.yaml --policy runs/sft --reward-ckpt runs/rm "
             "--output-dir runs/ppo")
def ppo(config: ConfigOpt = None, policy: PolicyOpt = None, model: ModelOpt = None, data: DataOpt = None,
        reward_ckpt: RewardCkptOpt = None,
        reward_fn: RewardFnOpt = None, reward_url: RewardUrlOpt = None,
        delta: Annotated[bool | None, typer.Option("--delta/--no-delta", help="Reward minus the reference completion's reward.")] = None,
        set_: SetOpt = None, preset: PresetOpt = None, output_dir: OutOpt = None, resume: ResumeOpt = False,
        overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False, seed: SeedOpt = None, trust_remote_code: TrustOpt = False, debug: DebugOpt = False):
    """Online RLHF with PPO: sample, score with a reward model or function, update the policy under a KL penalty."""
    given = any((reward_ckpt, reward_fn, reward_url))
    # a reward flag replaces the config's reward source rather than adding a second one
    reward = {f"reward__{k}": v or CLEAR for k, v in (("ckpt", reward_ckpt), ("fn", reward_fn), ("url", reward_url),
                                                    ("classifier", None), ("sources", None), ("weights", None))} if given else {}
    _run_stage("ppo", config, set_, preset, seed, output_dir, resume, overwrite, dry_run, debug, model, data,
               policy=policy, reward__delta=delta, **reward, model__trust_remote_code=trust_remote_code or None)


@app.command(epilog="Example: rlhf grpo --config tldr_grpo.yaml --policy runs/sft --reward-ckpt runs/rm "
             "--output-dir runs/grpo")
def grpo(config: ConfigOpt = None, policy: PolicyOpt = None, model: ModelOpt = None, data: DataOpt = None,
         reward_ckpt: RewardCkptOpt = None, reward_fn: RewardFnOpt = None, reward_url: RewardUrlOpt = None,
         set_: SetOpt = None, preset: PresetOpt = None, output_dir: OutOpt = None, resume: ResumeOpt = False,
         overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False, seed: SeedOpt = None, trust_remote_code: TrustOpt = False,
         debug: DebugOpt = False):
    """Critic-free online RL (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++): G completions per prompt, group advantages."""
    given = any((reward_ckpt, reward_fn, reward_url))
    reward = {f"reward__{k}": v or CLEAR for k, v in (("ckpt", reward_ckpt), ("fn", reward_fn), ("url", reward_url),
                                                    ("classifier", None), ("sources", None), ("weights", None))} if given else {}
    _run_stage("grpo", config, set_, preset, seed, output_dir, resume, overwrite, dry_run, debug, model, data,
               policy=policy, **reward, model__trust_remote_code=trust_remote_code or None)


@app.command("eval", epilog="Example: rlhf eval --ckpt runs/sft --ckpt runs/ppo --rouge --reward --reward-ckpt runs/rm "
             "--output-dir runs/eval")
def eval_(
    ckpt: Annotated[list[str] | None, typer.Option("--ckpt", help="Policy checkpoint to evaluate (repeatable; "
                                                     "default: the policies under runs/, SFT first).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Data source of the held-out prompts (default: the first "
                                              "checkpoint's, else synthetic:tldr).")] = None,
    config: ConfigOpt = None,
    rouge_: Annotated[bool, typer.Option("--rouge/--no-rouge", help="ROUGE-1/2/L against the references.")] = True,
    reward: Annotated[bool, typer.Option("--reward", help="Score completions with the reward source given.")] = False,
    reward_ckpt: RewardCkptOpt = None, reward_fn: RewardFnOpt = None, reward_url: RewardUrlOpt = None,
    ref_ckpt: Annotated[str | None, typer.Option("--ref-ckpt", help="Reference policy of the KL column (default: the "
                                                  "first checkpoint's parent).")] = None,
    beta: Annotated[list[float] | None, typer.Option("--beta", help="ILQL checkpoints: steer with logits + beta * "
                                                      "(Q - V); repeat for a sweep (a row per beta).")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="Held-out prompts.")] = 256,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 32,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed (the same for every checkpoint).")] = 1234,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the report goes; a report made with the "
                                              "same checkpoints and settings is reused.")] = Path("runs/eval"),
    win_rate: Annotated[bool, typer.Option("--win-rate", help="Each checkpoint's win rate against the data's reference "
                                           "completions (ties half, bootstrap 95% interval, length-controlled), "
                                           "judged by gold on synthetic data, else by --reward.")] = False,
    against: Annotated[str | None, typer.Option("--against", help="Head to head: win rates against this "
                                                 "checkpoint's completions instead of the references.")] = None,
    metric: Annotated[list[str] | None, typer.Option("--metric", help="An `evaluate` metric of completions against "
                                                      "references (repeatable): a hub name online, a local metric "
                                                      "script offline.")] = None,
    debug: DebugOpt = False,
):
    """Evaluate policies side by side: ROUGE, reward and Δ, gold, KL, length; report.md/json, samples, plots."""
    def go():
        from .report import EvalRequest, fill_request, run_eval, table
        from .trainers.common import progress_bar

        _quiet_libraries()
        req = EvalRequest(list(ckpt or []), data, config, rouge_, reward, reward_ckpt, reward_fn, reward_url, ref_ckpt,
                          beta, num_samples, max_new_tokens, temperature, batch_size, seed, output_dir, win_rate,
                          against, list(metric or []))
        for note in fill_request(req):
            err.print(note, highlight=False, soft_wrap=True)
        with progress_bar(err, True) as progress:
            result = run_eval(req, progress)
        out.print(table(result.rows, result.title))
        if result.files is None:
            out.print(f"report: {output_dir} is up to date (same checkpoints, data and settings); nothing to do")
        else:
            out.print(f"report: {output_dir} ({', '.join(result.files)})")
    _guard(debug, go)


config_app = typer.Typer(help="Stage configs: what every key means.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show", epilog="Example: rlhf config show ppo")
def config_show(stage: Annotated[str, typer.Argument(help="sft, train-rm, dpo, ppo, ilql or grpo.")], debug: DebugOpt = False):
    """Every key of STAGE's config, with its type, default and description (set any with --set key=value)."""
    def go():
        from rich.table import Table

        from .config import keys, recipes

        table = Table(title=f"rlhf {stage}: config keys (packaged recipes: {', '.join(recipes())})")
        for column in ("key", "type", "default", "description"):
            table.add_column(column, overflow="fold")
        for row in keys(stage):
            table.add_row(*row)
        out.print(table)
    _guard(debug, go)


@app.command(epilog="Example: rlhf score --data samples.jsonl --reward-ckpt runs/rm --output scored.jsonl")
def score(
    data: Annotated[Path, typer.Option("--data", help="JSONL of {prompt, completion} rows (optionally reference).")],
    reward_ckpt: Annotated[str | None, typer.Option("--reward-ckpt", help="Reward-model checkpoint.")] = None,
    reward_fn: Annotated[str | None, typer.Option("--reward-fn", help="Python reward: module:function.")] = None,
    reward_url: Annotated[str | None, typer.Option("--reward-url", help="HTTP reward endpoint (token from $RLHF_REWARD_TOKEN).")] = None,
    reward_protocol: Annotated[str, typer.Option("--reward-protocol", help="--reward-url's protocol: json, or v2 "
                                                 "(KServe v2: Triton, KServe, MLServer, rlhf serve-rm).")] = "json",
    reward_model_name: Annotated[str, typer.Option("--reward-model-name", help="v2: the served model's name.")] = "reward",
    delta: Annotated[bool, typer.Option("--delta", help="Score minus the score of each row's `reference`.")] = False,
    output: Annotated[Path | None, typer.Option("--output", help="Write the rows with their scores here (JSONL).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    device: Annotated[str | None, typer.Option("--device", help="Device of a reward checkpoint (cpu, cuda:1).")] = None,
    debug: DebugOpt = False,
):
    """Score (prompt, completion) pairs with a reward model, a Python function or an HTTP endpoint."""
    def go():
        from .metrics import mean_and_stderr
        from .report import score_file
        from .rewards import make_reward

        _quiet_libraries()
        if reward_protocol not in ("json", "v2"):
            raise UserError(f"--reward-protocol is json or v2, not {reward_protocol!r}")
        source = make_reward(reward_ckpt, reward_fn, reward_url, delta=delta, device=device, batch_size=batch_size,
                             protocol=reward_protocol, model_name=reward_model_name)
        scores = score_file(data, source, delta, output)
        mean, se = mean_and_stderr(scores)
        out.print(f"{len(scores)} samples scored by {source.name}: mean {mean:.4f} ± {se:.4f}")
    _guard(debug, go)


CkptOpt = Annotated[str, typer.Option("--ckpt", help="Reward-model checkpoint (rlhf train-rm's output).")]
NameOpt = Annotated[str, typer.Option("--model-name", help="The model's name in /v2/models/NAME/infer.")]
BatchOpt = Annotated[int, typer.Option("--max-batch-size", help="Requests are batched up to this many samples.")]


@app.command("serve-rm", epilog="Example: rlhf serve-rm --ckpt runs/rm --port 8080   then   rlhf ppo ... "
             "--reward-url http://HOST:8080 --set reward.protocol=v2")
def serve_rm(ckpt: CkptOpt, port: Annotated[int, typer.Option("--port", help="HTTP port (gRPC: the next one).")] = 8080,
             model_name: NameOpt = "reward", max_batch_size: BatchOpt = 64,
             max_batch_time: Annotated[float, typer.Option("--max-batch-time", help="Seconds a request waits for "
                                                           "others to batch with.")] = 0.005,
             host: Annotated[str, typer.Option("--host")] = "0.0.0.0",
             device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1.")] = None,
             max_length: Annotated[int, typer.Option("--max-length", min=1, help="Text inputs: tokens kept per "
                                                     "sample, as the stage's data.max_length.")] = 512,
             debug: DebugOpt = False):
    """Serve a reward model over the Open Inference Protocol (KServe v2, as Triton and KServe speak) with MLServer."""
    def go():
        from .serving import prepare

        _quiet_libraries()
        scorer = prepare(ckpt, port, host, max_batch_size, device, max_length)
        try:
            from .serving.server import serve
        except ImportError:
            raise UserError("rlhf serve-rm needs MLServer: pip install 'rlhf-cli[serve]'") from None
        serve(scorer, ckpt, port=port, model_name=model_name, max_batch_size=max_batch_size,
              max_batch_time=max_batch_time, host=host, on_ready=lambda: err.print(
                  f"serving {ckpt} as model '{model_name}' on http://{host}:{port}/v2/models/{model_name}/infer "
                  f"(gRPC :{port + 1}); ready: GET /v2/health/ready", highlight=False, soft_wrap=True))
    _guard(debug, go)


@app.command("export-triton", epilog="Example: rlhf export-triton --ckpt runs/rm model_repository/   then   "
             "tritonserver --model-repository model_repository")
def export_triton(out_dir: Annotated[Path, typer.Argument(help="The Triton model repository to write into.")],
                  ckpt: CkptOpt, model_name: NameOpt = "reward",
                  max_length: Annotated[int, typer.Option("--max-length", min=1, help="Text inputs: tokens kept per "
                                                          "sample.")] = 512,
                  instances: Annotated[int, typer.Option("--instances", help="Model copies serving requests in "
                                                         "parallel.")] = 1,
                  gpu: Annotated[bool, typer.Option("--gpu", help="instance_group KIND_GPU (default: KIND_CPU).")] = False,
                  overwrite: OverwriteOpt = False, debug: DebugOpt = False):
    """Write a Triton model repository (Python backend) that serves a reward checkpoint over KServe v2."""
    def go():
        from .serving.triton import export_triton as export

        dest = export(ckpt, str(out_dir), model_name, max_length, instances=instances, gpu=gpu, overwrite=overwrite)
        out.print(f"wrote {dest} (config.pbtxt, 1/model.py, 1/ckpt); Triton's Python needs rlhf-cli installed; "
                  f"serve with: tritonserver --model-repository {out_dir}", highlight=False, soft_wrap=True)
    _guard(debug, go)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("RANK", "0") != "0":  # one voice: the main process prints, the others stay quiet
        err.quiet = out.quiet = True
    _graceful_signals()
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)
    except KeyboardInterrupt:  # before a command took over (start-up): still one line and exit 130
        err.print("[yellow]interrupted[/]; nothing was written")
        sys.exit(130)


if __name__ == "__main__":
    main()
