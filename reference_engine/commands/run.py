"""Running the model: generate, chat, demo, speculate."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import DojoError
from ..parallel import SCHEMES
from .common import (check_prompt, load, set_threads, stop_ids, stream_reply, with_kv_dtype, with_model, with_quantize,
                     with_sampling)


def add_commands(sub) -> None:
    g = with_kv_dtype(with_quantize(with_sampling(with_model(sub.add_parser("generate", help="continue a prompt, "
                                                                                         "streaming the text")))))
    g.add_argument("prompt", nargs="+", help="the prompt text; several quoted prompts are generated as one batch")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--parallel", choices=sorted(SCHEMES), help="run on the ranks torchrun started: "
                   + "; ".join(f"{k}: {v}" for k, v in SCHEMES.items()) + " (greedy, float32, CPU)")
    g.add_argument("--micro-batches", type=int, default=1, metavar="M",
                   help="--parallel pp: micro-batches in the pipe (at most the number of prompts)")
    g.add_argument("--dist-timeout", type=float, default=60.0, metavar="S",
                   help="--parallel: seconds a rank waits for the others (joining, or in a collective)")
    with_kv_dtype(with_quantize(with_sampling(with_model(sub.add_parser("chat", help="interactive chat (empty line or "
                                                                                    "Ctrl-D ends)")))))
    d = with_model(sub.add_parser("demo", help="load the model, answer a chat prompt, print measurements"))
    d.add_argument("--prompt", default="What is the capital of France? Answer in one sentence, then "
                                       "name two famous sights there.")
    sp = with_model(sub.add_parser("speculate", help="greedy speculative decoding against plain greedy "
                                                     "decoding: same output, acceptance, speed"))
    sp.add_argument("prompt", help="the prompt text (wrapped in the chat template)")
    sp.add_argument("--draft", choices=["lookup", "layers"], default="lookup",
                    help="prompt lookup (default) or the model's own first blocks")
    sp.add_argument("--draft-layers", type=int, default=8, metavar="N", help="blocks in the 'layers' draft")
    sp.add_argument("--k", type=int, default=4, help="draft tokens per verification (default 4)")
    sp.add_argument("--max-new-tokens", type=int, default=128, metavar="N")


def cmd_generate(args) -> int:
    from ..generate import check_sampling_args, generate

    for prompt in args.prompt:
        check_prompt(prompt)
    check_sampling_args(args.temperature, args.top_k, args.top_p, args.repetition_penalty)  # before the slow load
    if args.parallel or args.micro_batches != 1:
        return generate_parallel(args)
    model, tokenizer, _ = load(args)
    texts = prompt_texts(args, tokenizer)
    if len(texts) == 1:
        g = stream_reply(model, tokenizer, tokenizer.encode(texts[0]), args)
    else:
        g = generate(model, [tokenizer.encode(t) for t in texts], max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     stop_ids=stop_ids(tokenizer), seed=args.seed, repetition_penalty=args.repetition_penalty)
        for i, tokens in enumerate(g.tokens):
            print(f"[{i}] {tokenizer.decode(tokens)}")
    n = sum(len(t) for t in g.tokens)
    rate = g.decode_steps / g.decode_s if g.decode_s > 0 else float("nan")
    print(f"[{n} tokens, {', '.join(sorted(set(g.finish_reasons)))}; first token after {g.prefill_s * 1e3:.0f} ms, "
          f"then {rate:.1f} steps/s]", file=sys.stderr)
    return 0


def prompt_texts(args, tokenizer) -> list[str]:
    """The prompts as given, or wrapped in the chat template with --chat."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}]) if args.chat else t for t in args.prompt]


def generate_parallel(args) -> int:
    """generate --parallel on one rank of a torchrun job; rank 0 prints."""
    from ..load import load_tokenizer
    from ..parallel.launch import init_from_env
    from ..parallel.run import format_comm, generate_on_rank

    if not args.parallel:
        raise DojoError("--micro-batches is for --parallel pp")
    if (args.temperature, args.top_k, args.top_p, args.repetition_penalty) != (0.0, 0, 1.0, 1.0):
        raise DojoError("--parallel generates greedily: drop --temperature, --top-k, --top-p and "
                        "--repetition-penalty")
    if (args.device, args.dtype, args.kernels, args.quantize, args.kv_dtype) != ("cpu", "float32", "auto", None, None):
        raise DojoError("--parallel runs the float32 model on CPU ranks (gloo): drop --device, --dtype, --kernels, "
                        "--quantize and --kv-dtype")
    if args.dist_timeout <= 0:
        raise DojoError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    set_threads(args)
    rank, world = init_from_env(args.dist_timeout)
    tokenizer = load_tokenizer(args.model)
    texts = prompt_texts(args, tokenizer)
    try:
        result = generate_on_rank(args.parallel, [tokenizer.encode(t) for t in texts], args.max_new_tokens,
                                  args.model, args.micro_batches, stop_ids(tokenizer))
    except RuntimeError as e:  # gloo's errors: a peer gone, or a wait past the timeout
        raise DojoError(f"rank {rank} of {world} failed: {str(e).splitlines()[0][:160]}. When a collective failed, "
                        "another rank exited or stopped answering (its own message says why) or the wait passed "
                        f"--dist-timeout {args.dist_timeout:g} s") from None
    if rank == 0:
        for i, tokens in enumerate(result["tokens"]):
            print(tokenizer.decode(tokens) if len(texts) == 1 else f"[{i}] {tokenizer.decode(tokens)}")
        n = sum(len(t) for t in result["tokens"])
        print(f"[{args.parallel} on {world} ranks: {n} tokens in {result['seconds']:.2f} s, {result['steps']} steps; "
              f"collectives per decoding step on rank 0:\n{format_comm(result['comm_per_token'])}]", file=sys.stderr)
    import torch.distributed as dist

    dist.barrier()  # leave together: a rank tearing its group down while a peer still talks can abort the peer
    dist.destroy_process_group()
    return 0


