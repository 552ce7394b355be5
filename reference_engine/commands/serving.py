"""Serving: serve (the OpenAI-compatible server), loadtest, bench-serve."""

from __future__ import annotations

import asyncio
import json
import sys

from ..errors import DojoError
from .common import load, stop_ids, with_kv_dtype, with_model, with_quantize

MODEL_NAME = "smollm2-135m-instruct"


def add_commands(sub) -> None:
    from ..serve.scheduler import POLICIES

    s = with_kv_dtype(with_quantize(with_model(sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with continuous batching (/v1/completions, "
                      "/v1/chat/completions)"))))
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, metavar="NAME",
                   help=f"the name clients send as 'model' (default: {MODEL_NAME}, or the --model file's stem)")
    s.add_argument("--batching", choices=list(POLICIES), default="continuous",
                   help="; ".join(f"{k}: {v}" for k, v in POLICIES.items()))
    s.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests running at once, at most")
    s.add_argument("--token-budget", type=int, default=256, metavar="N",
                   help="tokens fed per step, at most (prompts are cut into chunks to fit)")
    s.add_argument("--kv-blocks", type=int, default=512, metavar="N", help="blocks in the KV cache pool")
    s.add_argument("--block-size", type=int, default=16, metavar="N", help="token slots per block")
    s.add_argument("--max-waiting", type=int, default=64, metavar="N",
                   help="requests queued beyond the running batch; more are answered 503 with Retry-After")
    s.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="on SIGTERM, seconds running requests get to finish before they are cancelled")
    lt = sub.add_parser("loadtest", help="streamed requests against a server: throughput, TTFT, TPOT, "
                                         "inter-token and end-to-end latency percentiles, goodput")
    lt.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    lt.add_argument("--model", default=MODEL_NAME, help=f"the model name to send (default {MODEL_NAME})")
    load_kind = lt.add_mutually_exclusive_group(required=True)
    load_kind.add_argument("--rate", type=str, metavar="R", help="Poisson arrivals, requests per second; "
                                                                 "several (1,2,4) sweep the loads")
    load_kind.add_argument("--concurrency", type=int, metavar="C", help="C clients, each waiting for its reply")
    lt.add_argument("--requests", type=int, default=64, metavar="N", help="requests in all (per load)")
    lt.add_argument("--disconnect", type=int, default=0, metavar="K",
                    help="K of the requests hang up after their second chunk")
    lt.add_argument("--max-tokens", default="exp:64", metavar="SPEC",
                    help="each request's max_tokens: LO-HI (uniform) or exp:MEAN (exponential, clipped to "
                         "[4, 4 x MEAN]; default exp:64)")
    lt.add_argument("--slo-ttft", type=float, default=1.0, metavar="S", help="goodput's TTFT target (default 1 s)")
    lt.add_argument("--slo-tpot", type=float, default=0.2, metavar="S", help="goodput's TPOT target (default 0.2 s)")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--plot", metavar="PNG", help="with several --rate values: throughput and latency per load")
    lt.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    bs = sub.add_parser("bench-serve", help="the same load against continuous, static and sequential batching, "
                                            "each in its own server: tokens/s and TTFT side by side")
    bs.add_argument("--concurrency", type=int, default=8, metavar="C")
    bs.add_argument("--requests", type=int, default=64, metavar="N")
    bs.add_argument("--batching", default=",".join(POLICIES), metavar="LIST", help="policies to compare")
    bs.add_argument("--max-tokens", default="exp:64", metavar="SPEC", help="as for loadtest (default exp:64)")
    bs.add_argument("--threads", type=int, help="CPU threads of each server (default: all cores)")
    bs.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    bs.add_argument("--model", metavar="PATH", help="GGUF file, for every server and --step (default: SmolLM2)")
    with_kv_dtype(with_quantize(bs))  # passed on to every server, and used by --step
    bs.add_argument("--step", action="store_true",
                    help="instead of servers: time one decoding step of the serving forward in this process, "
                         "down its three paths side by side (the pool gathered; read in place by the compiled "
                         "attention; and the blocks fused as well)")
    bs.add_argument("--batch", type=int, default=16, metavar="N", help="--step: requests decoding (default 16)")
    bs.add_argument("--slots", type=int, default=200, metavar="N",
                    help="--step: each request's slots, its own token included (default 200)")
    bs.set_defaults(device="cpu", dtype="float32", kernels="auto")


