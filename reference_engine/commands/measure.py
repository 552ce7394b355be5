"""Measuring: perplexity, bench (formats, llama.cpp, graph backends), gpu-figures, build-kernels."""

from __future__ import annotations

import json
import time

from ..errors import DojoError
from .common import load, with_kv_dtype, with_model, with_quantize


def add_commands(sub) -> None:
    p = with_quantize(with_model(sub.add_parser("perplexity", help="perplexity on the pydoc topics text; with "
                                                                   "--quantize, also KL and top-1 agreement "
                                                                   "against the unquantized model")))
    p.add_argument("--windows", type=int, default=8, help="number of 512-token windows (default 8)")
    p.add_argument("--reference", metavar="PATH", help="also compare with this GGUF file on the same windows (KL, "
                                                       "top-1), for example the original of a pruned --model")
    p.add_argument("--weight-only", action="store_true", help="keep float activations (chapter 4's figures); by "
                                                              "default covered formats quantize them to int8 per "
                                                              "block of 32, as the compiled decode kernels do")
    b = with_kv_dtype(with_quantize(with_model(sub.add_parser("bench", help="prefill/decode speed, bandwidth bound, "
                                                                            "memory; --quantize a,b or all: a table "
                                                                            "of formats"))))
    b.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    b.add_argument("--no-baseline", action="store_true", help="skip the HF transformers baseline")
    b.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp (llama-cpp-python, installed "
                                                             "separately) on the same file, in alternating rounds")
    b.add_argument("--backend", metavar="LIST", help="instead: greedy decoding through the static-shape step in "
                                                     "eager PyTorch, torch.compile, ONNX Runtime (eager,compile,onnx "
                                                     "or all), with set-up times and compile counts")
    b.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens per --backend run (default 32)")
    b.add_argument("--roofline", action="store_true", help="instead: where a decode step's time goes at batch 1 and "
                                                           "16, against this machine's arithmetic ceiling and "
                                                           "bandwidth measured in the same run (the ridge, and the "
                                                           "batch-16 speed-up the matmuls allow)")
    sub.add_parser("build-kernels", help="build the optional compiled CPU kernel for decoding (once per machine)")
    gf = sub.add_parser("gpu-figures", help="on a CUDA GPU: bf16 decode eager / torch.compile / CUDA graphs, and "
                                            "Triton FlashAttention against SDPA, as one table naming the GPU")
    gf.add_argument("--model", metavar="PATH", help="GGUF file (default: SmolLM2-135M-Instruct)")
    gf.add_argument("--new-tokens", type=int, default=128, metavar="N")
    gf.add_argument("--json", action="store_true", help="also print one JSON object on the last line")