def cmd_chat(args) -> int:
    from ..generate import check_sampling_args

    check_sampling_args(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    model, tokenizer, _ = load(args)
    messages = []
    print("Chatting with the model. An empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
        print("model> ", end="", flush=True)
        g = stream_reply(model, tokenizer, ids, args)
        messages.append({"role": "assistant", "content": tokenizer.decode(g.tokens[0])})
    return 0


def cmd_demo(args) -> int:
    from ..bench import bandwidth_buffer, busy_note, format_rows, peak_memory_mb, read_bandwidth, weight_bytes_per_token
    from ..generate import generate

    check_prompt(args.prompt)
    model, tokenizer, load_s = load(args)
    c = model.config
    print(f"Loaded a {c.n_layers}-layer model ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters, {c.n_heads} query / {c.n_kv_heads} KV heads) in {load_s:.1f} s.\n")
    print(f"user> {args.prompt}\nmodel> ", end="", flush=True)
    ids = tokenizer.encode_chat(args.prompt)
    sampling = argparse.Namespace(max_new_tokens=96, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                                  repetition_penalty=1.0)
    g = stream_reply(model, tokenizer, ids, sampling)
    # A fixed-length run without stop tokens, so the decode rate covers enough steps.
    long = generate(model, [ids], max_new_tokens=64)
    decode_rate = long.decode_steps / long.decode_s
    peak_mb = peak_memory_mb()  # before the bandwidth buffer below
    buf = bandwidth_buffer()  # what the memory streams now, in a fraction of a second
    note = busy_note(decode_rate, weight_bytes_per_token(model), read_bandwidth(buf, repeats=3))
    del buf
    print("\nMeasured on this machine:")
    print(format_rows([
        ("load time", f"{load_s:.2f} s"),
        ("prompt", f"{len(ids)} tokens"),
        ("prefill", f"{len(ids) / g.prefill_s:.0f} tokens/s (first token after {g.prefill_s * 1e3:.0f} ms)"),
        ("decode, batch 1", f"{decode_rate:.1f} tokens/s (64-token run)"),
        ("answer", f"{len(g.tokens[0])} tokens, ended by {g.finish_reasons[0]}"),
        ("peak memory (RSS)", f"{peak_mb:.0f} MB"),
    ]))
    if note:
        print(f"\n{note}")
    print("\nMore: python -m reference_engine bench  (bandwidth bound, batch 16, HF baseline)")
    return 0


def cmd_speculate(args) -> int:
    from ..decoding import speculative_generate
    from ..generate import generate

    check_prompt(args.prompt)
    model, tokenizer, _ = load(args)
    ids = tokenizer.encode_chat(args.prompt)
    stops = stop_ids(tokenizer)
    t0 = time.perf_counter()
    plain = generate(model, [ids], max_new_tokens=args.max_new_tokens, stop_ids=stops).tokens[0]
    t1 = time.perf_counter()
    spec = speculative_generate(model, ids, max_new_tokens=args.max_new_tokens, k=args.k, draft=args.draft,
                                draft_layers=args.draft_layers, stop_ids=stops)
    t2 = time.perf_counter()
    print(tokenizer.decode(spec.tokens))
    plain_rate, spec_rate = len(plain) / (t1 - t0), len(spec.tokens) / (t2 - t1)
    rows = [("output", "identical to greedy" if spec.tokens == plain else "DIFFERS from greedy"),
            ("draft", f"{args.draft}" + (f" (first {args.draft_layers} blocks)" if args.draft == "layers" else "")),
            ("draft tokens accepted", f"{spec.accepted} of {spec.proposed} ({spec.acceptance_rate:.0%})"),
            ("tokens per verification", f"{len(spec.tokens) / max(spec.target_forwards, 1):.2f}"),
            ("plain greedy", f"{plain_rate:.1f} tokens/s"),
            ("speculative", f"{spec_rate:.1f} tokens/s ({spec_rate / plain_rate:.2f}x, measured in this run)")]
    for name, value in rows:
        print(f"  {name:26s} {value}")
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "demo": cmd_demo, "speculate": cmd_speculate}
