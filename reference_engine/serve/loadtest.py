"""The load generator: many streamed requests against a server, and what users would feel.

Arrivals are either open-loop (Poisson at `rate` requests per second: a request is sent at
its scheduled time whether or not earlier ones have finished, as independent users do) or
closed-loop (`concurrency` clients, each sending its next request when the last one ends).
subtle: a closed loop slows its own arrivals when the server slows down, so it never
shows the queue building up; an open loop does. Latencies are measured from each request's
*scheduled* send time, so a client that was late to send does not hide the wait
(coordinated omission).

Per request: TTFT (scheduled send to the first text), TPOT ((latency - TTFT) / (tokens - 1),
undefined for a one-token reply), the gaps between chunks (inter-token latency) and the
end-to-end latency. Goodput counts the requests per second that met both latency targets.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import DojoError


@dataclass
class Outcome:
    """One request as the client saw it (times in seconds from its scheduled send)."""

    status: int = 0  # HTTP status (0: no response)
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    latency: float | None = None
    gaps: list[float] = field(default_factory=list)  # between consecutive text chunks (a chunk is usually a token)
    disconnected: bool = False  # the client hung up on purpose

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and not self.disconnected

    @property
    def tpot(self) -> float | None:
        """(latency - TTFT) / (tokens - 1): the mean time per token after the first."""
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def output_lengths(spec: str, n: int, rng: random.Random) -> list[int]:
    """max_tokens of n requests. "16-128": uniform in [16, 128]. "exp:64": exponential with
    mean 64, clipped to [4, 256] (4x the mean): many short replies and a few long ones, the
    long tail that chat traffic has. Example: output_lengths("8-8", 2, rng) -> [8, 8]."""
    try:
        if spec.startswith("exp:"):
            mean = float(spec[4:])
            if mean >= 4:
                return [min(int(4 * mean), max(4, round(rng.expovariate(1 / mean)))) for _ in range(n)]
        else:
            lo, hi = (int(v) for v in spec.split("-"))
            if 1 <= lo <= hi:
                return [rng.randint(lo, hi) for _ in range(n)]
    except ValueError:
        pass
    raise DojoError(f"max_tokens spec {spec!r}: write LO-HI (uniform, for example 16-128) or exp:MEAN "
                    "(exponential, mean >= 4, for example exp:64)")


def workload(n: int, seed: int = 0, max_tokens: str = "exp:64", prompt_words: tuple[int, int] = (8, 64)) -> list[dict]:
    """n completion requests: prompts cut from the pydoc topics text (every Python has it),
    of prompt_words words, and max_tokens as `output_lengths` draws them; the same seed,
    the same load."""
    from ..perplexity import pydoc_topics

    words = pydoc_topics().split()
    rng = random.Random(seed)
    lengths = output_lengths(max_tokens, n, rng)
    out = []
    for i in range(n):
        k = rng.randint(*prompt_words)
        start = rng.randrange(len(words) - k)
        out.append({"prompt": " ".join(words[start : start + k]), "max_tokens": lengths[i]})
    return out


async def send(client, url: str, body: dict, scheduled: float, hang_up_after: int | None) -> Outcome:
    """One streamed completion; hang_up_after=k closes the connection after k text chunks."""
    out = Outcome()
    last = None
    try:
        async with client.stream("POST", url, json=body) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = (await r.aread()).decode(errors="replace")[:300]
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out.latency = time.perf_counter() - scheduled
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    out.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if out.ttft is None:
                        out.ttft = now - scheduled
                    else:
                        out.gaps.append(now - last)
                    last = now
                    if hang_up_after is not None and len(out.gaps) + 1 >= hang_up_after:
                        out.disconnected = True
                        return out  # leaving the block closes the connection
        if out.latency is None:
            out.error = "the stream ended without data: [DONE]"
    except Exception as e:  # noqa: BLE001 - any transport failure is this request's outcome
        out.error = f"{type(e).__name__}: {e}"
    return out


async def run_load(base_url: str, model: str, bodies: list[dict], rate: float | None = None,
                   concurrency: int | None = None, hang_up: set[int] = frozenset(), seed: int = 0,
                   progress: bool = False) -> tuple[list[Outcome], float]:
    """Send every body (open loop at `rate`, or closed loop with `concurrency` clients).
    hang_up: indices of the requests that disconnect after 2 chunks. Returns the outcomes
    in body order and the wall time."""
    import httpx
    from tqdm import tqdm

    if (rate is None) == (concurrency is None):
        raise DojoError("give either --rate (requests per second, Poisson arrivals) or --concurrency (clients)")
    if (rate is not None and not rate > 0) or (concurrency is not None and concurrency < 1):
        raise DojoError(f"--rate must be > 0 and --concurrency >= 1, got {rate} and {concurrency}")
    url = base_url.rstrip("/") + "/v1/completions"
    payloads = [{"model": model, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                 **b} for b in bodies]
    outcomes: list[Outcome | None] = [None] * len(bodies)
    bar = tqdm(total=len(bodies), desc="requests", unit="req", disable=not progress, leave=False)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def one(i: int, scheduled: float) -> None:
            outcomes[i] = await send(client, url, payloads[i], scheduled, 2 if i in hang_up else None)
            bar.update()

        if rate is not None:
            rng, at, tasks = random.Random(seed), t0, []
            for i in range(len(bodies)):
                at += rng.expovariate(rate)  # Poisson process: exponential gaps
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                tasks.append(asyncio.create_task(one(i, at)))
            await asyncio.gather(*tasks)
        else:
            queue = iter(range(len(bodies)))

            async def client_loop() -> None:
                for i in queue:
                    await one(i, time.perf_counter())

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    bar.close()
    return outcomes, wall


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(np.mean(values))}


def summarize(outcomes: list[Outcome], wall: float, slo_ttft: float = 1.0, slo_tpot: float = 0.2) -> dict:
    """Throughput, latency percentiles and goodput of a run."""
    ok = [o for o in outcomes if o.ok]
    tokens = sum(o.output_tokens for o in outcomes)  # tokens of hung-up requests are not counted: usage never came
    # a reply with no text at all (an immediate stop) is judged by its latency as its TTFT
    good = [o for o in ok if (o.ttft if o.ttft is not None else o.latency) <= slo_ttft
            and (o.tpot is None or o.tpot <= slo_tpot)]
    return {
        "requests": len(outcomes), "completed": len(ok),
        "disconnected": sum(o.disconnected for o in outcomes),
        "failed": sum(1 for o in outcomes if not o.ok and not o.disconnected),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "wall_s": wall, "output_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft": percentiles([o.ttft for o in ok if o.ttft is not None]),
        "tpot": percentiles([o.tpot for o in ok if o.tpot is not None]),
        "itl": percentiles([g for o in ok for g in o.gaps]),
        "latency": percentiles([o.latency for o in ok if o.latency is not None]),
        "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot},
        "goodput_rps": len(good) / wall if wall > 0 else 0.0,
    }


def format_summary(s: dict) -> str:
    def ms(p: dict) -> str:
        if p["p50"] is None:
            return "n/a"
        return " / ".join(f"{p[k] * 1e3:.0f}" for k in ("p50", "p90", "p99")) + " ms"

    lines = [f"{s['completed']}/{s['requests']} completed, {s['disconnected']} hung up on purpose, "
             f"{s['failed']} failed, in {s['wall_s']:.1f} s",
             f"throughput   {s['tokens_per_s']:.1f} tokens/s, {s['requests_per_s']:.2f} requests/s",
             f"TTFT         {ms(s['ttft'])}   (p50 / p90 / p99)",
             f"TPOT         {ms(s['tpot'])}",
             f"inter-token  {ms(s['itl'])}",
             f"latency      {ms(s['latency'])}",
             f"goodput      {s['goodput_rps']:.2f} requests/s within TTFT <= {s['slo']['ttft_s']:g} s and "
             f"TPOT <= {s['slo']['tpot_s']:g} s"]
    lines += [f"error        {e}" for e in s["errors"]]
    return "\n".join(lines)


def plot_sweep(points: list[tuple[float, dict]], path: str) -> None:
    """Throughput against latency over several loads: where adding load stops adding tokens/s
    and only adds waiting. points: (offered load, summary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    loads = [p for p, _ in points]
    a.plot(loads, [s["tokens_per_s"] for _, s in points], "o-")
    a.set(xlabel="offered load", ylabel="tokens/s", title="throughput")
    for key, label in (("ttft", "TTFT p99"), ("tpot", "TPOT p99"), ("latency", "latency p50")):
        q = "p50" if key == "latency" else "p99"
        b.plot(loads, [s[key][q] if s[key][q] is not None else math.nan for _, s in points], "o-", label=label)
    b.set(xlabel="offered load", ylabel="seconds", yscale="log", title="latency")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
