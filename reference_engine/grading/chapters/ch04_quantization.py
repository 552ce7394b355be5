"""Chapter 4: quantization. Six tasks: per-channel int8, grouped int4 with packing, GGUF's
Q4_1 blocks from raw bytes, a W8A8 matmul, SmoothQuant's scales and folding, GPTQ for one
layer.

References are the engine's own (`compression/`), run in the trusted process (the grader
hands them float64 inputs; some compute in float32). Rounding to nearest has ties that
float32 and float64 can settle differently, so the
inputs of the rounding tasks are built to have none: each row (or group) holds its
extreme codes exactly, at a power-of-two scale, and every other value lies within 0.4 of
a code. Then a correct function gets exactly the reference's codes, in float32 or not,
and truncation, a wrong range or a wrong scale cannot hide.
GPTQ has no single right answer to compare with (the order of float operations moves
it); it is judged by what it promises: values on a 2^bits-level grid per group, an output
error under H clearly below rounding's, and no worse than the reference's.
"""

from __future__ import annotations

import torch

from ...compression import formats, gguf_blocks
from ...compression.gptq import gptq_quantize, layer_error
from ...compression.smoothquant import smoothing_scales
from ..tasks import Case, Check, Task, register

# -- inputs without rounding ties ---------------------------------------------------------------


