"""The checkpoint contract: what a stage's output directory holds (README, "Checkpoints").

    runs/sft/                     complete or absent, never half-written
      config.json model.safetensors tokenizer.json ...   plain Hugging Face model + tokenizer
      rlhf_stage.json             manifest: stage, version, resolved config, parent, data, metrics, times
      metrics.jsonl               every logged metric, one JSON object per line
      trainer_state/              optimizer.safetensors + state.json (scheduler, RNG, step, data position)
        zero/rank-00000.*         under DeepSpeed ZeRO: each process's optimizer shard (safetensors + JSON)
    runs/sft.partial/             only while a run is in progress (or was killed)
      run.json                    the run's id (the final manifest names it too)
      metrics.jsonl               the live log
      checkpoints/step-00000100/  each complete (written to a temp sibling, then renamed)
    runs/.sft.lock                held (flock) by the run writing runs/sft: a second run is refused

Tensors are stored with safetensors only; everything else is JSON. Nothing here unpickles.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import json
import os
import random
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .version import __version__
from .errors import FULL, UserError, is_corrupt_safetensors, os_errno, os_problem

MANIFEST = "rlhf_stage.json"
METRICS = "metrics.jsonl"
STATE_DIR = "trainer_state"
CKPT_PREFIX = "step-"
RUN_FILE = "run.json"
LOCK_HELD = "RLHF_CLI_OUTPUT_LOCK"  # set for the processes a lock holder launches (torchrun workers)


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def is_complete(path: Path) -> bool:
    m = read_manifest(path)
    return m is not None and m.get("status") == "complete"


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextmanager
def atomic_dir(final: Path):
    """Yield a temp sibling of `final` to fill; on success it replaces `final` in one rename.

    An existing `final` is moved aside first and deleted only after the new one is in place, so
    a crash at any point leaves the old directory, the new one, or (at worst) both.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os_errno(e) in FULL:  # also inside safetensors' own error type
            raise UserError(f"{os_problem(e)}: writing {final} failed and nothing was replaced "
                            "(make room, then rerun with --resume)") from None
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def clean_stale_temps(parent: Path) -> None:
    """Tidy what a killed process left beside its directories: temp copies (`.<name>.tmp-<pid>`) and
    directories being deleted (`.<name>.trash-<pid>`) go; a replaced directory (`.<name>.old-<pid>`)
    goes back in place when the kill came before its replacement was renamed in, else goes."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        kind = next((k for k in (".tmp-", ".old-", ".trash-") if k in p.name), None)
        if not p.name.startswith(".") or kind is None:
            continue
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        original = p.with_name(p.name[1:].rsplit(kind, 1)[0])
        if kind == ".old-" and not original.exists():
            os.replace(p, original)
        else:
            shutil.rmtree(p, ignore_errors=True)


def retire(path: Path) -> None:
    """Delete a directory so that a kill midway leaves it whole or gone: renamed aside first, then removed."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def content_hash(path: Path) -> str | None:
    """sha256 of a checkpoint's weights and config (its own manifest's value when it has one)."""
    path = Path(path)
    m = read_manifest(path)
    if m and m.get("content_hash"):
        return m["content_hash"]
    return compute_content_hash(path)


def compute_content_hash(path: Path) -> str | None:
    files = sorted(p for p in path.glob("*.safetensors")) + [path / "config.json"]
    files = [f for f in files if f.is_file()]
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def parent_info(name_or_path: str) -> dict | None:
    p = Path(name_or_path).expanduser()
    if name_or_path == "tiny":
        return None
    if not p.exists():
        return {"hub": name_or_path}
    m = read_manifest(p) or {}
    return {"path": str(p.resolve()), "content_hash": content_hash(p), "stage": m.get("stage")}