def cmd_perplexity(args) -> int:
    from ..perplexity import perplexity

    if args.windows < 1:
        raise DojoError(f"--windows must be >= 1, got {args.windows}")
    if args.quantize or args.reference:
        return compared_perplexity(args)
    model, tokenizer, _ = load(args)
    t0 = time.perf_counter()
    ppl = perplexity(model, tokenizer, max_windows=args.windows)
    print(f"perplexity {ppl:.3f} on {args.windows} windows of 512 tokens of the pydoc topics "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def activations_in_words(model) -> str:
    """How the quantized layers treat their inputs, for reports."""
    modes = [m.activations for m in model.modules() if hasattr(m, "activations")]
    n8 = modes.count("int8")
    if not n8:
        return "float (weight-only)"
    return (f"int8 per block of 32 in {n8} of {len(modes)} quantized matmuls (the compiled decode kernels' "
            "arithmetic; --weight-only keeps them float)")


def compared_perplexity(args) -> int:
    """The model (quantized with --quantize, or another file) against a reference on the same
    windows: perplexity of both, KL divergence of their next-token distributions, top-1
    agreement. The reference is --reference, else the unquantized --model."""
    from ..bench import weight_bytes_per_token
    from ..compression.calibration import evaluation_windows
    from ..compression.quality import compare
    from ..load import load_model

    model, tokenizer, load_s = load(args)  # the format is checked before anything is read
    reference, _ = load_model(args.reference or args.model, pack=False)
    if reference.config.vocab_size != model.config.vocab_size:
        raise DojoError(f"the reference has {reference.config.vocab_size} tokens in its vocabulary and the model "
                        f"{model.config.vocab_size}: KL needs the same vocabulary (a pruned copy of the same file)")
    windows = evaluation_windows(tokenizer, args.windows, min(512, model.config.max_seq_len,
                                                              reference.config.max_seq_len))
    t0 = time.perf_counter()
    q = compare(reference, model, windows)
    if args.reference:
        what = f"{args.model or 'SmolLM2'}{' as ' + args.quantize if args.quantize else ''} against {args.reference}"
    else:
        what = (f"{args.quantize} against the unquantized model "
                f"({'float32 dequantized from the file' if args.model is None else args.model})")
    print(f"{what}, {windows.shape[0]} windows of {windows.shape[1]} tokens of the pydoc topics "
          f"({time.perf_counter() - t0:.1f} s after {load_s:.1f} s to load):")
    for name, value in [("perplexity", f"{q.perplexity:.3f} (reference {q.reference_perplexity:.3f}, "
                                       f"{q.perplexity / q.reference_perplexity - 1:+.2%})"),
                        ("KL(reference || model)", f"{q.kl:.4f} nats per token"),
                        ("top-1 agreement", f"{q.top1:.1%} of {q.tokens} positions"),
                        ("activations", activations_in_words(model)),
                        ("weights read per token", f"{weight_bytes_per_token(model) / 1e6:.0f} MB "
                                                   f"(reference {weight_bytes_per_token(reference) / 1e6:.0f} MB)")]:
        print(f"  {name:28s} {value}")
    return 0


def cmd_bench(args) -> int:
    from ..bench import format_table, run_bench

    from ..bench_formats import format_formats_table, format_llama_cpp, format_names, run_formats, run_llama_cpp

    if args.roofline:
        return bench_roofline(args)
    if args.backend:
        return bench_backends(args)
    names = format_names(args.quantize) if args.quantize else []  # unknown names fail before any loading
    if names:
        args.quantize = names[0]
    model, tokenizer, load_s = load(args)
    # HF transformers runs the float32 weights: a baseline for the float32 engine only
    result = run_bench(model, tokenizer, load_s, baseline=not args.no_baseline and not names)
    print(format_table(result))
    if args.llama_cpp:
        import torch

        result.update(run_llama_cpp(model, tokenizer, args.model, torch.get_num_threads()))
        print(format_llama_cpp(result, args.quantize))
    if names:
        del model
        result["formats"] = run_formats(names, args.model, kv_dtype=args.kv_dtype)
        print(f"\nfloat32 and {', '.join(names)} in the same run (4 evaluation windows for the quality):")
        print(format_formats_table(result["formats"]))
    if args.json:
        print(json.dumps(result))
    return 0


def bench_roofline(args) -> int:
    from ..roofline import format_roofline, run_roofline

    if args.llama_cpp or args.backend or (args.quantize and "," in args.quantize) or args.quantize == "all":
        raise DojoError("--roofline draws one model's roofline: give at most one --quantize format, without "
                        "--llama-cpp or --backend")
    model, _, _ = load(args)
    result = run_roofline(model)
    print(f"roofline of a decode step, {args.quantize or args.dtype}, {result['threads']} threads, one run:")
    print(format_roofline(result))
    if args.json:
        print(json.dumps(result))
    return 0


def bench_backends(args) -> int:
    from ..graphs import backend_names, format_backends_table, run_backends

    names = backend_names(args.backend)  # unknown names fail before loading
    on_gpu = args.device.startswith("cuda")
    if "cudagraphs" in names and not on_gpu:
        raise DojoError("--backend cudagraphs records CUDA graphs: it needs --device cuda (and a GPU)")
    if "onnx" in names and (on_gpu or args.dtype != "float32"):
        raise DojoError("--backend onnx exports a float32 model on the CPU: drop --device/--dtype for it")
    if args.new_tokens < 3:
        raise DojoError(f"--new-tokens must be at least 3 (two steps are set-up), got {args.new_tokens}")
    if args.kernels == "auto":
        args.kernels = "torch"  # the static step is written in PyTorch's ops; compilers fuse them their way
    model, tokenizer, _ = load(args)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Explain what a KV cache is."}]))
    rows = run_backends(model, prompt, names, n_new=args.new_tokens)
    print(f"greedy decoding, {args.new_tokens} tokens after a {len(prompt)}-token prompt, batch 1; set-up = making the "
          "step (export for onnx) + prompt + first step (compilation for compile)")
    print(format_backends_table(rows))
    if args.json:
        print(json.dumps({"backends": rows}))
    return 0


def cmd_build_kernels(args) -> int:
    from .. import cpu_kernels

    built = cpu_kernels.kernels(build=True)
    print(f"decoding: {cpu_kernels.status()}" + (f" (built in {cpu_kernels.build_dir()})" if built else ""))
    return 0  # the engine works without the kernel: not an error


def cmd_gpu_figures(args) -> int:
    from ..gpu_figures import format_gpu_figures, run_gpu_figures

    figures = run_gpu_figures(args.model, args.new_tokens)
    print(format_gpu_figures(figures))
    if args.json:
        print(json.dumps(figures))
    return 0


COMMANDS = {"perplexity": cmd_perplexity, "bench": cmd_bench, "gpu-figures": cmd_gpu_figures, "build-kernels": cmd_build_kernels}
