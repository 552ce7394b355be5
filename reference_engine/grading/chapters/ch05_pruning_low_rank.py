"""Chapter 5: pruning and low-rank factorisation. Seven tasks: a per-row magnitude mask,
Wanda's mask from activations, an N:M mask, CSR storage, a CSR matvec, FFN channel
pruning, truncated SVD.

The masks have one right answer once ties are settled (the lower input index is removed
first, what a stable ascending sort gives), so they are compared with the engine's own
(`compression/prune.py`) exactly; the tie cases are built from a handful of magnitudes so
that a threshold or an unstable ranking cannot agree by luck. FFN pruning is judged by
the function it must keep (the small FFN computes what the masked big one does), and
truncated SVD by Eckart-Young: no rank-r matrix is closer to W in the Frobenius norm, and
that distance is the root of the discarded squared singular values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...compression import prune, sparse
from ..tasks import Case, Check, Memory, Task, register

SPARSE_OPS = {
    "aten::_to_sparse_csr": "Tensor.to_sparse_csr",
    "aten::_to_sparse": "Tensor.to_sparse",
    "aten::_sparse_compressed_tensor_unsafe": "torch.sparse_csr_tensor",
    "aten::_sparse_coo_tensor_with_dims_and_tensors": "torch.sparse_coo_tensor",
}
BLOCKED = ("reference_engine", "solutions", "tests", "scipy")


def rows_of_scales(g, rows: int, cols: int) -> torch.Tensor:
    """Rows whose typical size differs by up to 1000x: ranking over the whole matrix
    instead of per row empties the small rows."""
    return torch.randn(rows, cols, generator=g) * 10.0 ** torch.linspace(-1.5, 1.5, rows)[:, None]


def few_magnitudes(g, rows: int, cols: int) -> torch.Tensor:
    """Weights from {-3, ..., 3} / 4: many equal |w| in every row, so the tie rule decides."""
    return torch.randint(-3, 4, (rows, cols), generator=g).float() / 4


# -- 5.1 magnitude, per row -------------------------------------------------------------------------


def magnitude_cases(g):
    return [
        Case("values", [torch.randn(8, 40, generator=g), 0.5], {}, "w (8, 40), sparsity 0.5"),
        Case("values", [torch.randn(5, 64, generator=g) * 0.02, 0.75], {}, "w (5, 64), sparsity 0.75"),
        Case("exact_count", [torch.randn(4, 100, generator=g), 0.29], {},
             "w (4, 100), sparsity 0.29: 29 per row (0.29 * 100 is 28.999... in floats)"),
        Case("exact_count", [torch.randn(6, 10, generator=g), 0.35], {}, "w (6, 10), sparsity 0.35: 3 per row"),
        Case("exact_count", [torch.randn(3, 16, generator=g), 0.0], {}, "sparsity 0: nothing removed"),
        Case("per_row", [rows_of_scales(g, 6, 32), 0.5], {}, "rows 1000x apart in size, sparsity 0.5"),
        Case("ties", [few_magnitudes(g, 6, 24), 0.5], {}, "weights from {-3..3} / 4: many equal |w|"),
        Case("ties", [few_magnitudes(g, 4, 30), 0.4], {}, "weights from {-3..3} / 4, sparsity 0.4"),
    ]


# -- 5.2 Wanda ----------------------------------------------------------------------------------------


def wanda64(w, x, sparsity):
    return prune.wanda_mask(w, x.norm(dim=0), sparsity)


def activations(g, tokens: int, n_in: int, outliers: int = 3) -> torch.Tensor:
    """Calibration inputs with per-channel scales and a few heavy-tailed outlier channels,
    like a real model's: the L2 norm, the mean |x| and the squared norm rank them apart."""
    x = torch.randn(tokens, n_in, generator=g) * (torch.rand(n_in, generator=g) * 2 + 0.1)
    spikes = torch.randint(0, n_in, (outliers,), generator=g)
    x[:: max(1, tokens // 4), spikes] *= 30  # a few tokens with huge values in those channels
    return x


def wanda_cases(g):
    return [
        Case("values", [torch.randn(8, 48, generator=g), activations(g, 20, 48), 0.5], {},
             "w (8, 48), x (20 tokens, 48), sparsity 0.5"),
        Case("values", [torch.randn(6, 32, generator=g), activations(g, 12, 32), 0.25], {},
             "w (6, 32), x (12 tokens, 32), sparsity 0.25"),
        Case("activation_norm", [torch.randn(16, 64, generator=g), activations(g, 40, 64, 6), 0.5], {},
             "x with outlier channels: the norm over tokens decides"),
        Case("activation_norm", [torch.randn(12, 40, generator=g), activations(g, 40, 40, 4), 0.5], {},
             "x (40 tokens, 40 channels): as many tokens as channels"),
        Case("per_row", [rows_of_scales(g, 6, 32), activations(g, 16, 32), 0.5], {},
             "rows 1000x apart in size"),
    ]


# -- 5.3 N:M ------------------------------------------------------------------------------------------


def n_m64(w, n, m):
    return prune.n_m_mask(w.abs(), n, m)


def n_m_cases(g):
    return [
        Case("values", [torch.randn(8, 32, generator=g), 2, 4], {}, "w (8, 32), 2:4"),
        Case("values", [torch.randn(12, 16, generator=g), 2, 4], {}, "w (12, 16), 2:4"),
        Case("values", [torch.randn(16, 16, generator=g), 2, 4], {}, "w (16, 16), 2:4: square"),
        Case("other_patterns", [torch.randn(6, 24, generator=g), 1, 4], {}, "w (6, 24), 1:4"),
        Case("other_patterns", [torch.randn(5, 32, generator=g), 4, 8], {}, "w (5, 32), 4:8"),
        Case("ties", [few_magnitudes(g, 8, 32), 2, 4], {}, "weights from {-3..3} / 4, 2:4"),
    ]


# -- 5.4 CSR ------------------------------------------------------------------------------------------


def pruned(g, rows: int, cols: int, density: float, empty_rows=()) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    w[list(empty_rows)] = 0
    return w


def csr_cases(g):
    cases = [Case("values", [pruned(g, 7, 20, 0.4)], {}, f"w (7, 20), 40% kept: {what}", output=i)
             for i, what in enumerate(("values", "col_index", "row_ptr"))]
    edges = pruned(g, 8, 12, 0.5, empty_rows=(0, 3, 4, 7))
    cases += [Case("empty_rows", [edges], {}, f"rows 0, 3, 4 and 7 are all zero: {what}", output=i)
              for i, what in ((1, "col_index"), (2, "row_ptr"))]
    cases += [Case("row_ptr", [pruned(g, 5, 9, 0.5)], {}, "w (5, 9): row_ptr has 6 entries", output=2),
              Case("row_ptr", [torch.zeros(4, 6)], {}, "an all-zero matrix: row_ptr is 5 zeros", output=2)]
    return cases


# -- 5.5 CSR matvec ------------------------------------------------------------------------------------


def csr_args(g, rows: int, cols: int, density: float, empty_rows=()) -> list:
    return [*sparse.to_csr(pruned(g, rows, cols, density, empty_rows)), torch.randn(cols, generator=g)]


def matvec_cases(g):
    return [
        Case("values", csr_args(g, 9, 30, 0.3), {}, "W (9, 30), 30% kept"),
        Case("values", csr_args(g, 64, 48, 0.1), {}, "W (64, 48), 10% kept"),
        Case("empty_rows", csr_args(g, 8, 16, 0.4, empty_rows=(0, 5, 7)), {}, "rows 0, 5 and 7 of W are all zero"),
        Case("empty_rows", csr_args(g, 4, 8, 0.5, empty_rows=(0, 1, 2, 3)), {}, "W is all zeros: y is 4 zeros"),
    ]


def memory_args() -> tuple[list, int]:
    """A (1024, 2048) weight with 2% kept: its dense copy is 50x the nonzeros."""
    args = csr_args(torch.Generator().manual_seed(55), 1024, 2048, 0.02)
    return args, len(args[0])


MEMORY_ARGS, MEMORY_NNZ = memory_args()


# -- 5.6 FFN channels -----------------------------------------------------------------------------------


def prune_ffn64(gate, up, down, scores, keep):
    kept = torch.sort(torch.topk(scores, keep).indices).values
    return gate[kept], up[kept], down[:, kept]


def ffn(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def same_function(out, gate, up, down, scores, keep):
    """The small FFN computes what the big one does with the dropped channels set to zero."""
    if not (isinstance(out, list) and len(out) == 3):
        return "must return (gate, up, down)"
    d, n = down.shape
    shapes = [tuple(t.shape) for t in out]
    if shapes != [(keep, d), (keep, d), (d, keep)]:
        return f"shapes {shapes}, expected {[(keep, d), (keep, d), (d, keep)]}"
    kept = torch.zeros(n, dtype=torch.float64)
    kept[torch.topk(scores, keep).indices] = 1
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    big = ffn(x, gate.double() * kept[:, None], up.double(), down.double())
    small = ffn(x, *[t.double() for t in out])
    if not torch.allclose(small, big, rtol=1e-4, atol=1e-5):
        return f"the small FFN differs from the masked big one by up to {(small - big).abs().max().item():.3g}"
    return None


def ffn_args(g, d: int, n: int, keep: int) -> list:
    return [torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(d, n, generator=g),
            torch.rand(n, generator=g), keep]


def ffn_cases(g):
    cases = [Case("values", ffn_args(g, 12, 40, 24), {}, f"d 12, ffn 40, keep 24: {what}", output=i)
             for i, what in enumerate(("gate", "up", "down"))]
    return cases + [
        Case("function", ffn_args(g, 16, 48, 20), {}, "d 16, ffn 48, keep 20", judge=same_function),
        Case("function", ffn_args(g, 32, 24, 8), {}, "d 32, ffn 24, keep 8 (fewer channels than d)",
             judge=same_function),
        Case("function", ffn_args(g, 10, 10, 6), {}, "d 10, ffn 10: as many channels as d", judge=same_function),
    ]


# -- 5.7 truncated SVD ------------------------------------------------------------------------------------


def eckart_young(out, w, rank):
    """a (out, r) @ b (r, in) of rank r is as close to w as any rank-r matrix can be."""
    if not (isinstance(out, list) and len(out) == 2):
        return "must return (a, b)"
    a, b = out
    rows, cols = w.shape
    if tuple(a.shape) != (rows, rank) or tuple(b.shape) != (rank, cols):
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}, expected {(rows, rank)} and {(rank, cols)}"
    s = torch.linalg.svdvals(w.double())
    best = s[rank:].square().sum().sqrt().item()
    error = torch.linalg.matrix_norm(w.double() - a.double() @ b.double()).item()
    tol = 1e-4 * s[0].item()
    if error > best + tol:
        return (f"||w - a b||_F = {error:.5g}; the best rank-{rank} approximation reaches {best:.5g}, the root "
                f"of the sum of the discarded squared singular values")
    return None


def svd_cases(g):
    def case(check, rows, cols, rank, note, decay=0.9):
        w = torch.randn(rows, cols, generator=g) * decay ** torch.arange(cols)  # a decaying spectrum
        return Case(check, [w, rank], {}, note, judge=eckart_young)

    return [
        case("eckart_young", 24, 24, 6, "w (24, 24), rank 6"),
        case("eckart_young", 20, 36, 5, "w (20, 36), rank 5 (wide)"),
        case("eckart_young", 40, 16, 7, "w (40, 16), rank 7 (tall)"),
        case("ranks", 18, 30, 1, "w (18, 30), rank 1"),
        case("ranks", 18, 12, 12, "w (18, 12), rank 12 = min(out, in): exact"),
        case("ranks", 30, 30, 29, "w (30, 30), rank 29", decay=1.0),
    ]


MASK_RANKING = ("sort each row's scores ascending with a stable sort (torch.sort(..., stable=True)) and "
                "remove the first k: equal scores then go in input-index order")

register(
    Task(
        id="5.1", chapter="ch05_pruning_low_rank", title="a magnitude mask, per row", function="magnitude_mask",
        params=("w", "sparsity"), reference=prune.magnitude_mask, make_cases=magnitude_cases,
        checks={
            "values": Check(3, "remove the k = floor(sparsity * in) smallest |w| of each row: rank |w|, not w "
                               "(a large negative weight matters as much as a large positive one)"),
            "exact_count": Check(2, "k = floor(sparsity * in) exactly, guarded against float error: "
                                    "math.floor(sparsity * n + 1e-9); int(0.29 * 100) is 28"),
            "per_row": Check(2, "rank within each row (dim=1), not over the whole matrix: every row loses the "
                                "same number of weights"),
            "ties": Check(2, "with equal |w|, a threshold (|w| > t) removes all of the tied values; "
                             + MASK_RANKING),
        },
        output_dtypes=(torch.bool,), common_checks=("output_type", "inputs_unchanged"),
    ),
    Task(
        id="5.2", chapter="ch05_pruning_low_rank", title="Wanda's mask from activations", function="wanda_mask",
        params=("w", "x", "sparsity"), reference=wanda64, make_cases=wanda_cases,
        checks={
            "values": Check(3, "score_ij = |w_ij| * ||x_j||, where ||x_j|| is input channel j's L2 norm over "
                               "the tokens: x.norm(dim=0), shape (in,); then remove the k lowest of each row"),
            "activation_norm": Check(3, "the L2 norm of the activations (not of the weights, not the mean |x|, "
                                        "not the squared norm: each ranks the weights differently)"),
            "per_row": Check(2, "Wanda ranks within each output row, like the per-row magnitude mask"),
        },
        output_dtypes=(torch.bool,), common_checks=("output_type", "inputs_unchanged"),
    ),
    Task(
        id="5.3", chapter="ch05_pruning_low_rank", title="an N:M mask", function="n_m_mask",
        params=("w", "n", "m"), reference=n_m64, make_cases=n_m_cases,
        checks={
            "values": Check(3, "groups of m consecutive inputs of a row: w.abs().reshape(out, in // m, m), "
                               "keep the n largest of each group (not groups along the outputs, not strided)"),
            "other_patterns": Check(2, "n and m are parameters: 1:4 keeps one of every four, 4:8 four of eight"),
            "ties": Check(2, "with equal |w| in a group, keeping every value >= the n-th largest keeps more than "
                             "n; " + MASK_RANKING),
        },
        output_dtypes=(torch.bool,), common_checks=("output_type", "inputs_unchanged"),
    ),
    Task(
        id="5.4", chapter="ch05_pruning_low_rank", title="CSR storage", function="to_csr",
        params=("w",), reference=sparse.to_csr, make_cases=csr_cases,
        checks={
            "values": Check(3, "the nonzeros in row-major order (row by row, columns ascending in a row): "
                               "w.nonzero(as_tuple=True) gives them so, with their column indices"),
            "empty_rows": Check(2, "a row without nonzeros still has its row_ptr entry (row_ptr[i + 1] = "
                                   "row_ptr[i]); count per row with torch.bincount(rows, minlength=out)"),
            "row_ptr": Check(2, "row_ptr has out + 1 entries: 0, then the running total of nonzeros per row, "
                                "ending at nnz"),
        },
        output_dtypes=(None, torch.int64, torch.int64), forbidden_ops=SPARSE_OPS, blocked_modules=BLOCKED,
    ),
    Task(
        id="5.5", chapter="ch05_pruning_low_rank", title="a CSR matvec", function="csr_matvec",
        params=("values", "col_index", "row_ptr", "x"), reference=sparse.csr_matvec, make_cases=matvec_cases,
        checks={
            "values": Check(3, "y_i = sum over k in [row_ptr[i], row_ptr[i + 1]) of values[k] * x[col_index[k]]: "
                               "the row's slice ends before row_ptr[i + 1], and x is indexed by column"),
            "empty_rows": Check(2, "y has row_ptr.shape[0] - 1 entries, and a row without nonzeros gives 0"),
        },
        memory=Memory(args=MEMORY_ARGS, kwargs={}, max_elements=4 * MEMORY_NNZ,
                      why="never build the dense W (out * in values): work on the nonzeros, for example "
                          "values * x[col_index] summed into rows with index_add_"),
        forbidden_ops=SPARSE_OPS, blocked_modules=BLOCKED, atol=1e-5,
    ),
    Task(
        id="5.6", chapter="ch05_pruning_low_rank", title="FFN channel pruning", function="prune_ffn",
        params=("gate", "up", "down", "scores", "keep"), reference=prune_ffn64, make_cases=ffn_cases,
        checks={
            "values": Check(2, "keep the `keep` highest scores (torch.topk), in their original order (sort the "
                               "indices): rows of gate and up, columns of down"),
            "function": Check(3, "channel j is row j of gate and of up and column j of down: remove it from all "
                                 "three, or the smaller FFN computes something else"),
        },
        output_dtypes=(None, None, None), common_checks=("output_type", "inputs_unchanged"),
    ),
    Task(
        id="5.7", chapter="ch05_pruning_low_rank", title="truncated SVD", function="truncated_svd",
        params=("w", "rank"), reference=lambda *args: None, make_cases=svd_cases,
        checks={
            "eckart_young": Check(3, "u, s, vh = torch.linalg.svd(w, full_matrices=False) (s descending, vh is "
                                     "already V^T); a = u[:, :r] * s[:r], b = vh[:r]"),
            "ranks": Check(2, "keep exactly r singular values (:r, not :r + 1), largest first; rank min(out, in) "
                              "reproduces w"),
        },
        output_dtypes=(None, None), common_checks=("output_type", "inputs_unchanged"),
    ),
)
