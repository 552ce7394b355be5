"""Chapter 7: Triton kernels. Five tasks, each a launcher f(inputs..., outputs...) that runs
the learner's @triton.jit kernel: row softmax, fused RMSNorm, tiled matmul with a float32
accumulator, int4 dequantize-and-multiply, FlashAttention forward with its log-sum-exp.

Graded on the CPU by Triton's interpreter (the same indexing, masks and arithmetic as on
a GPU). The harness (`ch07_harness.py`) lays NaN canaries around every input and output
and makes every row strided, so unmasked loads and stores and wrong strides show; it
refuses launchers that compute with PyTorch or launch no kernel. Shapes are never
multiples of a block. References are float64. Speed is not graded (it means something
only on a GPU; timing against PyTorch there is not built yet): the report says so, and
no points are lost or given.
"""

from __future__ import annotations

import math

import torch

from ...compression.formats import pack_int4, quantize, unpack_int4
from ..tasks import Case, Check, Task, register

CHAPTER = "ch07_gpu_acceleration"
# the notebook's set-up cell: `import triton`, `import triton.language as tl`, and
# interpreter mode where there is no GPU (`from os import environ`); nothing else of triton
ALLOWED = ("triton", "triton.language", "os.environ")
BLOCKED = ("reference_engine", "solutions", "tests")


HARNESS = """
    from reference_engine.grading.chapters.ch07_harness import wrap_task

    def wrap(fn):
        return wrap_task(fn)
"""