def write_manifest(path: Path, **fields) -> dict:
    manifest = {"format": 1, "toolkit": "rlhf-cli", "version": __version__, **fields}
    (Path(path) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


# --- trainer state: optimizer tensors in safetensors, the rest in JSON -------------------------------
def save_optimizer(optimizer, path: Path) -> None:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def load_tensors(path: Path) -> dict:
    """A safetensors file's tensors; a truncated or corrupt file is one sentence naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        if is_corrupt_safetensors(e):
            raise UserError(f"{path} is truncated or corrupt ({str(e).strip()}); it cannot be read") from None
        raise


def load_optimizer(optimizer, path: Path) -> None:
    tensors = load_tensors(path / "optimizer.safetensors")
    meta = json.loads((path / "optimizer.json").read_text())
    state: dict = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --- a nested state (DeepSpeed ZeRO's per-process optimizer state) as safetensors + a JSON skeleton --
_PLAIN = (bool, int, float, str, type(None))


def _encode(x, tensors: dict):
    """The JSON skeleton of `x`: tensors go to `tensors` by name; an object keeps its plain attributes;
    anything else is marked to be taken, on load, from the live state (it depends on the config only)."""
    if hasattr(x, "shape") and hasattr(x, "detach"):
        name = f"t{len(tensors)}"
        tensors[name] = x.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        return {"tensor": name}
    if type(x) in _PLAIN:
        return x
    if isinstance(x, enum.Enum):
        return {"live": True}
    if isinstance(x, dict):
        return {"dict": [[k, _encode(v, tensors)] for k, v in x.items() if isinstance(k, (str, int))]}
    if isinstance(x, (list, tuple)):
        return {"tuple" if isinstance(x, tuple) else "list": [_encode(v, tensors) for v in x]}
    if hasattr(x, "__dict__"):  # e.g. a loss scaler: its scale and counters
        return {"attrs": {k: v for k, v in vars(x).items() if type(v) in _PLAIN}}
    return {"live": True}


def _decode(skel, live, tensors: dict):
    if not isinstance(skel, dict):
        return skel
    if "tensor" in skel:
        return tensors[skel["tensor"]]
    if "dict" in skel:
        base = live if isinstance(live, dict) else {}
        out = type(base)() if isinstance(base, dict) else {}
        out.update(base)  # entries the file does not hold (non-plain keys) stay as they are
        for k, v in skel["dict"]:
            out[k] = _decode(v, base.get(k), tensors)
        return out
    if "list" in skel or "tuple" in skel:
        items = skel.get("list", skel.get("tuple"))
        base = live if isinstance(live, (list, tuple)) and len(live) == len(items) else [None] * len(items)
        seq = [_decode(v, b, tensors) for v, b in zip(items, base)]
        return tuple(seq) if "tuple" in skel else seq
    if "attrs" in skel:
        for k, v in skel["attrs"].items():
            if live is not None:
                setattr(live, k, v)
        return live
    return live


def save_nested(state, path: Path, meta: dict) -> None:
    """`path`.safetensors (the tensors) and `path`.json (the rest, and `meta`); nothing is pickled."""
    from safetensors.torch import save_file

    tensors: dict = {}
    skeleton = _encode(state, tensors)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "skeleton": skeleton}))


def read_nested_meta(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())["meta"]


def load_nested(path: Path, live):
    """What `save_nested` wrote, rebuilt over `live` (the same structure from a fresh object)."""
    skeleton = json.loads(path.with_suffix(".json").read_text())["skeleton"]
    return _decode(skeleton, live, load_tensors(path.with_suffix(".safetensors")))


def rng_state() -> dict:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_trainer_state(path: Path, optimizer, scheduler, progress: dict) -> None:
    """optimizer None: not saved (DeepSpeed ZeRO keeps it sharded); a resume then restarts its moments."""
    path.mkdir(parents=True, exist_ok=True)
    if optimizer is not None:
        save_optimizer(optimizer, path)
    state = {"progress": progress, "scheduler": scheduler.state_dict(), "rng": rng_state()}
    (path / "state.json").write_text(json.dumps(state, default=str))


def load_trainer_state(path: Path, optimizer, scheduler) -> dict:
    state = json.loads((path / "state.json").read_text())
    if optimizer is not None and (path / "optimizer.safetensors").is_file():
        load_optimizer(optimizer, path)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["progress"]


def read_progress(path: Path) -> dict | None:
    try:
        return json.loads((path / STATE_DIR / "state.json").read_text())["progress"]
    except (OSError, ValueError, KeyError):
        return None


# --- run directories ----------------------------------------------------------------------------------
def run_id(partial: Path) -> str | None:
    try:
        return json.loads((partial / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_run_file(partial: Path) -> str:
    """The id of the run in `partial`: kept when it resumes, new otherwise."""
    rid = run_id(partial) or uuid.uuid4().hex
    (partial / RUN_FILE).write_text(json.dumps({"run_id": rid}))
    return rid


def leftover_partial(out: Path) -> bool:
    """Whether `out`'s .partial belongs to the run that completed `out` (it was killed after its final
    rename, before the .partial was gone): then `out` is the result and the .partial is garbage."""
    rid = run_id(partial_dir(out))
    return rid is not None and is_complete(out) and (read_manifest(out) or {}).get("run_id") == rid


def in_progress(out: Path) -> bool:
    """An unfinished run's .partial exists (not the leftover of a finished one)."""
    return partial_dir(out).exists() and not leftover_partial(out)


