"""The Triton kernels of `reference_engine/kernels/`, run on the CPU by Triton's interpreter.

The interpreter reads out-of-bounds addresses silently (garbage, no fault), so every input
is a view into a larger buffer filled with NaN canaries: a load that ignores its mask
reads NaN and the result shows it. Sizes are not multiples of the blocks, so every mask
is exercised. References are float64. On a machine with a GPU the same tests run there.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_engine.compression.formats import pack_int4, quantize
from reference_engine.kernels import flash_attention, matmul, rmsnorm, rope, softmax
from reference_engine.positional import apply_rope, rope_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def in_canaries(x: torch.Tensor, pad: int = 7) -> torch.Tensor:
    """A copy of x (any shape, last axis the row) inside a NaN-filled buffer on DEVICE: pad
    NaN rows before and after and pad NaN values after every row (the row stride is not
    the width)."""
    rows, cols = x.reshape(-1, x.shape[-1]).shape
    buf = torch.full((rows + 2 * pad, cols + pad), float("nan"), dtype=x.dtype, device=DEVICE)
    view = buf[pad: pad + rows, :cols]
    view.copy_(x.reshape(rows, cols))
    return view.unflatten(0, x.shape[:-1]) if x.dim() != 2 else view


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    actual, expected = actual.cpu(), expected.cpu()
    assert not actual.isnan().any(), "NaN in the result: a load read past the data (a canary)"
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("cols", [1, 37, 300])
def test_softmax_matches_float64_on_strided_rows(cols):
    torch.manual_seed(cols)
    x = in_canaries(torch.randn(5, cols) * 4)
    close(softmax.softmax(x), torch.softmax(x.cpu().double(), -1), 1e-6)


def test_softmax_keeps_large_logits_finite():
    x = in_canaries(torch.tensor([[1000.0, 999.0, -5.0], [-1e4, 0.0, 3.0]]))
    close(softmax.softmax(x), torch.softmax(x.cpu().double(), -1), 1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_rmsnorm_matches_float64_with_activations_past_fp16_squares(dtype, tol):
    torch.manual_seed(1)
    x = torch.randn(6, 576) * 30
    x[:, 3] = 600.0  # 600^2 overflows float16: the statistic must be taken in float32
    w = torch.randn(576)
    xd = x.to(dtype).double()
    expected = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.to(dtype).double()
    y = rmsnorm.rmsnorm(in_canaries(x.to(dtype)), in_canaries(w.to(dtype)[None])[0], 1e-5)
    assert y.dtype == dtype
    close(y, expected, tol * expected.abs().max().item())


def test_rope_matches_the_engine_on_strided_heads():
    """The Q and K heads of a fused QKV projection (a view, 12 of 15 heads), in canaries, with
    head_dim 48: half of it is 24, so the kernel's 32 lanes are masked."""
    torch.manual_seed(2)
    cos, sin = rope_tables(48, 100, 10000.0)
    pos = torch.randint(0, 100, (2, 5))
    c, s = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)  # (B, T, 1, D)
    qkv = in_canaries(torch.randn(2, 5, 15, 48).flatten(2)).unflatten(-1, (15, 48))
    qk = qkv[:, :, :12]  # strides (5 * row, row, 48, 1): not contiguous
    assert not qk.is_contiguous()
    expected = apply_rope(qk.cpu().double(), c.double(), s.double(), "half")
    close(rope.apply_rope(qk, c.to(DEVICE), s.to(DEVICE)), expected, 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_matmul_matches_float64_with_transposed_operands(dtype, tol):
    torch.manual_seed(3)
    a = in_canaries(torch.randn(70, 45).to(dtype))
    b_t = in_canaries(torch.randn(90, 45).to(dtype))  # b = b_t.T: strides (1, row stride)
    close(matmul.matmul(a, b_t.T), a.cpu().double() @ b_t.T.cpu().double(), tol)


def test_int4_matmul_equals_the_dequantized_weights():
    torch.manual_seed(4)
    w = torch.randn(100, 160)  # K = 160: five groups of 32, two and a half blocks of 64
    qt = quantize(w, bits=4, symmetric=False, granularity=32)
    x = torch.randn(5, 160)
    y = matmul.int4_matmul(in_canaries(x), pack_int4(qt.q).to(DEVICE), qt.scale.to(DEVICE), qt.zero.to(DEVICE), 32)
    close(y, x.double() @ qt.dequantize().double().T, 1e-4)


def reference_attention(q, k, v, causal):
    H, KV = q.shape[1], k.shape[1]
    T, L, D = q.shape[2], k.shape[2], q.shape[3]
    kd, vd = (x.double().repeat_interleave(H // KV, 1) for x in (k, v))
    scores = q.double() @ kd.transpose(-1, -2) / math.sqrt(D)
    if causal:
        scores = scores.masked_fill(~torch.ones(T, L, dtype=torch.bool).tril(L - T), float("-inf"))
    return torch.softmax(scores, -1) @ vd, torch.logsumexp(scores, -1)


@pytest.mark.parametrize("B,H,KV,T,L,D,causal", [
    (2, 9, 3, 37, 37, 64, False),  # a prompt, every key visible
    (2, 9, 3, 37, 37, 64, True),  # a prompt from slot 0
    (1, 4, 2, 5, 70, 64, True),  # five queries continuing a cache of 65
    (2, 9, 3, 1, 150, 64, True),  # decoding: one query, a long cache
    (1, 6, 2, 9, 40, 48, True),  # head_dim 48 in 64 lanes: the feature mask
])
def test_flash_attention_matches_float64(B, H, KV, T, L, D, causal):
    torch.manual_seed(T + L)
    q = in_canaries(torch.randn(B, H, T, D))
    cache_k = torch.full((B, KV, L + 9, D), float("nan"), device=DEVICE)  # a cache longer than what is read
    cache_v = torch.full((B, KV, L + 9, D), float("nan"), device=DEVICE)
    cache_k[:, :, :L] = torch.randn(B, KV, L, D)
    cache_v[:, :, :L] = torch.randn(B, KV, L, D)
    k, v = cache_k[:, :, :L], cache_v[:, :, :L]  # strided views, as the engine's KV cache returns them
    out, lse = flash_attention.flash_attention(q, k, v, causal=causal)
    ref_out, ref_lse = reference_attention(q.cpu(), k.cpu(), v.cpu(), causal)
    close(out, ref_out, 1e-5)
    close(lse, ref_lse, 1e-5)


def test_flash_attention_refuses_shapes_it_cannot_group():
    q, k = torch.randn(1, 4, 3, 16, device=DEVICE), torch.randn(1, 3, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of KV"):
        flash_attention.flash_attention(q, k, k)
