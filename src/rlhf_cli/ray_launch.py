"""`distributed.launcher: ray`: this same `rlhf` command line on Ray Train workers (TorchTrainer).

Each Ray worker starts the command in a fresh process, as torchrun starts its workers: the process sees
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR (set by Ray Train), a MASTER_PORT of its
own, and the output lock of the `rlhf` that launched it, so the stage code path is exactly torchrun's.
A process rather than the worker's own thread: Ray runs the training function in a thread, where
Ctrl-C cannot reach it and where process state (signals, CUDA, Accelerate's singleton) would be shared
with Ray's. Checkpoints go to --output-dir as always; Ray's own run storage is a temp dir, removed.

The launching `rlhf` prints rank 0's output as it comes, and exits with the processes' code: 2 and the
one sentence of a bad input, 130 after Ctrl-C (every process saves a checkpoint first). Ray is
imported here only, so `rlhf --help` stays fast and Ray stays optional.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext

from .checkpoint import LOCK_HELD
from .errors import STOP, UserError

INSTALL = "distributed.launcher: ray needs Ray Train: pip install 'rlhf-cli[ray]'"
# what the training processes read from the launching shell (a remote node's own environment lacks it)
FORWARD_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "RLHF_", "WANDB_", "DS_")
FORWARD_NAMES = ("PYTHONPATH", "OMP_NUM_THREADS", "COLUMNS", LOCK_HELD)
PORT_KEY = "rlhf_cli/master_port"
PARENT = "RLHF_CLI_RAY_PARENT"
PROBE_S = 3.0  # a cluster address that does not answer fails in seconds, not after ray.init's minute of retries
TEARDOWN_S = 20.0  # once every process has exited, Ray Train gets this long to return before the launcher does
GRACE_S = 15.0  # a failed process waits this long for rank 0 to say why before Ray stops the others
# The training process dies with its Ray worker (SIGKILL when the worker thread that started it ends:
# Ray killed the worker, or the run was torn down), so no process is left training on its own; and it
# takes Ctrl-C again (Ray's worker threads block or ignore SIGINT, which a process inherits through exec).
TRAMPOLINE = """import os, signal, sys
signal.pthread_sigmask(signal.SIG_SETMASK, [])
signal.signal(signal.SIGINT, signal.SIG_DFL)
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):  # not Linux
    pass
if os.getppid() != int(os.environ.pop("%s")):
    sys.exit(1)
os.execv(sys.executable, [sys.executable, "-m", "rlhf_cli.cli", *sys.argv[1:]])
""" % PARENT


def _import_ray():
    try:
        import ray
        import ray.train.torch  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None
    return ray


def _bootstrap(address: str | None) -> tuple[str, int, str] | None:
    """(host, port, what named it) of the cluster ray.init would join, or None when it starts a local one."""
    from ray._private.services import canonicalize_bootstrap_address

    what = "distributed.ray_address" if address else "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else \
        "the Ray cluster running on this node"
    if "://" in (address or os.environ.get("RAY_ADDRESS") or ""):
        # Ray Client: the training processes would start on the cluster in this machine's directory
        raise UserError(f"{what} {address or os.environ['RAY_ADDRESS']!r} is a Ray Client address; run rlhf on a "
                        "node of the cluster instead (ray job submit -- rlhf ...), which joins it by itself")
    try:
        where = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise UserError(f"{what} {address!r}: {str(e).splitlines()[0].rstrip('.')}") from None
    if where is None:
        return None
    host, _, port = where.rpartition(":")
    if not port.isdigit():
        raise UserError(f"{what} {where!r} is not host:port")
    return host.strip("[]"), int(port), what


def _probe(host: str, port: int, what: str) -> None:
    try:
        socket.create_connection((host, port), timeout=PROBE_S).close()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise UserError(f"no Ray cluster answers at {host}:{port} ({what}): {reason.lower()}; start one with "
                        "`ray start --head`, or correct the address") from None


def check(d) -> tuple[str, int, str] | None:
    """Before anything starts (also on --dry-run): Ray is installed and the cluster to join answers."""
    if d.launcher != "ray" or d.num_processes <= 1 or "WORLD_SIZE" in os.environ:
        return None
    _import_ray()
    target = _bootstrap(d.ray_address)
    if target is not None:
        _probe(*target)
    return target


def _quiet_ray(joining: bool) -> None:
    """No usage-stats notice, no metrics exporters, workers stay in our directory; Ray's own settings win
    where the user made them."""
    if joining:  # an address that accepts connections but is no Ray cluster: ~5 s of retries, not 20
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "5")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one actor less; a preempted run fails


def _join(ray, d, target) -> str:
    """ray.init, quietly; returns where, in words."""
    kwargs: dict = {"log_to_driver": False, "configure_logging": True, "logging_level": logging.ERROR,
                    "include_dashboard": False}
    if target is None:  # a cluster of our own: room for every worker even on fewer cores (as torchrun allows)
        kwargs["num_cpus"] = max(os.cpu_count() or 1, d.num_processes)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with _stderr_to_nowhere(target is not None):
            ray.init(address=d.ray_address, **kwargs)
        if handler is not None:  # ray.init takes SIGTERM over to exit at once; ours stops with a checkpoint
            signal.signal(signal.SIGTERM, handler)
    except Exception as e:  # noqa: BLE001 - Ray's own start-up errors are many; each is one sentence here
        raise _join_error(e, target) from None
    return f"the Ray cluster at {target[0]}:{target[1]}" if target else "a local Ray cluster"


def _join_error(e: BaseException, target) -> UserError:
    chain, cause = [], e
    while cause is not None and len(chain) < 8:
        chain.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    if target is None:
        return UserError(f"cannot start a local Ray cluster: {_first_line(e)}")
    where = f"{target[0]}:{target[1]} ({target[2]})"
    if any("AuthenticationError" in text for text in chain):  # Ray's token auth: a ray.init() cluster has it on
        return UserError(f"the Ray cluster at {where} wants its authentication token: set RAY_AUTH_MODE=token "
                         "(the token is read from RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    if isinstance(e, ConnectionError):
        return UserError(f"{where} accepts connections but does not answer as a Ray cluster (another service on "
                         "that port, or its head is still starting)")
    return UserError(f"cannot join the Ray cluster at {where}: {_first_line(e)}")


@contextmanager
def _stderr_to_nowhere(active: bool):
    """Ray's C++ client logs each failed attempt to reach the cluster on file descriptor 2 (no Python
    logging setting reaches it); the sentence we raise says what failed instead."""
    if not active:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text}"[:300].rstrip(".")


class Hub:
    """The launching process's mailbox (a Ray actor): rank 0's output lines, each process's exit code (None
    while it runs), and a stop request (Ctrl-C) that every worker passes on to its process."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []
        self.codes: dict[int, int | None] = {}
        self.stop = False

    def say(self, stream: str, text: str) -> None:
        self.lines.append((stream, text))

    def exited(self, rank: int, code: int | None) -> None:
        self.codes[rank] = code

    def exit_codes(self) -> dict[int, int | None]:
        return dict(self.codes)

    def poll(self) -> tuple[list[tuple[str, str]], dict[int, int | None]]:
        """The lines since the last poll (the launcher's only), and every exit code so far."""
        lines, self.lines = self.lines, []
        return lines, dict(self.codes)

    def request_stop(self) -> None:
        self.stop = True

    def stopping(self) -> bool:
        return self.stop