def near_codes(g, shape, low: int, high: int) -> torch.Tensor:
    """Integers in [low, high] plus an offset in [-0.4, 0.4]: round() has one answer."""
    codes = torch.randint(low, high + 1, shape, generator=g).double()
    return codes + (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * 0.8


def symmetric_rows(g, rows: int, cols: int, negative_extreme: bool = False) -> torch.Tensor:
    """Rows whose largest |value| is exactly 127 steps of a power-of-two step (the step
    differs per row), the rest within 0.4 of a code in [-126, 126]."""
    v = near_codes(g, (rows, cols), -126, 126).clamp(-126.4, 126.4)
    where = torch.randint(0, cols, (rows,), generator=g)
    v[torch.arange(rows), where] = -127.0 if negative_extreme else 127.0 * torch.where(
        torch.rand(rows, generator=g) < 0.5, -1.0, 1.0).double()
    step = 2.0 ** -torch.randint(3, 9, (rows, 1), generator=g).double()
    return (v * step).float()


def asymmetric_groups(g, rows: int, cols: int, group: int, kind: str = "mixed") -> torch.Tensor:
    """Groups whose range [min, max] is exactly 15 steps with min a whole number of steps
    below 0 (mixed); or all values above 0 (positive) or below 0 (negative), so that the
    range must be extended to 0."""
    n = rows * (cols // group)
    step = 2.0 ** -torch.randint(3, 8, (n, 1), generator=g).double()
    if kind == "positive":
        codes = near_codes(g, (n, group), 1, 15).clamp(0.6, 15.0)
        codes[:, 0] = 15.0  # the top code exactly; every value > 0, so min clamps to 0 and zero = 0
        return (codes * step).reshape(rows, cols).float()
    if kind == "negative":
        codes = near_codes(g, (n, group), 0, 14).clamp(0.0, 14.4)
        codes[:, 0] = 0.0  # the bottom code exactly; every value < 0, so max clamps to 0 and zero = 15
        return ((codes - 15) * step).reshape(rows, cols).float()
    zero = torch.randint(1, 15, (n, 1), generator=g).double()
    codes = near_codes(g, (n, group), 0, 15).clamp(0.0, 15.0)
    codes[:, 0], codes[:, 1] = 0.0, 15.0  # both ends exactly: range = 15 steps
    return ((codes - zero) * step).reshape(rows, cols).float()


# -- 4.1 per-channel int8 ----------------------------------------------------------------------------


def per_channel64(w):
    qt = formats.quantize(w, 8, symmetric=True, granularity="channel")
    return qt.q, qt.scale


def per_channel_cases(g):
    zero_row = symmetric_rows(g, 4, 20)
    zero_row[2] = 0
    return [
        Case("codes", [symmetric_rows(g, 6, 40)], {}, "w (6, 40)", output=0),
        Case("codes", [symmetric_rows(g, 9, 24)], {}, "w (9, 24)", output=0),
        Case("scales", [symmetric_rows(g, 6, 40)], {}, "w (6, 40): scales (6, 1)", output=1),
        Case("extremes", [symmetric_rows(g, 5, 32, negative_extreme=True)], {},
             "every row's largest |value| is negative", output=0),
        Case("extremes", [symmetric_rows(g, 5, 32, negative_extreme=True)], {},
             "every row's largest |value| is negative: scales", output=1),
        Case("zero_rows", [zero_row], {}, "row 2 is all zeros: codes 0, scale 1", output=0),
        Case("zero_rows", [zero_row], {}, "row 2 is all zeros: codes 0, scale 1", output=1),
    ]


# -- 4.2 grouped int4 with a zero point, packed -----------------------------------------------------


def int4_groups64(w, group_size):
    qt = formats.quantize(w, 4, symmetric=False, granularity=group_size)
    return formats.pack_int4(qt.q), qt.scale, qt.zero


def int4_cases(g):
    return [
        Case("codes", [asymmetric_groups(g, 4, 64, 16), 16], {}, "w (4, 64), groups of 16: packed codes", output=0),
        Case("codes", [asymmetric_groups(g, 3, 96, 32), 32], {}, "w (3, 96), groups of 32: packed codes", output=0),
        Case("scales_and_zeros", [asymmetric_groups(g, 4, 64, 16), 16], {}, "groups of 16: scales", output=1),
        Case("scales_and_zeros", [asymmetric_groups(g, 4, 64, 16), 16], {}, "groups of 16: zero points", output=2),
        Case("range_includes_zero", [asymmetric_groups(g, 3, 32, 8, "positive"), 8], {},
             "groups whose values are all positive: the range still starts at 0 (scales)", output=1),
        Case("range_includes_zero", [asymmetric_groups(g, 3, 32, 8, "positive"), 8], {},
             "groups whose values are all positive: packed codes", output=0),
        Case("range_includes_zero", [asymmetric_groups(g, 3, 32, 8, "negative"), 8], {},
             "groups whose values are all negative: the range still ends at 0 (scales)", output=1),
        Case("range_includes_zero", [asymmetric_groups(g, 3, 32, 8, "negative"), 8], {},
             "groups whose values are all negative: zero points", output=2),
    ]


# -- 4.3 Q4_1 from raw bytes ---------------------------------------------------------------------------


def q4_1_64(raw):
    return gguf_blocks.dequantize_blocks(raw, "Q4_1")


def smollm_q4_1_rows(g, rows: int = 12) -> torch.Tensor:
    """A few rows of one of SmolLM2's own Q4_1 matrices, as stored in the file."""
    import numpy as np

    from ...gguf_loader import default_model_path, open_gguf

    tensors = [t for t in open_gguf(default_model_path()).tensors if t.tensor_type.name == "Q4_1"]
    t = tensors[int(torch.randint(0, len(tensors), (), generator=g))]
    data = torch.from_numpy(np.array(t.data)).view(int(t.shape[1]), -1)
    start = int(torch.randint(0, data.shape[0] - rows, (), generator=g))
    return data[start : start + rows].clone()


def q4_1_cases(g):
    random_rows = gguf_blocks.quantize_blocks(torch.randn(5, 96, generator=g) * 3, "Q4_1")
    constant = torch.randn(2, 64, generator=g)
    constant[:, :32] = 1.5  # d = 0: every value is m
    return [
        Case("values", [random_rows], {}, "5 rows of 3 blocks from random values"),
        Case("values", [gguf_blocks.quantize_blocks(torch.randn(1, 32, generator=g) * 50, "Q4_1")], {},
             "one block of large values"),
        Case("smollm", [smollm_q4_1_rows(g)], {}, "12 rows of one of SmolLM2's own Q4_1 matrices"),
        Case("constant_blocks", [gguf_blocks.quantize_blocks(constant, "Q4_1")], {}, "a constant block (d = 0)"),
    ]


# -- 4.4 W8A8 matmul -----------------------------------------------------------------------------------


def w8a8_64(x, w_q, w_scale):
    """x quantized per token (symmetric int8), integer sums, rescaled: in float64."""
    amax = x.abs().amax(1, keepdim=True)
    x_scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    x_q = (x / x_scale).round().clamp(-127, 127)
    return (x_q @ w_q.double().T) * x_scale * w_scale.T


def w8a8_cases(g):
    def weights(out, n_in):
        return [torch.randint(-127, 128, (out, n_in), generator=g, dtype=torch.int8),
                torch.rand(out, 1, generator=g) * 0.01 + 0.001]

    outliers = symmetric_rows(g, 6, 48)
    outliers[1] *= 64  # one token 64x larger than the rest
    return [
        Case("values", [symmetric_rows(g, 5, 64)] + weights(24, 64), {}, "x (5, 64), W (24, 64)"),
        Case("values", [symmetric_rows(g, 1, 96)] + weights(40, 96), {}, "one token, x (1, 96), W (40, 96)"),
        Case("per_token", [outliers] + weights(16, 48), {}, "token 1 is 64x larger than the others"),
        Case("extremes", [symmetric_rows(g, 4, 32, negative_extreme=True)] + weights(8, 32), {},
             "every token's largest |value| is negative"),
    ]


# -- 4.5 SmoothQuant ------------------------------------------------------------------------------------


def smooth64(norm_weight, weight, act_absmax, alpha):
    s = smoothing_scales(act_absmax, [weight], alpha).double()
    return norm_weight / s, weight * s


def rms_normed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()


def function_unchanged(out, norm_weight, weight, act_absmax, alpha):
    """The smoothed pair must compute what the original pair computes."""
    if not (isinstance(out, list) and len(out) == 2):
        return "must return (new_norm_weight, new_weight)"
    new_norm, new_weight = out
    if new_norm.shape != norm_weight.shape or new_weight.shape != weight.shape:
        return f"shapes {tuple(new_norm.shape)} and {tuple(new_weight.shape)}, expected those of the inputs"
    x = torch.randn(7, norm_weight.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    before = rms_normed(x, norm_weight) @ weight.double().T
    after = rms_normed(x, new_norm) @ new_weight.double().T
    if not torch.isfinite(after).all():
        return "the smoothed layer gives inf or NaN"
    if not torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item()):
        return (f"the layer no longer computes the same function: outputs differ by up to "
                f"{(after - before).abs().max().item():.3g}")
    act = act_absmax.double()
    smoothed = act * (new_norm.double() / norm_weight.double())  # each channel's largest |x| after folding
    if (smoothed.max() / smoothed.median()) > 0.5 * (act.max() / act.median()):
        return ("the same function, but the activations' outlier channels were not flattened: the norm's "
                "output channel j must be divided by s_j")
    return None


def smooth_cases(g):
    def layer(n_in, out, outliers=(3,)):
        norm = 1 + 0.1 * torch.randn(n_in, generator=g)
        weight = torch.randn(out, n_in, generator=g) * 0.05
        act = torch.rand(n_in, generator=g) * 2 + 0.5
        act[list(outliers)] *= 40  # activation outlier channels
        return [norm, weight, act]

    dead = layer(24, 16)
    dead[2][5] = 0.0  # a channel never active in calibration
    return [
        Case("values", layer(32, 20) + [0.5], {}, "32 inputs, 20 outputs, alpha 0.5: norm weight", output=0),
        Case("values", layer(32, 20) + [0.5], {}, "32 inputs, 20 outputs, alpha 0.5: weight", output=1),
        Case("alpha", layer(24, 40) + [0.8], {}, "alpha 0.8 (most of the difficulty moved to the weights)", output=1),
        Case("alpha", layer(24, 40) + [0.25], {}, "alpha 0.25", output=0),
        Case("function", layer(48, 16, outliers=(1, 7, 30)) + [0.5], {}, "norm then linear, before and after",
             judge=function_unchanged),
        Case("dead_channels", dead + [0.5], {}, "input channel 5 never active (max |x| = 0)", output=0),
    ]


# -- 4.6 GPTQ --------------------------------------------------------------------------------------------


def correlated_hessian(g, n_in: int, n_samples: int = 1024, dead: int = 0) -> torch.Tensor:
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(n_samples, n_in, generator=g) @ mix * (torch.rand(n_in, generator=g) * 2 + 0.2)
    if dead:
        x[:, :dead] = 0  # inputs never active: H singular without damping
    return (x.T @ x / n_samples).double()


def on_grid(out: torch.Tensor, bits: int, group: int) -> str | None:
    """Every group of each row takes values on one grid of 2^bits evenly spaced levels:
    at most 2^bits distinct values, whole multiples of the smallest gap apart, spanning at
    most 2^bits - 1 gaps. (Returning the weight unquantized, or a finer grid, fails here.)"""
    rows, n = out.shape
    for r in range(rows):
        for g0 in range(0, n, group):
            where = f"row {r}, inputs {g0}..{g0 + group - 1}"
            values = torch.unique(out[r, g0 : g0 + group].double())
            if len(values) > 2**bits:
                return f"{where} take {len(values)} different values, more than 2^{bits}"
            if len(values) > 2:
                gaps = values.diff()
                steps = gaps / gaps.min()
                if not torch.allclose(steps, steps.round(), atol=1e-3):
                    return f"{where}: the values are not evenly spaced codes"
                if steps.sum() > 2**bits - 1 + 1e-3:
                    return f"{where}: the values span {steps.sum():.0f} steps, more than a {bits}-bit grid's {2**bits - 1}"
    return None


def judge_gptq(claim: str):
    def judge(out, w, H, bits, group_size):
        if out.shape != w.shape:
            return f"output shape {tuple(out.shape)}, expected {tuple(w.shape)}"
        if not torch.isfinite(out).all():
            return "inf or NaN in the quantized weight"
        off_grid = on_grid(out, bits, group_size)  # every claim is about a quantized weight
        if claim == "grid" or off_grid:
            return off_grid
        error = layer_error(w, out, H)
        if claim == "beats_rtn":
            rtn = layer_error(w, formats.quantize(w, bits, False, group_size).dequantize(), H)
            return None if error < 0.85 * rtn else (
                f"output error {error:.4g} against round-to-nearest's {rtn:.4g}: GPTQ should be clearly lower")
        reference = layer_error(w, gptq_quantize(w, H, bits, group_size).dequantize(), H)
        return None if error <= 1.05 * reference + 1e-12 else (
            f"output error {error:.4g}, the reference GPTQ reaches {reference:.4g}")
    return judge


def gptq_cases(g):
    def case(check, out, n_in, bits, group, note, dead=0):
        w = torch.randn(out, n_in, generator=g) * 0.05
        return Case(check, [w, correlated_hessian(g, n_in, dead=dead), bits, group], {}, note,
                    judge=judge_gptq("grid" if check == "on_the_grid" else
                                     "reference" if check in ("matches_reference", "dead_inputs") else check))

    return [
        case("beats_rtn", 32, 64, 4, 16, "w (32, 64), 4 bits, groups of 16"),
        case("beats_rtn", 24, 96, 3, 32, "w (24, 96), 3 bits, groups of 32"),
        case("matches_reference", 32, 64, 4, 16, "w (32, 64), 4 bits, groups of 16"),
        case("matches_reference", 16, 128, 3, 128, "w (16, 128), 3 bits, one group per row"),
        case("on_the_grid", 16, 64, 4, 32, "w (16, 64), 4 bits, groups of 32"),
        case("dead_inputs", 16, 64, 4, 16, "inputs 0-3 never active: H is singular without damping", dead=4),
    ]


register(
    Task(
        id="4.1", chapter="ch04_quantization", title="int8 per output channel", function="quantize_per_channel",
        params=("w",), reference=per_channel64, make_cases=per_channel_cases,
        checks={
            "codes": Check(3, "q = round(w / scale) clamped to [-127, 127], stored as int8; scale = max |w| of the "
                              "row / 127 (round to nearest: truncating with .to(torch.int8) pulls every value "
                              "towards zero)"),
            "scales": Check(2, "one scale per output row, shape (out, 1): w.abs().amax(dim=1, keepdim=True) / 127"),
            "extremes": Check(2, "the scale comes from the largest |w|, which may be negative: abs() before amax"),
            "zero_rows": Check(1, "an all-zero row has max |w| = 0: give it scale 1 (its codes are all 0), "
                                  "not a division by zero"),
        },
        output_dtypes=(torch.int8, torch.float32), atol=1e-9, rtol=1e-6,
    ),
    Task(
        id="4.2", chapter="ch04_quantization", title="int4 per group with a zero point, packed",
        function="quantize_int4_groups", params=("w", "group_size"), reference=int4_groups64,
        make_cases=int4_cases,
        checks={
            "codes": Check(3, "q = clamp(round(w / scale) + zero, 0, 15) per group of group_size inputs, packed "
                              "two per byte: value 2i in the low nibble, value 2i + 1 in the high nibble"),
            "scales_and_zeros": Check(2, "scale = (max - min) / 15 and zero = round(-min / scale) per group, "
                                         "shapes (out, in // group_size)"),
            "range_includes_zero": Check(2, "extend the range to include 0 (min clamped to <= 0, max to >= 0), so "
                                            "that zero is a whole code and 0.0 is exact"),
        },
        output_dtypes=(torch.uint8, torch.float32, torch.float32), atol=1e-9, rtol=1e-6,
    ),
    Task(
        id="4.3", chapter="ch04_quantization", title="GGUF Q4_1 blocks from raw bytes", function="dequantize_q4_1",
        params=("raw",), reference=q4_1_64, make_cases=q4_1_cases,
        checks={
            "values": Check(3, "a block is 20 bytes: d (float16), m (float16), then 16 bytes; byte j holds value j "
                               "in its low nibble and value j + 16 in its high nibble; x = d * q + m"),
            "smollm": Check(3, "the same layout holds for the file's own rows (read the fp16 fields with "
                               ".view(torch.float16), not as integers)"),
            "constant_blocks": Check(1, "a constant block has d = 0: every value is m"),
        },
        common_checks=("inputs_unchanged",), blocked_modules=("reference_engine", "solutions", "tests", "gguf"),
        atol=1e-6, rtol=1e-6,
    ),
    Task(
        id="4.4", chapter="ch04_quantization", title="a W8A8 matmul", function="w8a8_linear",
        params=("x", "w_q", "w_scale"), reference=w8a8_64, make_cases=w8a8_cases,
        checks={
            "values": Check(3, "quantize x per token (row) to int8: scale = max |x| of the row / 127; multiply "
                               "the integer codes (int32 sums), then rescale by x_scale (tokens, 1) * w_scale^T"),
            "per_token": Check(2, "one scale per token: a single scale for the whole batch lets one large token "
                                  "crush the codes of all the others"),
            "extremes": Check(2, "the scale comes from the largest |x|, which may be negative: abs() before amax"),
        },
        rtol=1e-5, atol=1e-5,
    ),
    Task(
        id="4.5", chapter="ch04_quantization", title="SmoothQuant's scales, folded", function="smooth",
        params=("norm_weight", "weight", "act_absmax", "alpha"), reference=smooth64, make_cases=smooth_cases,
        checks={
            "values": Check(2, "s_j = act_absmax_j ** alpha / max_i |weight[i, j]| ** (1 - alpha); return "
                               "(norm_weight / s, weight * s)"),
            "alpha": Check(2, "alpha is the activations' exponent and 1 - alpha the weights'"),
            "function": Check(3, "dividing the norm's output channel j by s_j and multiplying weight column j by "
                                 "s_j leaves norm-then-linear unchanged: columns (dim 1) of weight, not rows"),
            "dead_channels": Check(1, "a channel with max |x| = 0 would get s = 0 (and a division by zero): leave "
                                      "it alone, s = 1"),
        },
        output_dtypes=(None, None), atol=1e-6, rtol=1e-5,
    ),
    Task(
        id="4.6", chapter="ch04_quantization", title="GPTQ for one layer", function="gptq",
        params=("w", "H", "bits", "group_size"), reference=lambda *args: None, make_cases=gptq_cases,
        checks={
            "beats_rtn": Check(3, "after quantizing column i, spread its error over the columns not yet "
                                  "quantized: w[:, i:] -= err * U[i, i:], with err = (w_i - q_i) / U[i, i] and "
                                  "U the upper Cholesky factor of H^-1 (not of H)"),
            "matches_reference": Check(3, "damp H (add 0.01 * mean(diag H) to the diagonal), choose each group's "
                                          "scale and zero when the sweep reaches its first column, from the "
                                          "updated weights"),
            "on_the_grid": Check(2, "return the dequantized weight: in each group, (q - zero) * scale with q in "
                                    "[0, 2^bits - 1]"),
            "dead_inputs": Check(1, "inputs never active make H singular: set H_ii = 1 and w[:, i] = 0 for them, "
                                    "and damp before the Cholesky factorisation"),
        },
        common_checks=("output_type", "inputs_unchanged"),
    ),
)
