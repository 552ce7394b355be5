"""`python -m reference_engine gpu-figures`: chapter 7's GPU measurements as one table.

On a CUDA GPU: bfloat16 greedy decoding of SmolLM2 at batch 1 through the static step
eagerly, with torch.compile, and replayed as a CUDA graph (`graphs.py`); and the Triton
FlashAttention forward (`kernels/flash_attention.py`) against PyTorch's
scaled_dot_product_attention on a long prompt and on a decode step. Times are medians of
Triton's `do_bench` (which flushes the L2 cache between runs); the GPU is named in the
table. Without a GPU the command says so and changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DojoError

ATTENTION_SHAPES = {  # name: (batch, query heads, KV heads, queries, keys), head_dim 64 as SmolLM2
    "prefill 2048 tokens": (4, 9, 3, 2048, 2048),
    "decode, cache of 8192": (16, 9, 3, 1, 8192),
}


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise DojoError("gpu-figures measures a CUDA GPU and this machine has none visible to PyTorch; run it on a "
                        "GPU machine (the lesson's CPU figures come from the notebook and bench --backend)")


def attention_times(causal: bool = True) -> list[dict]:
    """Milliseconds per call, Triton FlashAttention against SDPA, bfloat16, each shape."""
    import triton.testing

    from .kernels.flash_attention import flash_attention

    rows = []
    for name, (B, H, KV, T, L) in ATTENTION_SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, T, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, KV, L, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, KV, L, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        # SDPA's is_causal aligns top-left; for T < L the causal rule of a cache is a mask
        # one query sees every key: no mask at all (a mask would take SDPA off its flash backend)
        mask = torch.ones(T, L, dtype=torch.bool, device="cuda").tril(L - T) if causal and 1 < T < L else None
        sdpa_causal = causal and T == L

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=sdpa_causal, enable_gqa=True)

        def triton_fa():
            return flash_attention(q, k, v, causal=causal)[0]

        err = (triton_fa().float() - sdpa().float()).abs().max().item()
        rows.append({"shape": name, "triton_ms": triton.testing.do_bench(triton_fa, return_mode="median"),
                     "sdpa_ms": triton.testing.do_bench(sdpa, return_mode="median"), "max_abs_diff": err})
    return rows


def run_gpu_figures(model_path=None, new_tokens: int = 128) -> dict:
    require_gpu()
    from . import graphs
    from .kernels import load_triton
    from .load import load_model

    load_triton()
    model, tokenizer = load_model(model_path, device="cuda", dtype=torch.bfloat16, kernels="torch")
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Explain what a KV cache is."}]))
    decode = {}
    for backend in ("eager", "compile", "cudagraphs"):
        run = graphs.greedy(model, prompt, new_tokens, backend=backend)
        decode[backend] = {"tokens_per_s": run.decode_tokens_per_s, "setup_s": run.setup_s, "compiles": run.compiles}
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "new_tokens": new_tokens,
            "decode_bf16_batch1": decode, "attention": attention_times()}


def format_gpu_figures(figures: dict) -> str:
    d = figures["decode_bf16_batch1"]
    lines = [f"GPU: {figures['gpu']} (torch {figures['torch']})", "",
             "| figure | value |", "|---|---|"]
    for backend, row in d.items():
        lines.append(f"| bf16 decode, batch 1, {backend} | {row['tokens_per_s']:.0f} tokens/s "
                     f"(set-up {row['setup_s']:.1f} s) |")
    lines.append(f"| CUDA graphs against eager | {d['cudagraphs']['tokens_per_s'] / d['eager']['tokens_per_s']:.2f}x |")
    for row in figures["attention"]:
        lines.append(f"| attention, {row['shape']}: Triton FlashAttention / SDPA | {row['triton_ms']:.3f} ms / "
                     f"{row['sdpa_ms']:.3f} ms ({row['sdpa_ms'] / row['triton_ms']:.2f}x; max diff "
                     f"{row['max_abs_diff']:.1e}) |")
    return "\n".join(lines)