# --- in each Ray worker ---------------------------------------------------------------------------
def _master_port(rank: int) -> str:
    """A free port on rank 0's node for the training processes' rendezvous (Ray's process group in these
    workers holds MASTER_PORT), shared through that group's store."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            store.set(PORT_KEY, str(s.getsockname()[1]))
    return store.get(PORT_KEY).decode()


def _process_env(config: dict, rank: int) -> dict:
    env = {**os.environ, **config["env"], "MASTER_PORT": _master_port(rank), PARENT: str(os.getpid())}
    if "OMP_NUM_THREADS" not in config["env"]:  # Ray sets 1 (its CPU per worker); share the node's cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return env


def _relay(stream, name: str, hub) -> threading.Thread:
    def pump():
        for line in iter(stream.readline, b""):
            hub.say.remote(name, line.decode(errors="replace"))
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _run_process(config: dict, hub, rank: int) -> int:
    import ray

    pipe = subprocess.PIPE if rank == 0 else None  # the other ranks are quiet, as under torchrun
    try:
        proc = subprocess.Popen([sys.executable, "-c", TRAMPOLINE, *config["argv"]], cwd=config["cwd"],
                                env=_process_env(config, rank), stdout=pipe, stderr=pipe)
    except OSError as e:
        hub.say.remote("err", f"error: cannot start rlhf on the Ray worker {socket.gethostname()}: {e}.\n")
        return 2
    hub.exited.remote(rank, None)
    relays = [_relay(proc.stdout, "out", hub), _relay(proc.stderr, "err", hub)] if rank == 0 else []
    stopped = False
    while proc.poll() is None:
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if not stopped and ray.get(hub.stopping.remote()):  # Ctrl-C on the launcher: as torchrun passes it on
                proc.send_signal(signal.SIGINT)
                stopped = True
    for relay in relays:
        relay.join()
    return proc.returncode


def _worker(config: dict) -> None:
    """One Ray Train worker: the command line in a process of its own, then its exit code to the hub."""
    import ray

    hub, rank = config["hub"], int(os.environ["RANK"])
    if ray.get(hub.stopping.remote()):  # Ctrl-C while Ray was starting the workers
        code = 130
        if rank == 0:
            hub.say.remote("err", "interrupted before training started; nothing was written\n")
    else:
        code = _run_process(config, hub, rank)
    ray.get(hub.exited.remote(rank, code))
    if code == 0:
        return
    deadline = time.time() + GRACE_S
    while rank != 0 and time.time() < deadline and ray.get(hub.exit_codes.remote()).get(0) is None:
        time.sleep(0.2)  # rank 0 says why: it failed too, or a collective with this one does in a moment
    raise RuntimeError(f"rlhf exited with code {code}")  # Ray Train then stops the other workers


# --- in the launching process ---------------------------------------------------------------------
def _forwarded_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES) or k in FORWARD_NAMES}
    if sys.stderr.isatty() and "COLUMNS" not in env:  # the tables rank 0 prints fit this terminal
        env["COLUMNS"] = str(shutil.get_terminal_size().columns)
    return env


def _print(lines) -> None:
    for stream, text in lines:
        (sys.stdout if stream == "out" else sys.stderr).write(text)
    sys.stdout.flush()
    sys.stderr.flush()


def _supervise(ray, trainer, hub, n: int) -> tuple[dict, BaseException | None]:
    """fit() in a thread while this one prints rank 0's output; returns the processes' exit codes and fit's
    error. The first Ctrl-C (or SIGTERM) asks every process to checkpoint and stop; a second aborts at once."""
    failed: list = []
    done = threading.Event()  # not Thread.is_alive: a Ctrl-C inside Thread.join can leave that False early

    def fit():
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - said in one sentence by the caller
            failed.append(e)
        finally:
            done.set()
    threading.Thread(target=fit, daemon=True).start()
    codes: dict = {}
    stopping, ended = False, None
    # The first signal only sets STOP.requested, read here between calls: an exception raised inside ray.get
    # could be turned by Ray into an error of its own, the stop never asked and the workers waited for forever.
    # A second signal raises at once (StopFlag).
    STOP.armed, STOP.requested, STOP.announce = True, False, False
    try:
        while True:
            finished = done.is_set()  # read before the last poll: the workers have reported by then
            try:
                if STOP.requested and not stopping:
                    stopping = True
                    hub.request_stop.remote()
                lines, codes = ray.get(hub.poll.remote())
                _print(lines)
                if ended is None and len(codes) == n and None not in codes.values():
                    ended = time.monotonic()  # every process has exited: what is left is Ray Train's teardown
                if finished or (ended is not None and time.monotonic() - ended > TEARDOWN_S):
                    break
                time.sleep(0.2)
            except ray.exceptions.RayError as e:  # the hub went with the cluster (a head node lost)
                done.wait()
                return codes, (failed[0] if failed else e)
    finally:
        STOP.armed, STOP.announce = False, True
    return codes, (failed[0] if failed else None)


def _exit_code(codes: dict, error: BaseException | None, n: int, say) -> int:
    """The processes' code (rank 0's first: it is the one that spoke); a Ray failure with none is said."""
    failed = [codes[r] for r in sorted(codes) if codes[r]]
    if failed:
        code = codes.get(0) or next((c for c in failed if c > 0), failed[0])
        return code if code > 0 else 1  # killed by a signal
    if error is None:
        return 0
    reason = _first_line(getattr(error, "controller_failure", None) or next(
        iter(getattr(error, "worker_failures", {}).values()), error))
    if not codes:  # no process started: the workers could not
        raise UserError(f"the Ray cluster did not start the {n} workers: {reason}")
    say(f"the Ray run failed: {reason}")
    return 1


def _rendezvous_config(backend: str):
    """Ray Train's process group, used here only to hand out the training processes' port: its workers
    leave CUDA alone (TorchConfig's would make each one's GPU current, holding a CUDA context there for the
    whole run beside the training process's own)."""
    from ray.train.torch import TorchConfig

    class Rendezvous(TorchConfig):
        @property
        def train_func_context(self):
            return nullcontext

    return Rendezvous(backend=backend)


def _fits(ray, n: int, use_gpu: bool, where: str) -> None:
    """Ray Train waits for resources the cluster will never have: say so now instead."""
    unit = "GPU" if use_gpu else "CPU"
    have = int(ray.cluster_resources().get(unit, 0))
    if have < n:
        raise UserError(f"distributed.num_processes {n} asks for {n} Ray workers of one {unit} each, but {where} "
                        f"has {have} {unit}{'s' if have != 1 else ''}; lower it or add nodes")


def launch(d, argv: list[str], note, say) -> int:
    """Run `rlhf <argv>` on d.num_processes Ray Train workers; returns the exit code. `note` prints a
    notice, `say` an error sentence."""
    target = check(d)  # None: a local cluster
    ray = _import_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _quiet_ray(target is not None)
    storage = tempfile.mkdtemp(prefix="rlhf-ray-")  # Ray's run records only: checkpoints go to --output-dir
    try:
        where = _join(ray, d, target)
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0  # the cluster's GPUs, not this machine's
        _fits(ray, d.num_processes, use_gpu, where)
        hub = ray.remote(num_cpus=0)(Hub).remote()
        config = {"argv": argv, "cwd": os.getcwd(), "env": _forwarded_env(), "hub": hub}
        trainer = TorchTrainer(
            _worker, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=d.num_processes, use_gpu=use_gpu),
            torch_config=_rendezvous_config("nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=f"rlhf-{argv[0] if argv else 'run'}", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=0, max_preemption_failures=0)))
        note(f"launching {d.num_processes} processes: Ray Train workers on {where}"
             f"{' (one GPU each)' if use_gpu else ''}")
        return _exit_code(*_supervise(ray, trainer, hub, d.num_processes), d.num_processes, say)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
