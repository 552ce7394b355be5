"""Serving, measured: the same load against the three batching policies, one run.

Each policy gets its own server process (`serve --batching ...`, started and stopped here)
and the same requests (the same prompts and max_tokens, greedy, so every policy writes the
same tokens); the load generator runs in this process. Only the ratios between policies
measured side by side mean anything on a shared machine.

`bench-serve --step` times one decoding step of the serving forward in this process
instead (`time_decode_step`), down each of its three paths in alternating rounds: the pool
gathered, the pool read in place by the compiled paged attention, and the blocks fused as
well (`PagedRunner.decode_path`).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from .. import cpu_kernels
from ..errors import DojoError
from ..parallel.launch import free_port  # noqa: F401 (also what the tests pick ports with)
from .loadtest import run_load, summarize, workload
from .runner import PagedRunner
from .scheduler import POLICIES


class ServerProcess:
    """`python -m reference_engine serve ...` on 127.0.0.1, ready when /health answers.
    Example: with ServerProcess(["--batching", "static"]) as server: server.url."""

    def __init__(self, extra_args: list[str] = (), port: int | None = None, startup_timeout: float = 120.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "reference_engine", "serve", "--host", "127.0.0.1",
                     "--port", str(self.port), *extra_args]
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        import httpx

        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server must never block on it
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DojoError(f"the server exited at start: {self.output()[-500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise DojoError(f"the server did not answer /health within {self.startup_timeout:.0f} s")

    def output(self) -> str:
        """What the server printed so far."""
        self.log.seek(0)
        return self.log.read().strip()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise DojoError(f"the server did not stop within {timeout:.0f} s of SIGTERM") from None

    def __exit__(self, *exc) -> None:
        self.stop()


def compare_batching(policies: list[str], concurrency: int = 8, n_requests: int = 64, seed: int = 0,
                     max_tokens: str = "exp:64", server_args: list[str] = (), progress: bool = True) -> dict[str, dict]:
    """For each policy: a fresh server, the same closed-loop load. Returns policy -> summary."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise DojoError(f"unknown batching policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    bodies = workload(n_requests, seed, max_tokens)
    results = {}
    for policy in policies:
        with ServerProcess(["--batching", policy, "--max-batch", str(concurrency), *server_args]) as server:
            outcomes, wall = asyncio.run(run_load(server.url, "smollm2-135m-instruct", bodies,
                                                  concurrency=concurrency, progress=progress))
        results[policy] = summarize(outcomes, wall)
        if progress:
            s = results[policy]
            print(f"{policy:>11}: {s['tokens_per_s']:.1f} tokens/s, {s['completed']}/{s['requests']} completed",
                  file=sys.stderr)
    return results


def format_comparison(results: dict[str, dict]) -> str:
    def ms(p: dict, q: str) -> str:
        return f"{p[q] * 1e3:7.0f}ms" if p[q] is not None else "      n/a"

    base = results.get("continuous")
    head = f"{'batching':>11}  {'tokens/s':>9}  {'vs it':>6}  {'TTFT p50':>9}  {'TTFT p99':>9}  {'TPOT p50':>9}  done"
    lines = [head]
    for policy, s in results.items():
        ratio = base["tokens_per_s"] / s["tokens_per_s"] if base and s["tokens_per_s"] else float("nan")
        lines.append(f"{policy:>11}  {s['tokens_per_s']:9.1f}  {ratio:5.2f}x  {ms(s['ttft'], 'p50')}  "
                     f"{ms(s['ttft'], 'p99')}  {ms(s['tpot'], 'p50')}  {s['completed']}/{s['requests']}")
    lines.append("vs it: continuous batching's tokens/s divided by this policy's")
    totals = {s["output_tokens"] for s in results.values()}
    lines.append(f"every policy wrote {totals.pop()} tokens (greedy: the same replies)" if len(totals) == 1 else
                 "warning: the policies wrote different numbers of tokens: " + ", ".join(
                     f"{p} {s['output_tokens']}" for p, s in results.items()))
    return "\n".join(lines)


def time_decode_step(model, batch: int = 16, slots: int = 200, rounds: int = 7, block_size: int = 16) -> dict:
    """One step of `PagedRunner.forward_step` in which `batch` requests decode one token each
    after slots - 1 earlier ones, down each of the runner's decode paths in alternating rounds
    ("gathered", "in_place", "fused": `PagedRunner.decode_path`). The pools hold random keys
    and values (a step's time does not depend on them), so no prompt is run first. Returns
    {path: median seconds, or None where the compiled path does not apply}, and "why" for the
    first path that does not."""
    cpu_kernels.kernels()  # loads them where built (never builds): the compiled paths need them
    if batch < 1 or not 2 <= slots <= model.config.max_seq_len:
        raise DojoError(f"--batch must be >= 1 and --slots 2 to the model's context ({model.config.max_seq_len}); "
                        f"got {batch} and {slots}")
    per_request = -(-slots // block_size)
    runner = PagedRunner(model, batch * per_request, block_size)
    with torch.inference_mode():
        everything = torch.arange(batch * per_request * block_size)
        for pool in runner.pools:
            shape = (len(everything), pool.k.shape[0], pool.k.shape[2])  # (rows, KV, D)
            pool.write(everything, torch.randn(shape), torch.randn(shape))
        paths, why = ["gathered"], None  # the paths this model and pool can take, slowest first
        if cpu_kernels._loaded is None:
            why = f"the compiled kernels are {cpu_kernels.unavailable()}"
        elif not runner.pools[0].compiled() or model.tok_embeddings.weight.dtype != torch.float32:
            why = "the compiled attention reads float32 activations and a float32, float16 or int8 pool"
        elif runner._fused_plan() is None:
            paths.append("in_place")
            why = ("the fused block computes the engine's own float32 Llama blocks, unhooked, with packed or "
                   "repacked weights (fused_decode.applies), and this model's are not")
        else:
            paths += ["in_place", "fused"]
    chunks = [([7], slots - 1, list(range(b * per_request, (b + 1) * per_request)), True) for b in range(batch)]
    times = {path: [] for path in paths}
    for _ in tqdm(range(rounds + 1), desc="serving steps", unit="round", disable=None, leave=False):  # 1st: warm-up
        for path in paths:
            runner.decode_path = path
            t0 = time.perf_counter()
            runner.forward_step(chunks)
            times[path].append(time.perf_counter() - t0)
    result = {path: statistics.median(times[path][1:]) if path in times else None for path in PagedRunner.DECODE_PATHS}
    if why:
        result["why"] = why
    return result


def format_step(result: dict, batch: int, slots: int, weights: str, pool: str) -> str:
    requests = f"{batch} request{'s' * (batch != 1)}"
    gathered = result["gathered"]
    lines = [f"serving decode step, {weights} weights, {pool} pool, {requests} at {slots} slots (median of "
             "alternating rounds):"]
    for path, what in [("gathered", "pool gathered, modules"), ("in_place", "pool read in place, modules"),
                       ("fused", "pool read in place, fused blocks")]:
        t = result[path]
        if t is None:
            lines.append(f"  {what:<34} not available: {result['why']}")
            break
        lines.append(f"  {what:<34} {t * 1e3:8.2f} ms" + (f"  ({gathered / t:.2f}x faster)" if path != "gathered"
                                                          else ""))
    return "\n".join(lines)
