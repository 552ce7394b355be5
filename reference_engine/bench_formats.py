"""`bench --quantize FORMAT[,FORMAT...]` with several formats (or `all`), and `bench
--llama-cpp`: decode speed and quality per format in one table, and llama.cpp on the same
file as a baseline.

Each format is loaded as the CLI loads it (`load_model(quantize=...)`: covered formats run
the compiled integer kernels with int8 activations, the others their PyTorch path), then:
decode tokens/s at batch 1 (with the read bandwidth measured beside it) and at batch 16,
bytes of weights read per token, and perplexity and KL against the float32 reference on
the same evaluation windows. The float32 engine is the first row, measured in the same run.
"""

from __future__ import annotations

import statistics
import time

from .bench import bench_batch16, bench_decode, bench_decode_and_bandwidth, bench_prefill, decode_path, format_rows
from .errors import DojoError

# `all`: the formats the compiled integer kernels cover, and one they do not (w8a8)
ALL_FORMATS = ("q4_1", "q8_0", "q4_0", "int8", "int4-g32", "w8a8")


def format_names(text: str) -> list[str]:
    """"q4_1,int8" -> ["q4_1", "int8"]; "all" -> ALL_FORMATS. Unknown names fail here, before any loading."""
    from .compression.quantize import parse_format

    names = list(ALL_FORMATS) if text.strip().lower() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        parse_format(name)
    return names


def kernel_share(model) -> str:
    """Which matmuls the compiled integer kernels run, in words."""
    from . import cpu_kernels
    from .compression.qlinear import QuantizedLinear

    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return decode_path(model)  # float32 (compiled or not) or 16-bit floats
    covered = sum(m.kernel is not None for m in layers)
    if cpu_kernels._loaded is None:
        return f"PyTorch (compiled kernels {cpu_kernels.unavailable()})"
    if covered == len(layers):
        return "compiled integer kernels, int8 activations"
    if covered == 0:
        return "PyTorch (format not covered by the compiled kernels)"
    return f"compiled integer kernels for {covered} of {len(layers)} matmuls, PyTorch for the rest"


def measure(name: str, model, prompt: list[int], prefill: list[int], batch: list[list[int]], windows, reference,
            new_tokens: int) -> dict:
    from .bench import kv_cache_size, weight_bytes_per_token
    from .compression.quality import compare

    generate_warmup(model, prompt)
    _, ttft = bench_prefill(model, prefill)
    single = bench_decode_and_bandwidth(model, prompt, new_tokens)
    decode_16, batch16_speedup = bench_batch16(model, prompt, batch, new_tokens)
    q = compare(reference, model, windows)
    return {"format": name, "path": kernel_share(model), "weight_mb_per_token": weight_bytes_per_token(model) / 1e6,
            "ttft_s": ttft, "prefill_tokens": len(prefill),
            "decode_tok_s": single["decode_tok_s"], "decode_tok_s_batch16": decode_16,
            "batch16_speedup": batch16_speedup, "bandwidth_fraction": single["bandwidth_fraction"],
            "read_bandwidth_gb_s": single["read_bandwidth_gb_s"], "perplexity": q.perplexity,
            "reference_perplexity": q.reference_perplexity, "kl": q.kl, "top1": q.top1, **kv_cache_size(model)}


def generate_warmup(model, prompt: list[int]) -> None:
    from .generate import generate

    generate(model, [prompt], max_new_tokens=4)


