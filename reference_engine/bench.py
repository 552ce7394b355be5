"""`python -m reference_engine bench`: what the engine achieves on this machine, and how
far that is from the memory-bandwidth bound.

Decoding one token at batch 1 reads every weight once, so
    tokens/s <= read bandwidth / bytes of weights read per token.
The benchmark measures the bandwidth in the same run and prints the fraction reached.
Every figure is a median of repeated runs; the baseline (HF transformers on the same
fp32 weights) is measured in the same process, so the ratio is meaningful even on a
noisy shared machine where the absolute numbers are not.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from . import cpu_kernels
from .generate import generate
from .kv_cache import KV_BLOCK
from .perplexity import reference_text


def bandwidth_buffer(n_bytes: int = 512 << 20) -> torch.Tensor:
    """A float32 buffer larger than any cache, every page already touched."""
    buf = torch.ones(n_bytes // 4)  # ones, not empty: untouched pages would read as free
    buf.sum()
    return buf


def read_bandwidth(buf: torch.Tensor, repeats: int = 7) -> float:
    """Bytes/s for streaming `buf` (best of `repeats` sums)."""
    best = min(_timed(buf.sum) for _ in range(repeats))
    return buf.numel() * buf.element_size() / best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter, and the codes and
    scales of quantized layers (in the compiled kernel's layout where that runs: the
    same for GGUF blocks, float32 scales for the integer formats). The embedding table counts when it is the LM head (tied
    and not quantized): then it is read in full; a row lookup adds nothing worth counting."""
    own_head = "lm_head" in model._modules
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                if not (own_head and name.startswith("tok_embeddings.")))
    return total + sum(m.weight_bytes_read for m in model.modules() if hasattr(m, "weight_bytes_read"))


# Decode at batch 1 reaches 30-90% of the bandwidth bound here, whichever path runs (the
# PyTorch one included); far below that, something else had the CPU or the memory (a first
# run right after set-up wrote several GB measured 6%).
BUSY_FRACTION = 0.2
# Under this many bytes of weights the model sits in the CPU's caches, and the bound says nothing.
BUSY_MIN_BYTES = 64 << 20


def busy_note(decode_tok_s: float, bytes_per_token: int, bandwidth: float) -> str | None:
    """One line saying the figures are not the engine's when batch-1 decode reached only a
    small fraction of the bandwidth bound measured beside it; None when they look right."""
    fraction = decode_tok_s * bytes_per_token / bandwidth
    if bytes_per_token < BUSY_MIN_BYTES or fraction >= BUSY_FRACTION:
        return None
    return (f"note: the machine looks busy (decode reached {fraction:.0%} of the {bandwidth / bytes_per_token:.0f} "
            f"tokens/s that {bandwidth / 1e9:.0f} GB/s allows; usually 30-90%): run again for representative figures")


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_prefill(model, prompt: list[int], repeats: int = 3) -> tuple[float, float]:
    """(prefill tokens/s, time to first token in s) for one prompt, medians."""
    ttft = statistics.median(generate(model, [prompt], max_new_tokens=1).prefill_s for _ in range(repeats))
    return len(prompt) / ttft, ttft


def bench_decode(model, prompts: list[list[int]], new_tokens: int, repeats: int = 3) -> float:
    """Aggregate decode tokens/s over the batch (no stop tokens, so every row runs to the end)."""
    rates = []
    for _ in range(repeats):
        g = generate(model, prompts, max_new_tokens=new_tokens)
        rates.append(len(prompts) * g.decode_steps / g.decode_s)
    return statistics.median(rates)


def bench_batch16(model, prompt: list[int], batch: list[list[int]], new_tokens: int, rounds: int = 3) -> tuple:
    """Aggregate decode tokens/s of `batch` (median) and its ratio to batch 1 on `prompt`:
    each round times batch 1 and the batch back to back, and the ratio is the median of the
    rounds' ratios. The bandwidth state moves a batch-1 decode far more than a batched one,
    so two figures taken a minute apart can give a ratio off by a third."""
    rates, ratios = [], []
    for _ in range(rounds):
        one = bench_decode(model, [prompt], new_tokens, repeats=1)
        many = bench_decode(model, batch, new_tokens // 2, repeats=1)
        rates.append(many)
        ratios.append(many / one)
    return statistics.median(rates), statistics.median(ratios)


def bench_decode_and_bandwidth(model, prompt: list[int], new_tokens: int, repeats: int = 3) -> dict:
    """Batch-1 decode tokens/s and read bandwidth, measured in alternation (a bandwidth
    reading right before each decode run), so that each fraction of the bound compares two
    figures taken under the same load: on a shared machine the bandwidth alone has been
    seen to move between 30 and 80 GB/s from one minute to the next. Medians of the rounds."""
    buf = bandwidth_buffer()
    per_token = weight_bytes_per_token(model)
    rounds = []
    for _ in range(repeats):
        bandwidth = read_bandwidth(buf, repeats=3)
        rate = bench_decode(model, [prompt], new_tokens, repeats=1)
        rounds.append((rate, bandwidth, rate * per_token / bandwidth))
    rate, bandwidth, fraction = (statistics.median(r[i] for r in rounds) for i in range(3))
    return {"decode_tok_s": rate, "read_bandwidth_gb_s": bandwidth / 1e9, "weight_mb_per_token": per_token / 1e6,
            "bandwidth_bound_tok_s": bandwidth / per_token, "bandwidth_fraction": fraction}


def bench_hf_decode(model, prompt: list[int], new_tokens: int, repeats: int = 3) -> dict:
    """HF transformers' `generate` decode tokens/s on the same fp32 weights, and the
    engine's speed-up over it: each round times the engine and HF on the same prompt and
    token count back to back, and the speed-up is the median of the rounds' ratios (so a
    minute of heavy load elsewhere on the machine cannot land on one side only). HF's
    decode time = time(1 + n tokens) - time(1 token). Empty where transformers is not
    installed."""
    try:
        from .hf_baseline import hf_llama_from_engine
    except ImportError:
        return {}
    hf = hf_llama_from_engine(model)
    ids = torch.tensor([prompt])

    def run(n):
        return _timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False))

    run(4)  # warm-up
    rounds = []
    for _ in range(repeats):
        ours = bench_decode(model, [prompt], new_tokens, repeats=1)
        theirs = new_tokens / max(run(1 + new_tokens) - run(1), 1e-9)
        rounds.append((theirs, ours, ours / theirs))
    return {"hf_decode_tok_s": statistics.median(r[0] for r in rounds),
            "engine_paired_tok_s": statistics.median(r[1] for r in rounds),
            "speedup_vs_hf": statistics.median(r[2] for r in rounds)}


