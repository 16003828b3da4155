"""Reward on an inference server: `rlhf serve-rm` (MLServer, Open Inference Protocol) against the same reward
checkpoint in the PPO process, on bench.py's tiny and medium workloads. Writes a section of RESULTS.md.

    python benchmarks/reward_server.py [--sizes tiny,medium] [--repeats 3] [--seconds 10] [--out-json raw.json]

1. PPO: the workload's `rlhf ppo` run exactly as ours.py configures it (`stage_config(spec, "ppo")`), its reward
   the workload's reward model (`rm`, a GPT-2 sequence classifier) either in-process (`reward.ckpt: rm`) or
   served (`reward.url` + `reward.protocol: v2`, `rlhf serve-rm --ckpt rm` in its own process); delta off in
   both. In-process and served runs alternate (A/B, then B/A, ...), each PPO run its own process. Reported:
   seconds per PPO iteration (the stage's rlhf_stage.json `train_loop` seconds / iterations: the whole loop,
   sampling, scoring and updates) and the scoring seconds per iteration (metrics.jsonl `time/score`: the wall
   time of the reward calls in the rollout phase); medians over the repeats, the min–max of the per-repeat
   ratios. Both runs sample the same first rollouts (same seed), so their first-iteration raw scores must agree.
2. Throughput of the server alone: closed-loop clients (1 or 4 threads, an httpx.Client each, each sending its
   next request when the previous one is answered) post requests of N = 1, 16, 64 pairs for `--seconds`, after
   a 1 s warm-up; requests/s, samples/s, p50 and p99 latency. The pairs: the workload's PPO prompts
   (data_prompts/train.jsonl) with their reference summaries cut to the first 24 tokens (the rm's tokenizer).

Threads: the PPO process and the server run with OMP_NUM_THREADS=1 (bench.py's ENV), one torch thread each.
One server per size, started before that size's runs and up for all of them (its start-up is reported, not
timed in the loop; in-process runs see it idle), `--max-length` = the workload's max_length (as the stage's
data.max_length, which the in-process reward uses). The load-generating clients run in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
import ours  # noqa: E402
import workload  # noqa: E402

BEGIN, END = bench.SERVER_MARKERS
RLHF = str(Path(sys.executable).with_name("rlhf"))
BATCHES, IN_FLIGHT, COMPLETION_TOKENS = (1, 16, 64), (1, 4), 24


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if (port := s.getsockname()[1]) < 65000:  # gRPC takes port + 1
                return port


def start_server(rm: str, max_length: int, log) -> tuple[subprocess.Popen, str, float]:
    port, t0 = free_port(), time.perf_counter()
    proc = subprocess.Popen([RLHF, "serve-rm", "--ckpt", rm, "--port", str(port), "--host", "127.0.0.1",
                             "--max-length", str(max_length)], env=bench.ENV, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - t0 < 180:
        if proc.poll() is not None:
            raise SystemExit(f"rlhf serve-rm exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"rlhf serve-rm was not ready after 180 s; see {log.name}")


def ppo_run(spec: dict, reward: dict, log) -> dict:
    """One `rlhf ppo` process with `reward`; its seconds per iteration and scoring seconds per iteration."""
    cfg = ours.stage_config(spec, "ppo", seed=0)
    cfg["reward"] = {**reward, "delta": False}
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "ppo.yaml", Path(tmp) / "run"
        path.write_text(yaml.safe_dump(cfg))
        cmd = [RLHF, "ppo", "--config", str(path), "--output-dir", str(out)]
        log.write(f"\n$ {' '.join(cmd)}  # reward {reward}\n")
        log.flush()
        if subprocess.call(cmd, env=bench.ENV, stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent):
            raise SystemExit(f"rlhf ppo failed (reward {reward}); see {log.name}")
        loop = json.loads((out / "rlhf_stage.json").read_text())["train_loop"]
        rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "time/score" in r]
    return {"iterations": len(rows), "loop_seconds": loop["seconds"], "episodes": loop["episodes"],
            "s_per_iter": loop["seconds"] / len(rows), "score_s_per_iter": sum(r["time/score"] for r in rows) / len(rows),
            "first_score_raw": rows[0]["rollout/score_raw"]}


def request_bodies(spec: dict, batch: int, n: int = 8) -> list[bytes]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["rm_dir"])
    rows = [json.loads(x) for x in (Path(spec["data_prompts"]) / "train.jsonl").read_text().splitlines()[:512]]
    pairs = [(r["prompt"], tok.decode(tok(r["label"], add_special_tokens=False)["input_ids"][:COMPLETION_TOKENS]))
             for r in rows]
    bodies = []
    for i in range(n):  # n distinct requests, cycled (encoded once: the clients spend no time on JSON)
        chunk = [pairs[(i * batch + k) % len(pairs)] for k in range(batch)]
        bodies.append(json.dumps({"inputs": [
            {"name": "prompt", "shape": [batch], "datatype": "BYTES", "data": [p for p, _ in chunk]},
            {"name": "completion", "shape": [batch], "datatype": "BYTES", "data": [c for _, c in chunk]}]}).encode())
    return bodies


def throughput(url: str, bodies: list[bytes], batch: int, in_flight: int, seconds: float) -> dict:
    infer, latencies = f"{url}/v2/models/reward/infer", []

    def client(w: int, until: float, record: bool) -> None:
        with httpx.Client(timeout=120, headers={"content-type": "application/json"}) as c:
            i = w
            while time.perf_counter() < until:
                t = time.perf_counter()
                r = c.post(infer, content=bodies[i % len(bodies)])
                r.raise_for_status()
                if len(r.json()["outputs"][0]["data"]) != batch:
                    raise SystemExit(f"the server answered {r.text[:200]} to a request of {batch} pairs")
                if record:
                    latencies.append(time.perf_counter() - t)
                i += in_flight

    for record, secs in ((False, 1.0), (True, seconds)):  # warm-up, then the measurement
        t0 = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as ex:
            list(ex.map(lambda w: client(w, t0 + secs, record), range(in_flight)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    q = lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
    return {"batch": batch, "in_flight": in_flight, "requests": len(lat), "seconds": wall,
            "requests_per_s": len(lat) / wall, "samples_per_s": len(lat) * batch / wall, "p50_ms": q(0.5), "p99_ms": q(0.99)}


def spread(a: list[float], b: list[float]) -> str:
    """median(b) / median(a), with the min–max of the per-repeat ratios."""
    r = [y / x for x, y in zip(a, b)]
    return f"**{statistics.median(b) / statistics.median(a):.2f}x** ({min(r):.2f}–{max(r):.2f})"


def render(results: dict, args, minutes: float) -> str:
    lines = [BEGIN, "## Reward on an inference server: `rlhf serve-rm` against the reward in-process", "",
             f"Regenerated by `python benchmarks/reward_server.py`; do not edit by hand. Machine: {bench.machine()}, "
             f"no GPU. torch {version('torch')}, MLServer {version('mlserver')}, httpx {version('httpx')}. "
             f"{args.repeats} repeat(s), whole run {minutes:.1f} min.", "",
             "**PPO iteration time.** The workload's `rlhf ppo` run (the PPO cell above: same policy, prompts, "
             "rollouts, epochs, seed; delta off) with the workload's reward model in the PPO process (`reward.ckpt`) "
             "or served by `rlhf serve-rm --ckpt rm` in a second process (`reward.url`, `reward.protocol: v2`, "
             "one request per generation chunk of `chunk_size` completions); in-process and served runs alternate, each its "
             "own process. One torch thread each: the PPO process and the server both run with OMP_NUM_THREADS=1. "
             "s / iteration = the stage's `train_loop` seconds / iterations; score s / iteration = metrics.jsonl "
             "`time/score` (the reward calls' wall time); medians, ratio = served / in-process (min–max of the "
             "per-repeat ratios). Same scores: the first iteration's raw mean score equal to 1e-4 in every pair "
             "(both runs sample the same first rollouts).", "",
             "| size | in-process s / iteration | served s / iteration | served / in-process | in-process score "
             "s / iteration | served score s / iteration | served / in-process | same scores | server start-up |",
             "|---|---:|---:|---|---:|---:|---|---|---:|"]
    for size, res in results.items():
        a, b = ([p[k] for p in res["ppo"]] for k in ("inproc", "served"))
        same = all(abs(x["first_score_raw"] - y["first_score_raw"]) <= 1e-4 for x, y in zip(a, b))
        col = lambda runs, k: [r[k] for r in runs]  # noqa: E731
        lines.append(f"| {size} | {statistics.median(col(a, 's_per_iter')):.3f} | {statistics.median(col(b, 's_per_iter')):.3f} | "
                     f"{spread(col(a, 's_per_iter'), col(b, 's_per_iter'))} | {statistics.median(col(a, 'score_s_per_iter')):.4f} | "
                     f"{statistics.median(col(b, 'score_s_per_iter')):.4f} | {spread(col(a, 'score_s_per_iter'), col(b, 'score_s_per_iter'))} | "
                     f"{'yes' if same else 'NO'} | {res['startup_s']:.1f} s |")
    lines += ["", f"**Scoring throughput of the server.** Closed-loop clients in the benchmark's process (1 or 4 "
              f"threads, each with its own httpx.Client, sending its next request when the last is answered) post "
              f"requests of N (prompt, completion) pairs for {args.seconds:g} s after a 1 s warm-up; the pairs are "
              f"the workload's PPO prompts with their reference summaries cut to the first {COMPLETION_TOKENS} "
              "tokens. The server's defaults: adaptive batching up to 64 requests, 5 ms wait. On this "
              f"{os.cpu_count()}-core machine the clients compete with the server for the CPU.", "",
              "| size | pairs / request | in flight | requests/s | samples/s | p50 ms | p99 ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for size, res in results.items():
        for t in res["throughput"]:
            lines.append(f"| {size} | {t['batch']} | {t['in_flight']} | {t['requests_per_s']:.1f} | "
                         f"{t['samples_per_s']:.1f} | {t['p50_ms']:.1f} | {t['p99_ms']:.1f} |")
    lines += ["", "```", f"python benchmarks/reward_server.py --sizes {args.sizes} --repeats {args.repeats} "
              f"--seconds {args.seconds:g}", "```", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=str(HERE.parent / ".bench"))
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per (batch, in-flight) cell")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--out-json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    t_start, work = time.perf_counter(), Path(args.workdir)
    (work / "results").mkdir(parents=True, exist_ok=True)
    results = {}
    with open(work / "results" / "reward_server.log", "w") as log:
        for size in args.sizes.split(","):
            spec = workload.build(work / "work", size)
            server, url, startup = start_server(spec["rm_dir"], spec["max_length"], log)
            print(f"{size}: serve-rm ready in {startup:.1f} s", flush=True)
            try:
                pairs = []
                for r in range(args.repeats):
                    kinds = {"inproc": {"ckpt": spec["rm_dir"]}, "served": {"url": url, "protocol": "v2"}}
                    order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
                    pair = {k: ppo_run(spec, kinds[k], log) for k in order}
                    pairs.append(pair)
                    print(f"{size} ppo repeat {r + 1}: s/iteration in-process {pair['inproc']['s_per_iter']:.3f} served "
                          f"{pair['served']['s_per_iter']:.3f}; time/score {pair['inproc']['score_s_per_iter']:.4f} "
                          f"vs {pair['served']['score_s_per_iter']:.4f}", flush=True)
                tput = []
                for batch in BATCHES:
                    bodies = request_bodies(spec, batch)
                    for k in IN_FLIGHT:
                        tput.append(t := throughput(url, bodies, batch, k, args.seconds))
                        print(f"{size} N={batch:2d} in flight {k}: {t['requests_per_s']:.1f} req/s "
                              f"{t['samples_per_s']:.1f} samples/s p50 {t['p50_ms']:.1f} ms p99 {t['p99_ms']:.1f} ms", flush=True)
            finally:
                server.terminate()
                try:
                    server.wait(15)
                except subprocess.TimeoutExpired:
                    server.kill()
            results[size] = {"startup_s": startup, "ppo": pairs, "throughput": tput}
    section = render(results, args, (time.perf_counter() - t_start) / 60)
    bench.write_section(Path(args.results), section, BEGIN, END)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(results, indent=1))
    print(section)


if __name__ == "__main__":
    main()