def cmd_serve(args) -> int:
    from ..serve.engine import Engine, EngineLoop
    from ..serve.server import bind, run_server

    for flag in ("port", "max_batch", "token_budget", "kv_blocks", "block_size", "max_waiting"):
        value = getattr(args, flag)
        if value < (0 if flag == "port" else 1) or (flag == "port" and value > 65535):
            raise DojoError(f"--{flag.replace('_', '-')} must be {'0-65535' if flag == 'port' else '>= 1'}, "
                            f"got {value}")
    if args.device != "cpu" or args.dtype != "float32":
        raise DojoError("serve runs the CPU engine in float32 (with --quantize for smaller weights)")
    sock = bind(args.host, args.port)  # before the slow load: a port in use fails at once
    model, tokenizer, seconds = load(args)
    engine = Engine(model, n_blocks=args.kv_blocks, block_size=args.block_size, token_budget=args.token_budget,
                    max_running=args.max_batch, policy=args.batching)
    loop = EngineLoop(engine, max_waiting=args.max_waiting).start()
    name = args.served_model_name or (MODEL_NAME if args.model is None else _stem(args.model))
    cache_mb = engine.runner.bytes_per_token * args.kv_blocks * args.block_size / 1e6
    kv = str(engine.runner.pools[0].k.dtype).removeprefix("torch.")
    print(f"serving {name} on http://{args.host}:{sock.getsockname()[1]} ({args.batching} batching, up to "
          f"{args.max_batch} running, KV pool {args.kv_blocks} x {args.block_size} slots = {cache_mb:.0f} MB "
          f"in {kv}; loaded in {seconds:.1f} s). Ctrl-C or SIGTERM stops it.", file=sys.stderr, flush=True)
    run_server(loop, tokenizer, name, stop_ids(tokenizer), sock, shutdown_timeout=args.shutdown_timeout)
    return 0


def _stem(path: str) -> str:
    from pathlib import Path

    return Path(path).stem


def cmd_loadtest(args) -> int:
    from ..serve.loadtest import format_summary, plot_sweep, run_load, summarize, workload

    try:
        rates = [float(r) for r in args.rate.split(",")] if args.rate else [None]
    except ValueError:
        raise DojoError(f"--rate takes numbers separated by commas (for example 0.5,1,2); got {args.rate!r}") from None
    if args.requests < 1 or not 0 <= args.disconnect <= args.requests:
        raise DojoError("need --requests >= 1 and 0 <= --disconnect <= --requests")
    if args.plot and len(rates) < 2:
        raise DojoError("--plot needs several loads: --rate 0.5,1,2,4")
    import random

    bodies = workload(args.requests, args.seed, args.max_tokens)
    hang_up = set(random.Random(args.seed + 1).sample(range(args.requests), args.disconnect))
    points = []
    for rate in rates:
        try:
            outcomes, wall = asyncio.run(run_load(args.url, args.model, bodies, rate=rate,
                                                  concurrency=args.concurrency, hang_up=hang_up, seed=args.seed,
                                                  progress=sys.stderr.isatty()))
        except OSError as e:
            raise DojoError(f"cannot reach {args.url}: {e}; start a server with: python -m reference_engine serve")
        summary = summarize(outcomes, wall, args.slo_ttft, args.slo_tpot)
        if summary["completed"] == 0 and summary["failed"]:
            raise DojoError(f"no request completed against {args.url}: {summary['errors'][0]}")
        load_name = f"{rate:g} requests/s (Poisson)" if rate else f"{args.concurrency} concurrent clients"
        print(f"# {load_name}, {args.requests} requests\n{format_summary(summary)}")
        points.append((rate, summary))
    if args.plot:
        plot_sweep(points, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        print(json.dumps([{"rate": r, "concurrency": args.concurrency, **s} for r, s in points]))
    return 0


def cmd_bench_serve(args) -> int:
    from ..serve.bench import compare_batching, format_comparison, format_step, time_decode_step

    if args.step:
        model, _, _ = load(args)
        result = time_decode_step(model, args.batch, args.slots)
        print(format_step(result, args.batch, args.slots, args.quantize or "float32", args.kv_dtype or "float32"))
        if args.json:
            print(json.dumps(result))
        return 0
    extra = ["--threads", str(args.threads)] if args.threads else []
    for flag in ("model", "quantize", "kv_dtype"):
        if getattr(args, flag):
            extra += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    results = compare_batching(args.batching.split(","), args.concurrency, args.requests, max_tokens=args.max_tokens,
                               server_args=extra, progress=sys.stderr.isatty())
    print(f"# {args.concurrency} concurrent clients, {args.requests} requests (greedy; max_tokens {args.max_tokens})")
    print(format_comparison(results))
    if args.json:
        print(json.dumps(results))
    return 0


COMMANDS = {"serve": cmd_serve, "loadtest": cmd_loadtest, "bench-serve": cmd_bench_serve}