def run_formats(names: list[str], model_path=None, new_tokens: int = 64, n_windows: int = 4,
                kv_dtype: str | None = None) -> list[dict]:
    """One row per format, after the float32 engine's row, all in this process (every
    model with its KV cache in kv_dtype, `Transformer.set_kv_dtype`)."""
    from tqdm import tqdm

    from .compression.calibration import evaluation_windows
    from .load import load_model
    from .perplexity import reference_text

    reference, tokenizer = load_model(model_path, pack=False)
    windows = evaluation_windows(tokenizer, n_windows, min(512, reference.config.max_seq_len))
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Explain what a KV cache is."}]))
    text_ids = tokenizer.encode(reference_text())
    batch = [text_ids[i * 200: i * 200 + 16 + 4 * i] for i in range(16)]  # as `bench` does
    prefill = text_ids[:min(512, reference.config.max_seq_len // 2)]
    rows, fp32 = [], None
    for name in tqdm(["fp32", *names], desc="formats", unit="format", leave=False):
        model, _ = load_model(model_path, quantize=None if name == "fp32" else name)
        model.set_kv_dtype(kv_dtype)
        row = measure(name, model, prompt, prefill, batch, windows, reference, new_tokens)
        if fp32 is None:
            fp32 = model  # kept: every format's speed-up is timed against it side by side
        else:
            row["speedup_vs_fp32"] = paired_speedup(fp32, model, prompt, new_tokens)
        rows.append(row)
        del model
    return rows


def paired_speedup(base, model, prompt: list[int], new_tokens: int, rounds: int = 3) -> float:
    """`model`'s batch-1 decode tokens/s over `base`'s: the median of rounds that time
    both back to back. This machine's memory bandwidth moves between states minutes apart
    (30 to 80 GB/s have been read here), and moves a bandwidth-bound float32 decode more
    than a quantized one, so a ratio of two rows measured at different moments carries the
    move; a ratio taken within one round does not."""
    ratios = []
    for _ in range(rounds):
        theirs = bench_decode(base, [prompt], new_tokens, repeats=1)
        ours = bench_decode(model, [prompt], new_tokens, repeats=1)
        ratios.append(ours / theirs)
    return statistics.median(ratios)


def format_formats_table(rows: list[dict]) -> str:
    head = ("format", "MB/token", "first token", "batch 1", "batch 16", "of bound", "perplexity", "KL", "decode path")
    lines = [head]
    for r in rows:
        lines.append((r["format"], f"{r['weight_mb_per_token']:.0f}", f"{r['ttft_s'] * 1e3:.0f} ms", f"{r['decode_tok_s']:.1f}",
                      f"{r['decode_tok_s_batch16']:.0f} ({r['batch16_speedup']:.1f}x)", f"{r['bandwidth_fraction']:.0%}",
                      f"{r['perplexity']:.3f} ({r['perplexity'] / r['reference_perplexity'] - 1:+.2%})",
                      f"{r['kl']:.4f}", r["path"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    speedups = ", ".join(f"{r['format']} {r['speedup_vs_fp32']:.2f}x" for r in rows[1:])
    return (text + f"\n\n  first token: a {rows[0]['prefill_tokens']}-token prompt; batch 1 and 16: decode tokens/s"
            " (batch 16 over batch 1: the median of 3 rounds timing both back to back); KV cache in"
            f" {rows[0]['kv_dtype']}, {rows[0]['kv_kb_per_token']:.1f} KB per token"
            f"\n  decode tokens/s (batch 1) against float32 in this run, median of 3 rounds timing both back to"
            f" back: {speedups}"
            f"\n  perplexity and KL: {rows[0]['reference_perplexity']:.3f} is the float32 reference's, on the same windows")


# -- llama.cpp ------------------------------------------------------------------------------


def llama_cpp_decode_rate(llm, ids: list[int], new_tokens: int) -> float:
    """llama.cpp's decode tokens/s: the time from its first generated token to its
    (new_tokens + 1)-th, greedy, with no stop token (the generator runs until stopped)."""
    llm.reset()
    start, count = 0.0, 0
    for _ in llm.generate(ids, temp=0.0, reset=True):
        count += 1
        if count == 1:
            start = time.perf_counter()  # the prompt is in: from here on, one decode step per token
        if count == new_tokens + 1:
            break
    return new_tokens / (time.perf_counter() - start)


def run_llama_cpp(model, tokenizer, model_path, threads: int, new_tokens: int = 64, rounds: int = 5) -> dict:
    """llama.cpp (llama-cpp-python) on the same GGUF file, prompt and thread count, in
    rounds alternating with the engine; the ratio is the median of the rounds' ratios."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise DojoError("--llama-cpp needs llama-cpp-python, which is not installed; it compiles llama.cpp for "
                        "several minutes: pip install llama-cpp-python==0.3.36 (see the README)") from None
    from .gguf_loader import default_model_path

    path = str(model_path or default_model_path())
    # n_batch=1: the prompt goes in one token at a time. Decode steps are one token each
    # anyway, so the decode speed is the same; and on a CPU with AMX, llama.cpp 0.3.36's
    # multi-token path crashed the process (a general protection fault in libggml-cpu).
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=1, n_ubatch=1,
                verbose=False)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Explain what a KV cache is."}]))
    llama_cpp_decode_rate(llm, ids, 4)  # warm-up
    generate_warmup(model, ids)
    pairs = []
    for _ in range(rounds):
        ours = bench_decode(model, [ids], new_tokens, repeats=1)
        theirs = llama_cpp_decode_rate(llm, ids, new_tokens)
        pairs.append((ours, theirs, ours / theirs))
    return {"llama_cpp_decode_tok_s": statistics.median(p[1] for p in pairs),
            "engine_paired_tok_s": statistics.median(p[0] for p in pairs),
            "speedup_vs_llama_cpp": statistics.median(p[2] for p in pairs), "llama_cpp_threads": threads}


def format_llama_cpp(result: dict, fmt: str | None) -> str:
    return format_rows([(f"llama.cpp on the same file, batch 1, {result['llama_cpp_threads']} threads",
                         f"{result['llama_cpp_decode_tok_s']:.1f} tokens/s; the engine ({fmt or 'fp32'}) "
                         f"{result['engine_paired_tok_s']:.1f} in the same rounds "
                         f"({result['speedup_vs_llama_cpp']:.2f}x, median of paired rounds)")])
