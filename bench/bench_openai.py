"""The OpenAI user's path against vLLM's own server, measured by vLLM's own client.

    python bench/bench_openai.py [--rounds N] [--prompts N] [--concurrency 1,8,16]

One run on this machine, same demo LLaVA directory and engine settings on
both sides (max-model-len 2048, max-num-seqs 16, enforce-eager, 1 GiB KV
cache, float32, engine statistics on: each server's default, and the vision
service's queue-depth gauge needs them; ``--vllm-disable-log-stats`` turns
vLLM's off for the comparison with its leanest setting):

- **ours**: the path an OpenAI-compatible user takes, as ``dreamsight up``
  starts it: HTTP ``/v1`` on the gateway (its own process, a key on a tier
  that admits the whole load), then the vision service (its own process, with
  the backend secret), then vLLM; the vision service moves itself and vLLM's
  engine core off vLLM's CPU worker's cores once loaded (the engine core
  beside the worker while the engine is busy, where one core is left) and
  runs its own threads under ``SCHED_BATCH``, and the gateway goes beside it
  under the same policy, as under ``dreamsight up``
  (vision_service/placement.py);
- **vllm**: vLLM's own OpenAI server (``python -m
  vllm.entrypoints.openai.api_server``), where vLLM places it
  (``--vllm-placed``: moved as ours is).

Both are driven by ``vllm bench serve --backend openai-chat`` from the
project's virtualenv (random dataset, 32 prompt tokens and up to 32 out,
temperature 0, both stopping at end-of-sequence), alternating ours and vLLM's
at each concurrency, ``--rounds`` times. The token totals of the two sides
must match (same model, greedy): the run fails if they do not. Reports
output tokens/s (median over rounds), TTFT p50, how full each engine's
steps ran (tokens per step, from each server's histogram of it), each
process's CPU and time waiting for a core (runnable, not running: the
threads' run delay in ``/proc``) per output token, and the ratio round by
round (median, range, rounds won: how far the shared machine's slow spells
move it); the last line is::

    bench openai: tok_s_ratio_c1=A tok_s_ratio_c8=B tok_s_ratio_c16=C ttft_p50_added_ms_c1=D

(ratios: ours / vLLM's server; D: ours minus vLLM's TTFT p50 at 1).

``--compare-grpc-core`` adds a third side, ``ours-ee``: our path again (its own
gateway and vision service) with gRPC's core as it ships (``GRPC_EXPERIMENTS``
empty, the EventEngine on; see ``dreamsight_server.grpc_core``), alternating
with the two others, and prints its ratios on the line before the last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamsight._up import place_beside
from stack import GatewayProcess, free_port, histogram, wait_grpc_serving

from dreamsight_server import grpc_core
from vision_service.placement import keep_off_workers

ENGINE = ["--max-model-len", "2048", "--max-num-seqs", "16", "--enforce-eager"]
ENGINE += ["--dtype", "float32"]
MODEL_NAME = "llava-demo"


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def _vllm_bench(
    base_url: str, model_dir: Path, concurrency: int, prompts: int, out: Path, key: str
) -> dict[str, Any]:
    """One ``vllm bench serve`` run; its saved JSON result."""
    vllm = Path(sys.executable).with_name("vllm")
    command = [
        str(vllm), "bench", "serve", "--backend", "openai-chat", "--base-url", base_url,
        "--endpoint", "/v1/chat/completions", "--model", MODEL_NAME,
        "--tokenizer", str(model_dir), "--dataset-name", "random",
        "--random-input-len", "32", "--random-output-len", "32",
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
        "--temperature", "0", "--seed", "0", "--disable-tqdm",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": key}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(
            f"vllm bench serve failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(out.read_text())
    if result.get("completed") != prompts:
        raise RuntimeError(f"{base_url}: {result.get('completed')} of {prompts} completed")
    return result


_MEASURES = ("CPU", "waiting for a core")
"""What ``_cpu_parts`` adds up: time running, and time runnable but not running."""


def _run_delay(pid: int, tid: int) -> float:
    """Seconds a thread has been runnable but not running (the second field of its
    schedstat; Linux), 0 where the kernel does not say."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _cpu_parts(proc: subprocess.Popen[bytes]) -> dict[tuple[str, str], float]:
    """Seconds of CPU (user + system) and of waiting for a core (every thread's
    run delay) of a process and of its children, by (measure, part): the process
    itself, vLLM's engine core and its workers (children of the server that started
    them), anything else."""
    import psutil  # type: ignore[import-untyped]

    parts: dict[tuple[str, str], float] = {}
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                times = p.cpu_times()
                threads = p.threads()
                title = f"{p.name()} {' '.join(p.cmdline()[:1])}"
            except psutil.Error:
                continue
            part = (
                "front end" if p.pid == root.pid
                else "engine core" if "EngineCore" in title
                else "worker" if "Worker" in title
                else "other"
            )  # fmt: skip
            spent = (times.user + times.system, sum(_run_delay(p.pid, t.id) for t in threads))
            for measure, seconds in zip(_MEASURES, spent, strict=True):
                parts[(measure, part)] = parts.get((measure, part), 0.0) + seconds
    except psutil.Error:
        pass
    return parts


