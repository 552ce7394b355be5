"""Sparse storage of a pruned weight, and what it costs to multiply.

COO keeps (row, column, value) for every nonzero; CSR sorts them by row and replaces the
row indices by row_ptr (out + 1): row i's nonzeros are values[row_ptr[i]:row_ptr[i+1]],
at columns col_index[same]. For a vector x, y_i = sum over those of value * x[column].

The catch on a CPU: a dense matvec streams W once, 4 bytes per weight, with every load
used; CSR reads 4 bytes of value and 8 of column index (int64; 4 with int32) per nonzero,
plus an x[column] gather the prefetcher cannot predict. So CSR reads fewer bytes only
below about a third of the weights kept, and is faster only well below that:
`matvec_timings` measures where on this machine (the lesson plots it). Unstructured
sparsity pays in memory long before it pays in speed.
"""

from __future__ import annotations

import time
import warnings

import torch

from ..errors import DojoError


def to_coo(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of the nonzeros of w (out, in), in row-major order."""
    if w.dim() != 2:
        raise DojoError(f"sparse storage is for 2-D weights; got shape {tuple(w.shape)}")
    rows, cols = w.nonzero(as_tuple=True)
    return rows, cols, w[rows, cols]


def to_csr(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, col_index, row_ptr): row_ptr[i] is where row i starts, row_ptr[-1] = nnz.

    Example: [[0, 2, 0], [1, 0, 3]] -> values [2, 1, 3], col_index [1, 0, 2], row_ptr [0, 1, 3]."""
    rows, cols, values = to_coo(w)
    counts = torch.bincount(rows, minlength=w.shape[0])
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.long)
    row_ptr[1:] = counts.cumsum(0)
    return values, cols, row_ptr


def csr_matvec(values: torch.Tensor, col_index: torch.Tensor, row_ptr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = W x for W in CSR and x (in,): each nonzero times its x, summed into its row."""
    rows = torch.repeat_interleave(torch.arange(len(row_ptr) - 1), row_ptr.diff())  # the row of each nonzero
    return torch.zeros(len(row_ptr) - 1, dtype=x.dtype).index_add_(0, rows, values * x[col_index])


def csr_bytes(w: torch.Tensor, index_bytes: int = 4) -> int:
    """Bytes of a CSR copy of w: a value and a column index per nonzero, a pointer per row."""
    nnz = int((w != 0).sum())
    return nnz * (w.element_size() + index_bytes) + (w.shape[0] + 1) * index_bytes


def _best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matvec_timings(out_features: int, in_features: int, densities: list[float], repeats: int = 20,
                   seed: int = 0) -> list[dict]:
    """Dense F.linear against PyTorch's CSR matmul (torch.sparse_csr_tensor, int32 indices)
    for one row of activations, at each fraction of weights kept; best of `repeats`, each
    pair measured back to back."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(in_features, 1, generator=g)
    rows = []
    for density in densities:
        if not 0.0 < density <= 1.0:
            raise DojoError(f"density is the fraction of weights kept, in (0, 1]; got {density}")
        mask = torch.rand(w.shape, generator=g) < density
        pruned = w * mask
        values, cols, row_ptr = to_csr(pruned)
        with warnings.catch_warnings():  # PyTorch calls its CSR support beta, once per process
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.sparse_csr_tensor(row_ptr.int(), cols.int(), values, size=w.shape, check_invariants=True)
        dense_s = _best_of(lambda: pruned @ x, repeats)
        sparse_s = _best_of(lambda: csr @ x, repeats)
        rows.append({"density": density, "dense_us": dense_s * 1e6, "csr_us": sparse_s * 1e6,
                     "dense_bytes": pruned.numel() * 4, "csr_bytes": csr_bytes(pruned)})
    return rows
