"""Tiled matrix multiplication in Triton, and the int4 dequantize-and-multiply of chapter 4.

C (M, N) = A (M, K) @ B (K, N). Program (i, j) owns one BLOCK_M x BLOCK_N tile of C; it
walks K in steps of BLOCK_K, loading a tile of A and a tile of B and adding their product
(`tl.dot`, the tensor cores on a GPU) into an accumulator held in registers. Each element
of A is read N / BLOCK_N times instead of N times: tiling is what turns a memory-bound
product into a compute-bound one. The accumulator is float32 even for float16 or bfloat16
inputs: a sum of K products in 16 bits loses the small terms (bfloat16 keeps 8 bits).

`int4_matmul` multiplies activations by weights stored as chapter 4's int4 with groups
(`compression.formats`: codes two per byte, w = (q - zero) * scale per group of G inputs).
The weights are unpacked in registers, never written out as floats: a decode step reads
half a byte per weight instead of two (bfloat16) or four (float32) bytes.
"""

from __future__ import annotations

import torch

from . import load_triton

triton = load_triton()
import triton.language as tl  # noqa: E402


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k0 + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b)  # zeros past K add nothing
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(a: torch.Tensor, b: torch.Tensor, block_m: int = 64, block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    """a (M, K) @ b (K, N) with any strides; the result has a's dtype, accumulated in float32."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    matmul_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return c


@triton.jit
def int4_matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        w_mask = (k[:, None] < K) & (rn[None, :] < N)
        byte = tl.load(q_ptr + rn[None, :] * stride_qn + k[:, None] // 2, mask=w_mask, other=0)  # (BLOCK_K, BLOCK_N)
        q = ((byte >> ((k[:, None] % 2) * 4)) & 0xF).to(tl.float32)  # even k: low nibble, odd k: high nibble
        g = k[:, None] // GROUP
        scale = tl.load(s_ptr + rn[None, :] * stride_sn + g, mask=w_mask, other=0.0)
        zero = tl.load(z_ptr + rn[None, :] * stride_sn + g, mask=w_mask, other=0.0)
        w = (q - zero) * scale  # (BLOCK_K, BLOCK_N): W^T's tile, dequantized in registers only
        acc += tl.dot(x.to(tl.float32), w)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """y (M, N) = x (M, K) @ W^T with W (N, K) given as int4 codes packed two per byte
    (N, K/2) uint8, scale and zero (N, K/group) float32 (`formats.quantize_tensor` with
    bits=4, symmetric=False, then `pack_int4`)."""
    M, K = x.shape
    N = packed.shape[0]
    if packed.shape[1] * 2 != K or scale.shape != (N, K // group) or zero.shape != scale.shape:
        raise ValueError(f"int4_matmul: x {tuple(x.shape)}, packed {tuple(packed.shape)}, scale {tuple(scale.shape)} "
                         f"do not fit K = {K} in groups of {group}")
    x, packed = x.contiguous(), packed.contiguous()
    scale, zero = scale.float().contiguous(), zero.float().contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    int4_matmul_kernel[grid](x, packed, scale, zero, y, M, N, K, x.stride(0), packed.stride(0), scale.stride(0),
                             y.stride(0), GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y