def _step_tokens(port: int, name: str) -> tuple[float, float] | None:
    """(tokens, engine steps) so far, from a server's tokens-per-step histogram;
    None where the server does not export it (vLLM's, with its statistics off)."""
    try:
        total, steps = histogram(port, name)
    except OSError:
        return None
    return (total, steps) if steps else None


def _means(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> tuple[float, float]:
    """Mean milliseconds of each histogram over the interval."""
    gw, vision = (
        1e3 * (a[0] - b[0]) / max(1.0, a[1] - b[1]) for a, b in zip(after, before, strict=True)
    )
    return gw, vision


@dataclass
class OurPath:
    """One of our stacks: a gateway process in front of a vision service."""

    gateway: GatewayProcess
    """Its env is the extra environment of both processes."""
    vision_metrics: int


def _stage_totals(path: OurPath) -> list[tuple[float, float]]:
    """(sum, count) of the gateway's time to first chunk and the vision service's TTFT."""
    return [
        path.gateway.metric_mean("dreamsight_gateway_time_to_first_chunk_seconds"),
        histogram(path.vision_metrics, "dreamsight_vision_time_to_first_token_seconds"),
    ]


def _ratios(
    summary: dict[tuple[str, int], tuple[float, float]], name: str, levels: list[int]
) -> str:
    """tok/s ratios against vLLM's server at each level, and the TTFT p50 added at the first."""
    ratio = {c: summary[(name, c)][0] / summary[("vllm", c)][0] for c in levels}
    added = summary[(name, levels[0])][1] - summary[("vllm", levels[0])][1]
    return (
        " ".join(f"tok_s_ratio_c{c}={ratio[c]:.3f}" for c in levels)
        + f" ttft_p50_added_ms_c{levels[0]}={added:.2f}"
    )


def _paired(
    results: dict[tuple[str, int], list[dict[str, Any]]], name: str, levels: list[int]
) -> str:
    """tok/s ratios round by round (each round runs the two sides one after the other,
    so a slow spell of the shared machine hits both): median, range, rounds at or
    above 1."""
    rows = []
    for c in levels:
        ratios = sorted(
            ours["output_throughput"] / theirs["output_throughput"]
            for ours, theirs in zip(results[(name, c)], results[("vllm", c)], strict=True)
        )
        wins = sum(r >= 1.0 for r in ratios)
        rows.append(
            f"c={c}: {statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f}, "
            f"{wins} of {len(ratios)} rounds >= 1)"
        )
    return "  ".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,16")
    parser.add_argument("--model", type=Path, default=None, help="a LLaVA directory")
    parser.add_argument(
        "--compare-grpc-core",
        action="store_true",
        help="also run our path with gRPC's core as it ships (GRPC_EXPERIMENTS empty: the "
        "EventEngine on), a third side alternating with the two others",
    )
    parser.add_argument(
        "--vllm-disable-log-stats",
        action="store_true",
        help="run vLLM's server with its engine statistics off (ours keeps them on: its "
        "queue-depth gauge needs them), instead of the same engine settings on both sides",
    )
    parser.add_argument(
        "--vllm-placed",
        action="store_true",
        help="also move vLLM's server and its engine core off its CPU worker's cores, "
        "the server under SCHED_BATCH, as the vision service moves itself "
        "(vision_service/placement.py; not the engine core's shift beside the worker "
        "under load), instead of leaving them where and as vLLM leaves them",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from dreamsight_demo import llava as demo_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-openai-"))
    model = args.model or demo_model.build(workdir / MODEL_NAME)
    vllm_port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # Our path as the services run gRPC's core, and (--compare-grpc-core) as it ships.
    variants: dict[str, dict[str, str]] = {"ours": {}} | (
        {"ours-ee": {grpc_core.VARIABLE: ""}} if args.compare_grpc_core else {}
    )
    ours = {
        name: OurPath(GatewayProcess(workdir / name, free_port(), env=extra), free_port())
        for name, extra in variants.items()
    }
    logs = {n: open(workdir / f"{n}.log", "wb") for n in ("vllm", *ours)}  # noqa: SIM115
    # Both engines keep statistics by default (the vision service's gauges read the
    # scheduler's queue depth from them): the same engine settings on both sides.
    vllm_stats = ["--disable-log-stats"] if args.vllm_disable_log_stats else []
    procs = {
        "vllm": subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
             "--model", str(model), "--port", str(vllm_port),
             "--served-model-name", MODEL_NAME, *vllm_stats, *ENGINE],
            stdout=logs["vllm"], stderr=subprocess.STDOUT, env=env,
        ),
    } | {
        name: subprocess.Popen(
            [sys.executable, "-m", "vision_service", "--model", str(model),
             "--served-model-name", MODEL_NAME, "--port", str(path.gateway.vision_port),
             "--metrics-port", str(path.vision_metrics), "--kv-cache-gib", "1", *ENGINE],
            stdout=logs[name], stderr=subprocess.STDOUT,
            env={**env, **path.gateway.env, **path.gateway.backend_env},
        )
        for name, path in ours.items()
    }  # fmt: skip
    for path in ours.values():
        path.gateway.start()
    sides = {name: f"http://127.0.0.1:{path.gateway.http_port}" for name, path in ours.items()}
    sides["vllm"] = f"http://127.0.0.1:{vllm_port}"
    keys: dict[str, str] = {}
    try:
        for name, path in ours.items():
            wait_grpc_serving(path.gateway.vision_port, procs[name])
            keys[name] = path.gateway.serving()
        keys["vllm"] = keys["ours"]  # vLLM's server takes any key
        for name, path in ours.items():  # as dreamsight up places it: beside the vision service
            place_beside(path.gateway.running.pid, procs[name].pid)
        _wait_http(f"{sides['vllm']}/v1/models", procs["vllm"])
        if args.vllm_placed:
            print(f"vLLM's server placed on cores {keep_off_workers(procs['vllm'].pid)}")
        for name, url in sides.items():  # warm-up
            _vllm_bench(url, model, 4, 8, workdir / f"warm-{name}.json", keys[name])
        results: dict[tuple[str, int], list[dict[str, Any]]] = {}
        stages: dict[tuple[str, int], list[tuple[float, float]]] = {}
        cpu: dict[tuple[str, str, int], list[float]] = {}  # (process, measure, c) -> ms/token
        parts: dict[tuple[str, str, str, int], list[float]] = {}  # (.., part, c) -> the same
        steps: dict[tuple[str, int], list[tuple[float, float]]] = {}  # (tokens, steps) per run
        step_metric = {
            name: (path.vision_metrics, "dreamsight_vision_engine_step_tokens")
            for name, path in ours.items()
        } | {"vllm": (vllm_port, "vllm:iteration_tokens_total")}
        trees: dict[str, dict[str, subprocess.Popen[bytes]]] = {
            name: {
                f"{name} gateway": path.gateway.running,
                f"{name} vision (with vLLM)": procs[name],
            }
            for name, path in ours.items()
        } | {"vllm": {"vllm server (with vLLM)": procs["vllm"]}}
        for round_ in range(args.rounds):
            for concurrency in levels:
                order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for name in order:
                    url, mine = sides[name], ours.get(name)
                    out = workdir / f"{name}-c{concurrency}-r{round_}.json"
                    before = None if mine is None else _stage_totals(mine)
                    cpu_before = {n: _cpu_parts(p) for n, p in trees[name].items()}
                    steps_before = _step_tokens(*step_metric[name])
                    result = _vllm_bench(url, model, concurrency, args.prompts, out, keys[name])
                    steps_after = _step_tokens(*step_metric[name])
                    if steps_after is not None:
                        b = steps_before or (0.0, 0.0)
                        steps.setdefault((name, concurrency), []).append(
                            (steps_after[0] - b[0], steps_after[1] - b[1])
                        )
                    results.setdefault((name, concurrency), []).append(result)
                    tokens = max(1, result["total_output_tokens"])
                    for n, p in trees[name].items():
                        now = _cpu_parts(p)
                        spent = {k: v - cpu_before[n].get(k, 0.0) for k, v in now.items()}
                        for measure in _MEASURES:
                            total = sum(v for (m, _), v in spent.items() if m == measure)
                            cpu.setdefault((n, measure, concurrency), []).append(
                                1e3 * total / tokens
                            )
                        for (measure, part), seconds in spent.items():
                            key4 = (n, measure, part, concurrency)
                            parts.setdefault(key4, []).append(1e3 * seconds / tokens)
                    if mine is not None and before is not None:
                        after = _stage_totals(mine)
                        stages.setdefault((name, concurrency), []).append(_means(before, after))
        print(f"{'side':7} {'conc':>4} {'tok/s':>9} {'ttft_p50_ms':>12} {'tokens':>7}")
        summary: dict[tuple[str, int], tuple[float, float]] = {}
        for (name, concurrency), runs in sorted(results.items()):
            tps = statistics.median(r["output_throughput"] for r in runs)
            ttft = statistics.median(r["median_ttft_ms"] for r in runs)
            tokens = {r["total_output_tokens"] for r in runs}
            summary[(name, concurrency)] = (tps, ttft)
            print(f"{name:7} {concurrency:>4} {tps:>9.1f} {ttft:>12.2f} {sorted(tokens)!s:>7}")
        for name, concurrency in [(n, c) for n in ours for c in levels]:
            totals = {r["total_output_tokens"] for r in results[(name, concurrency)]}
            theirs = {r["total_output_tokens"] for r in results[("vllm", concurrency)]}
            if totals != theirs:
                raise SystemExit(
                    f"token totals differ at concurrency {concurrency}: {name} {sorted(totals)}, "
                    f"vLLM's server {sorted(theirs)}: the two sides did not do the same work"
                )
        print(
            "\nwhere our TTFT goes (means, ms): client sees | gateway's first chunk | "
            "vision service's first token"
        )
        for name, concurrency in [(n, c) for n in ours for c in levels]:
            client = statistics.mean(r["mean_ttft_ms"] for r in results[(name, concurrency)])
            gw, vision = (
                statistics.mean(s[i] for s in stages[(name, concurrency)]) for i in (0, 1)
            )
            print(f"  {name:7} c={concurrency:<3} {client:8.2f} | {gw:8.2f} | {vision:8.2f}")
        print("\nengine steps per run and tokens per step (prompt and generated), median of runs:")
        for name in sides:
            row = "  ".join(
                f"c={c}: {statistics.median(n for _, n in steps[(name, c)]):5.0f} steps, "
                f"{statistics.median(t / max(1.0, n) for t, n in steps[(name, c)]):5.2f}/step"
                if (name, c) in steps
                else f"c={c}: not exported"
                for c in levels
            )
            print(f"  {name:7} {row}")
        for measure in _MEASURES:
            print(
                f"\n{measure} per output token (ms, process and its children, all their "
                "threads), by concurrency:"
            )
            for process in [n for side in trees.values() for n in side]:
                row = "  ".join(
                    f"c={c}: {statistics.median(cpu[(process, measure, c)]):6.2f}" for c in levels
                )
                print(f"  {process:32} {row}")
                for part in ("front end", "engine core", "worker", "other"):
                    if (process, measure, part, levels[0]) not in parts:
                        continue
                    row = "  ".join(
                        f"c={c}: "
                        f"{statistics.median(parts.get((process, measure, part, c), [0.0])):6.2f}"
                        for c in levels
                    )
                    print(f"    {part:30} {row}")
        print("\ntok/s ratios round by round, ours / vLLM's server:")
        for name in ours:
            print(f"  {name:7} {_paired(results, name, levels)}")
        print(f"(logs and results in {workdir})")
        if "ours-ee" in ours:
            print(f"ours with gRPC's core as it ships: {_ratios(summary, 'ours-ee', levels)}")
        print(f"bench openai: {_ratios(summary, 'ours', levels)}")
    finally:
        for path in ours.values():
            path.gateway.stop()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs.values():
            log.close()


if __name__ == "__main__":
    main()