def within_ulps(reference, ulps: float, output: int | None = None):
    """A judge: |out - ref| <= ulps units in the last place of float16 at |ref| (at least
    at 1): what a float32 accumulator rounded once to float16 stays within."""
    def judge(out, *args):
        ref = reference(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
        got = out if output is None else out[output]
        if output is not None:
            ref = ref[output]
        if got.shape != ref.shape:
            return f"output shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if not torch.isfinite(got).all():
            return "inf or NaN in the output"
        err = (got.double() - ref).abs() / (torch.finfo(torch.float16).eps * ref.abs().clamp(min=1))
        worst = err.max().item()
        return None if worst <= ulps else f"off by up to {worst:.1f} float16 ulps (allowed {ulps})"
    return judge


# -- 7.1 row softmax ----------------------------------------------------------------------------------


def softmax64(x):
    return torch.softmax(x, dim=-1)


def softmax_cases(g):
    return [
        Case("values", [torch.randn(5, 37, generator=g) * 3], {}, "x (5, 37)"),
        Case("values", [torch.randn(3, 64, generator=g)], {}, "x (3, 64): a power of two"),
        Case("widths", [torch.randn(4, 1, generator=g)], {}, "x (4, 1): rows of one value"),
        Case("widths", [torch.randn(2, 1000, generator=g)], {}, "x (2, 1000): wide rows, not a power of two"),
        Case("large_logits", [torch.randn(3, 50, generator=g) * 30 + 500], {}, "logits around 500 (exp overflows)"),
    ]


# -- 7.2 fused RMSNorm -------------------------------------------------------------------------------------


def rmsnorm64(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rmsnorm_cases(g):
    big = torch.randn(4, 96, generator=g) * 40
    big[:, 5] = 700.0  # 700^2 overflows float16: the statistic belongs in float32
    return [
        Case("values", [torch.randn(6, 96, generator=g) * 2, torch.randn(96, generator=g), 1e-5], {}, "x (6, 96)"),
        Case("values", [torch.randn(3, 200, generator=g), torch.randn(200, generator=g), 1e-6], {}, "x (3, 200)"),
        Case("float16", [big.half(), torch.randn(96, generator=g).half(), 1e-5], {},
             "float16 x with values up to 700", judge=within_ulps(rmsnorm64, 2)),
        Case("eps", [torch.randn(3, 40, generator=g) * 1e-3, torch.randn(40, generator=g), 1e-5], {},
             "x of size 1e-3: eps is 10% of mean(x^2)"),
        Case("eps", [torch.zeros(2, 24), torch.randn(24, generator=g), 1e-5], {}, "x all zeros: y is 0, not NaN"),
    ]


# -- 7.3 tiled matmul ----------------------------------------------------------------------------------------


def matmul64(a, b):
    return a @ b


def transposed(g, rows: int, cols: int, dtype=torch.float32) -> torch.Tensor:
    """A (rows, cols) matrix stored column by column: strides (1, rows)."""
    return torch.randn(cols, rows, generator=g).to(dtype).T


def matmul_cases(g):
    return [
        Case("values", [torch.randn(40, 70, generator=g), torch.randn(70, 50, generator=g)], {}, "a (40, 70) @ b (70, 50)"),
        Case("values", [torch.randn(33, 20, generator=g), transposed(g, 20, 45)], {},
             "b stored transposed (strides (1, 20)): use b's strides"),
        Case("shapes", [torch.randn(1, 9, generator=g), torch.randn(9, 3, generator=g)], {}, "a (1, 9) @ b (9, 3)"),
        Case("shapes", [torch.randn(70, 5, generator=g), torch.randn(5, 66, generator=g)], {}, "a (70, 5) @ b (5, 66)"),
        Case("shapes", [torch.randn(20, 9, generator=g), torch.randn(9, 130, generator=g)], {},
             "a (20, 9) @ b (9, 130): more blocks of columns than of rows"),
        Case("float32_accumulator", [torch.randn(20, 512, generator=g).half(), torch.randn(512, 24, generator=g).half()],
             {}, "float16 a (20, 512) @ b (512, 24)", judge=within_ulps(matmul64, 1)),
    ]


# -- 7.4 int4 dequantize-and-multiply -------------------------------------------------------------------------


def int4_64(x, packed, scale, zero, group):
    q = unpack_int4(packed).double()  # (N, K)
    w = (q - zero.repeat_interleave(group, dim=1)) * scale.repeat_interleave(group, dim=1)
    return x @ w.T


def int4_args(g, rows: int, n_out: int, n_in: int, group: int) -> list:
    w = torch.randn(n_out, n_in, generator=g) + torch.rand(n_out, 1, generator=g)  # offsets: zero points matter
    qt = quantize(w, bits=4, symmetric=False, granularity=group)
    return [torch.randn(rows, n_in, generator=g), pack_int4(qt.q), qt.scale, qt.zero, group]


def int4_cases(g):
    return [
        Case("values", int4_args(g, 5, 40, 128, 32), {}, "x (5, 128), W (40, 128), groups of 32"),
        Case("values", int4_args(g, 3, 70, 96, 32), {}, "x (3, 96), W (70, 96), groups of 32"),
        Case("groups", int4_args(g, 4, 24, 256, 64), {}, "groups of 64"),
        Case("groups", int4_args(g, 2, 30, 256, 128), {}, "groups of 128"),
        Case("rows", int4_args(g, 1, 50, 64, 32), {}, "one row of x (decoding)"),
        Case("rows", int4_args(g, 17, 20, 64, 32), {}, "17 rows of x (more than a block of 16)"),
    ]


# -- 7.5 FlashAttention forward ----------------------------------------------------------------------------------


def flash64(q, k, v, causal):
    H, KV, T, L = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~torch.ones(T, L, dtype=torch.bool).tril(L - T), float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def qkv(g, B: int, H: int, KV: int, T: int, L: int, D: int = 16, scale: float = 1.0) -> list:
    return [torch.randn(B, H, T, D, generator=g) * scale, torch.randn(B, KV, L, D, generator=g) * scale,
            torch.randn(B, KV, L, D, generator=g)]


def flash_cases(g):
    return [
        Case("values", qkv(g, 1, 2, 2, 20, 20) + [False], {}, "q, k, v (1, 2, 20, 16), not causal", output=0),
        Case("values", qkv(g, 2, 2, 1, 9, 75, scale=3.0) + [False], {},
             "9 queries, 75 keys, large scores (the max must be subtracted)", output=0),
        Case("causal", qkv(g, 1, 2, 2, 37, 37) + [True], {}, "causal, 37 queries and keys", output=0),
        Case("causal", qkv(g, 1, 2, 1, 70, 70) + [True], {}, "causal, 70 queries and keys (several key blocks)",
             output=0),
        Case("cache", qkv(g, 1, 2, 2, 5, 50) + [True], {}, "causal, 5 new queries after 45 cached keys", output=0),
        Case("cache", qkv(g, 2, 3, 1, 1, 90) + [True], {}, "decoding: one query, 90 keys", output=0),
        Case("gqa", qkv(g, 1, 6, 2, 8, 8) + [True], {}, "6 query heads sharing 2 KV heads", output=0),
        Case("gqa", qkv(g, 1, 6, 3, 1, 40) + [True], {}, "decoding, 6 query heads, 3 KV heads", output=0),
        Case("lse", qkv(g, 1, 2, 2, 12, 30) + [True], {}, "log-sum-exp, causal, 12 queries after 18 cached",
             output=1),
        Case("lse", qkv(g, 1, 2, 1, 6, 6, scale=3.0) + [False], {}, "log-sum-exp of large scores", output=1),
    ]


TRITON_HINT = " (the canaries around the tensors catch unmasked loads and stores)"


def triton_task(**fields) -> Task:
    """A chapter 7 task: a launcher run in the canary harness, allowed to import triton."""
    defaults = dict(chapter=CHAPTER, harness_source=HARNESS, common_checks=("output_type", "no_caching"),
                    allowed_names=ALLOWED, blocked_modules=BLOCKED, seeds=(0, 1), hidden_seeds=(101,),
                    memory_mb=8192, gpu_speed=True)
    return Task(**{**defaults, **fields})

register(
    triton_task(
        id="7.1", title="row softmax", function="softmax_rows", params=("x", "out"),
        reference=softmax64, make_cases=softmax_cases,
        checks={
            "values": Check(3, "one program per row (tl.program_id(0)); load the row at x_ptr + row * "
                               "x.stride(0) + cols with mask cols < n_cols and other=-inf, store with the same "
                               "mask at out's own row stride" + TRITON_HINT),
            "widths": Check(2, "the block is the next power of two of the width (triton.next_power_of_2); "
                               "masked lanes must read -inf, not 0 (exp(0) = 1 would join the sum)"),
            "large_logits": Check(2, "subtract the row's max before tl.exp: exp(500) overflows float32"),
        },
    ),
    triton_task(
        id="7.2", title="fused RMSNorm", function="rmsnorm_rows", params=("x", "weight", "eps", "out"),
        reference=rmsnorm64, make_cases=rmsnorm_cases,
        checks={
            "values": Check(3, "y = x / sqrt(mean(x^2) + eps) * weight per row: the mean divides by the true "
                               "width, not the block size; masked lanes load 0" + TRITON_HINT),
            "float16": Check(2, "load x and compute x * x and the sum in float32 (.to(tl.float32)): 700^2 "
                                "overflows float16; convert back to out's dtype only at the store"),
            "eps": Check(2, "eps goes inside the square root, added to the mean of the squares"),
        },
    ),
    triton_task(
        id="7.3", title="tiled matmul", function="matmul_tiled", params=("a", "b", "out"),
        reference=matmul64, make_cases=matmul_cases,
        checks={
            "values": Check(3, "program (i, j) owns a BLOCK_M x BLOCK_N tile of out; walk K in steps of "
                               "BLOCK_K, loading a's and b's tiles with their own strides and masks (other=0)"
                               + TRITON_HINT),
            "shapes": Check(2, "the grid is (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)), and every mask checks rows < M, "
                               "columns < N and k < K"),
            "float32_accumulator": Check(3, "accumulate in float32 (tl.zeros(..., dtype=tl.float32) and tl.dot's "
                                            "default output): a float16 sum of 512 products loses its small terms"),
        },
        rtol=1e-5, atol=1e-4,
    ),
    triton_task(
        id="7.4", title="int4 dequantize-and-multiply", function="int4_matmul",
        params=("x", "packed", "scale", "zero", "group", "out"), reference=int4_64, make_cases=int4_cases,
        checks={
            "values": Check(3, "out = x @ W^T with W[n, k] = (q - zero[n, k // group]) * scale[n, k // group]; "
                               "q is byte k // 2 of row n: the low nibble for even k, the high nibble for odd k"
                               + TRITON_HINT),
            "groups": Check(2, "the scale and zero of input k are those of group k // group (the argument), "
                               "not of your block of K"),
            "rows": Check(2, "mask the rows of x (rows < M) for any M, one row (decoding) included"),
        },
        rtol=1e-5, atol=1e-4,
    ),
    triton_task(
        id="7.5", title="FlashAttention forward", function="flash_attention",
        params=("q", "k", "v", "causal", "out", "lse"), reference=flash64, make_cases=flash_cases,
        checks={
            "values": Check(3, "online softmax over key blocks: m_new = max(m, rowmax(s)); rescale l and acc by "
                               "exp(m - m_new) before adding the block; divide acc by l at the end"
                               + TRITON_HINT),
            "causal": Check(3, "query i sees key j when j <= i + (L - T): keys of later positions get -inf "
                               "before the max"),
            "cache": Check(2, "the T queries are the last T of the L positions (offset L - T), so one query "
                              "decoding sees every cached key"),
            "gqa": Check(2, "query head h reads KV head h // (H // KV): consecutive query heads share one"),
            "lse": Check(2, "lse = m + log(l) per query, in float32, of the scaled scores"),
        },
        rtol=1e-5, atol=1e-5, output_dtypes=(None, torch.float32),
    ),
)