def finish_cleanup(out: Path) -> None:
    """Remove the leftover .partial of a finished run (main process only)."""
    if os.environ.get("RANK", "0") == "0" and leftover_partial(out):
        retire(partial_dir(out))


@contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on `out` for a whole run; a second run into it is refused in one sentence.

    flock: the kernel drops it when the holder dies, so a lock file left by a killed run is not held
    (stale). The file names the holder (pid, host) for the message. Worker processes of a run launched
    by the holder (LOCK_HELD), and the non-main ranks of any launcher, run under the main one's lock.
    """
    out = Path(out).resolve()
    if os.environ.get(LOCK_HELD) == str(out) or os.environ.get("RANK", "0") != "0":
        yield
        return
    made = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    fd = _take_lock(path, out)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now()}).encode())
    os.environ[LOCK_HELD] = str(out)
    try:
        yield
    finally:
        os.environ.pop(LOCK_HELD, None)
        try:
            os.unlink(path)
            if made:
                out.parent.rmdir()  # a refused run leaves no empty folder behind
        except OSError:
            pass
        os.close(fd)


def _take_lock(path: Path, out: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{out} is being written by another run ({_holder(path)}); wait for it to end or "
                            "choose another --output-dir") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and our lock: take the new one


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its lock file is " + str(path)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete intermediate checkpoint of an in-progress run."""
    ckdir = partial_dir(out) / "checkpoints"
    if not ckdir.is_dir():
        return None
    done = sorted(p for p in ckdir.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / STATE_DIR / "state.json").exists())
    return done[-1] if done else None


def prune_checkpoints(out: Path, keep_last: int) -> None:
    ckdir = partial_dir(out) / "checkpoints"
    done = sorted(p for p in ckdir.iterdir() if p.name.startswith(CKPT_PREFIX))
    for p in done[:-keep_last]:
        retire(p)  # a kill midway must not leave a half-deleted checkpoint that looks resumable


def _resume_point(out: Path, only_if_running: bool = False) -> Path | None:
    """The newest resumable checkpoint of an unfinished run, else a complete run's own state, else None."""
    last = latest_checkpoint(out) if (in_progress(out) or not only_if_running) else None
    if last is not None:
        return last
    return out if is_complete(out) and (out / STATE_DIR).exists() else None


def prepare_output(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check the output directory against --resume/--overwrite; return the checkpoint to resume from.

    Refuses to touch an existing run unless told to. --overwrite discards an unfinished run at once,
    but an existing complete checkpoint is only replaced when the new one is complete.
    """
    out = Path(out)
    partial = partial_dir(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    if os.environ.get("RANK", "0") != "0":
        # another process of a multi-process run: the main process checks and cleans; this one only
        # needs to know where to resume from (nothing is created before every process has looked)
        return _resume_point(out, only_if_running=True) if resume else None
    for parent in (out.parent, partial, partial / "checkpoints"):
        clean_stale_temps(parent)
    finish_cleanup(out)
    if overwrite:
        retire(partial)
        if out.exists() and not out.is_dir():
            raise UserError(f"output path {out} exists and is not a directory")
        return None
    if resume:
        return _resume_point(out)
    if partial.exists() and any(partial.iterdir()):
        raise UserError(
            f"an unfinished run exists in {partial}; pass --resume to continue it or --overwrite to start over"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} already exists and is not empty; pass --resume or --overwrite")
    return None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