def decode_path(model) -> str:
    """Which code decodes this model, for the report."""
    quantized = sorted({m.storage for m in model.modules() if hasattr(m, "storage")})
    if quantized:
        from .bench_formats import kernel_share

        path = kernel_share(model)
        if path.startswith("PyTorch"):
            return f"PyTorch blocks; quantized weights ({'; '.join(quantized)}) dequantized in every matmul"
        return f"{path}; quantized weights ({'; '.join(quantized)})"
    dtype = model.tok_embeddings.weight.dtype
    if dtype != torch.float32:
        return f"PyTorch blocks in {str(dtype).removeprefix('torch.')}"
    return cpu_kernels.status()


def kv_cache_size(model) -> dict:
    """What the model's KV cache stores and its bytes per token (keys and values, every block)."""
    c = model.config
    dtype = model.kv_dtype or model.tok_embeddings.weight.dtype
    per_value = 1 + 4 / KV_BLOCK if dtype == torch.int8 else dtype.itemsize  # int8: a float32 scale per 32 codes
    per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * per_value
    return {"kv_dtype": str(dtype).removeprefix("torch."), "kv_kb_per_token": per_token / 1e3}


def run_bench(model, tokenizer, load_s: float, baseline: bool = True, new_tokens: int = 64) -> dict:
    torch.manual_seed(0)
    text_ids = tokenizer.encode(reference_text())
    chat = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain what a KV cache is."}]))
    generate(model, [chat], max_new_tokens=8)  # warm-up
    context = model.config.max_seq_len
    prefill_len = min(512, context // 2)  # tiny test models have short contexts
    prefill_tok_s, ttft = bench_prefill(model, text_ids[:prefill_len])
    chat = chat[-(context - new_tokens):]
    single = bench_decode_and_bandwidth(model, chat, new_tokens)
    # 16 prompts of different lengths (16..76 tokens) taken from real text
    batch = [text_ids[i * 200: i * 200 + 16 + 4 * i] for i in range(16)]
    decode_16, batch16_speedup = bench_batch16(model, chat, batch, new_tokens)
    result = {
        "load_s": load_s,
        "prefill_tokens": prefill_len,
        "prefill_tok_s": prefill_tok_s,
        "ttft_s": ttft,
        **single,
        "decode_tok_s_batch16": decode_16,
        "batch16_speedup": batch16_speedup,
        "peak_memory_mb": peak_memory_mb(),
        "threads": torch.get_num_threads(),
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        **kv_cache_size(model),
        "decode_path": decode_path(model),
    }
    if baseline:
        result.update(bench_hf_decode(model, chat, new_tokens // 2))
    return result


def format_table(result: dict) -> str:
    rows = [
        ("load time", f"{result['load_s']:.2f} s"),
        (f"prefill ({result['prefill_tokens']}-token prompt)", f"{result['prefill_tok_s']:.0f} tokens/s"),
        ("time to first token (same prompt)", f"{result['ttft_s'] * 1e3:.0f} ms"),
        ("decode, batch 1", f"{result['decode_tok_s']:.1f} tokens/s"),
        ("decode, batch 16 (aggregate)", f"{result['decode_tok_s_batch16']:.1f} tokens/s "
                                         f"({result['batch16_speedup']:.2f}x batch 1, paired rounds)"),
        ("read bandwidth (measured)", f"{result['read_bandwidth_gb_s']:.1f} GB/s"),
        ("weights read per token", f"{result['weight_mb_per_token']:.0f} MB"
                                   + ("" if "quantized" in result["decode_path"] else f" ({result['dtype']})")),
        ("KV cache", f"{result['kv_dtype']}, {result['kv_kb_per_token']:.1f} KB per token"),
        ("bandwidth bound, batch 1", f"{result['bandwidth_bound_tok_s']:.1f} tokens/s"),
        ("fraction of the bound reached", f"{result['bandwidth_fraction']:.0%}"),
        ("peak memory (RSS)", f"{result['peak_memory_mb']:.0f} MB"),
        ("decode path", result["decode_path"]),
    ]
    # the quantized PyTorch path is far from its bound by design (it dequantizes every matrix)
    note = None if "dequantized in every matmul" in result["decode_path"] else busy_note(
        result["decode_tok_s"], result["weight_mb_per_token"] * 1e6, result["read_bandwidth_gb_s"] * 1e9)
    if result.get("hf_decode_tok_s") is not None:
        rows.append(("HF transformers generate, batch 1", f"{result['hf_decode_tok_s']:.1f} tokens/s; the engine "
                     f"{result['engine_paired_tok_s']:.1f} in the same rounds ({result['speedup_vs_hf']:.2f}x)"))
    return format_rows(rows) + (f"\n\n{note}" if note else "")


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
