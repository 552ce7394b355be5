"""GPTQ (Frantar et al., 2022): quantize a linear layer's weight column by column, moving
each column's rounding error onto the columns not yet quantized, weighted by how the
layer's inputs correlate.

For one output row w and inputs X (n, in), the layer's squared output error after changing
w by dw is dw^T H dw with H = X^T X / n. Quantizing column i alone (the optimal brain
surgeon step) leaves an error e_i = (w_i - q_i) / [H^-1]_ii, and the best change to the
columns j > i that are still free is  w_j -= e_i [H^-1]_ij. Done left to right with the
Cholesky factor U of H^-1 (upper triangular, H^-1 = U^T U), row i of U holds exactly the
[H^-1]_ij of the columns still free, so no inverse is recomputed as columns are fixed.

Details that make it work on real layers:
  - damping: H + lambda * mean(diag H) * I (lambda = 0.01), so that H is invertible even
    when some inputs are (nearly) linearly dependent;
  - dead inputs (diag H = 0, never active in calibration) get H_ii = 1 and weight 0;
  - lazy blocks: within a block of 128 columns the updates touch only the block; the rest
    of the matrix is updated once per block with one matmul (the same result, far fewer
    memory passes);
  - groups: each group's scale and zero point are chosen from the *updated* weights when
    the sweep reaches its first column.
Without the error propagation this is round-to-nearest; with H in place of its inverse the
"compensation" pushes the error the wrong way.
"""

from __future__ import annotations

import torch

from ..errors import DojoError
from .formats import QuantizedTensor, code_dtype, group_size_for, quantize_codes, scale_and_zero


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = X^T X / n for inputs (..., in), in float32 (float64 matmuls are 20x slower here,
    and H's rounding error is far below the damping added to it)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return x.T @ x / x.shape[0]


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, granularity: str | int = 128,
                  symmetric: bool = False, damp: float = 0.01, block_size: int = 128) -> QuantizedTensor:
    """Quantize weight (out, in) for inputs with second moment H (in, in). Returns the codes
    and per-group scales (and zero points), as `formats.quantize` does."""
    out, n = weight.shape
    if H.shape != (n, n):
        raise DojoError(f"H must be ({n}, {n}) for a weight with {n} inputs, got {tuple(H.shape)}")
    if granularity == "tensor":
        raise DojoError("GPTQ quantizes per channel or per group; a single scale for the tensor is not supported")
    group = group_size_for(granularity, (out, n))
    # a group's scale is chosen at its first column from the columns as updated so far: a
    # group lies inside one block, or starts at a block's start and spans whole blocks
    if group <= block_size:
        block_size = block_size // group * group
    elif group % block_size:
        block_size = group
    W, H = weight.detach().float().clone(), H.float().clone()  # float32 throughout, as the paper's code
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H^-1 = U^T U

    codes = torch.zeros(n, out, dtype=code_dtype(symmetric))  # transposed: a column is a contiguous row
    Wt = W.t().contiguous()  # (in, out)
    scales, zeros = [], []
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, err1, U1 = Wt[i1:i2].clone(), torch.zeros(i2 - i1, out), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % group == 0:  # a new group: its scale from the weights as updated so far
                g = W1[i : i + group] if i + group <= i2 - i1 else torch.cat([W1[i:], Wt[i2 : i1 + i + group]])
                scale, zero = scale_and_zero(g.amin(0), g.amax(0), bits, symmetric)
                scales.append(scale)
                zeros.append(zero)
            w = W1[i]
            q = quantize_codes(w, scale, zero, bits, symmetric)
            codes[i1 + i] = q.to(codes.dtype)
            dequantized = (q - (0 if zero is None else zero)) * scale
            err = (w - dequantized) / U1[i, i]
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # the free columns of this block: -= U[i, i:] x err
            err1[i] = err
        Wt[i2:] -= U[i1:i2, i2:].t() @ err1  # the rest of the matrix, once per block
    codes = codes.t().contiguous()
    scale = torch.stack(scales, 1).float()  # (out, n_groups)
    zero = None if symmetric else torch.stack(zeros, 1).float()
    return QuantizedTensor(codes, scale, zero, bits, group)


def layer_error(weight: torch.Tensor, approx: torch.Tensor, H: torch.Tensor) -> float:
    """Mean squared output error per row, tr(dW H dW^T) / out: what GPTQ minimises."""
    dw = (weight.double() - approx.double())
    return float((dw @ H.double() * dw).sum() / weight.shape[0])
