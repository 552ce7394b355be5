"""`bench --roofline`: where a decode step's time goes at batch 1 and at batch 16, set
against this machine's own ceilings measured in the same run.

A decode step reads every weight once, whatever the batch, and does one multiply-add per
weight per row. So at batch 1 it waits on memory (bytes / bandwidth), and from some batch
on it waits on arithmetic (rows x multiply-adds / the matmuls' rate). Where the two meet
is the ridge:

    rows at the ridge = (bytes of weights / read bandwidth) / (multiply-adds per row / matmul rate)

Past the ridge, a batch of B rows costs at least B times the per-row arithmetic, so

    batch-B tokens/s / batch-1 tokens/s  <=  t(batch-1 step) x matmul rate / multiply-adds per row

however well the rest is done. 4-bit weights pull the ridge two ways: they are about a
sixth of float32's bytes (SmolLM2: 97 MB against 538; batch 1 gets faster), which moves it
down, and the integer dot products that multiply them do 4x as many multiply-adds per
instruction as float32 FMAs, which raises the rate and moves it back up, by less (the tile
also scales every block's sum): 3.5-4x float32's rate here, so at one bandwidth the ridge
ends at about 0.65-0.75 of float32's. Both figures come out of this run: the ceilings from
loops of nothing but the instruction (`csrc/ceilings.cpp`; for int8, also with the float
work the integer matmul does per row and block of 32 inputs, which shares the vector units
with the dot products), the matmul rate from every matmul of a step called at 16 rows, the
step times from the fused decode step at batch 1 and 16, in alternating rounds.
"""

from __future__ import annotations

import statistics
import time

import torch

from . import cpu_kernels, fused_decode
from .bench import bandwidth_buffer, format_rows, read_bandwidth, weight_bytes_per_token
from .compression.qlinear import QuantizedLinear
from .errors import DojoError

ROWS = 16  # the batch the roofline is drawn for (bench's batch 16)
PEAK_ITERATIONS = 20_000_000  # 160 M instructions per thread: about 20 ms


def matmul_calls(model, plan) -> list[tuple]:
    """(call, n_in, n_out) for every matmul of a decode step, the head last: the compiled
    kernel itself, on the parts the fused step multiplies by (`fused_decode.weight_parts`),
    without the module's Python around it (a few us a call, 5-10% at 16 rows)."""
    kernels = cpu_kernels._loaded

    def call_of(parts, n_out):
        if len(parts) == 1:  # [packed] float32
            return lambda x: kernels.packed_linear(x, parts[0], n_out)
        return lambda x: kernels.quant_linear(x, *parts, n_out)  # [codes, d, m]

    calls = [(call_of(fused_decode.weight_parts(lin), lin.out_features), lin.in_features, lin.out_features)
             for lin in plan.linears]
    head = model._modules.get("lm_head")
    if head is not None:  # its own matrix (untied, or a quantized copy of the tied one)
        parts = fused_decode.weight_parts(head)
        if parts is None:
            raise DojoError("--roofline needs the LM head in a layout the compiled kernels multiply, and this "
                            "model's head runs in PyTorch (its format is not one the integer kernels cover)")
        calls.append((call_of(parts, head.out_features), head.in_features, head.out_features))
    else:
        n_out, n_in = model.tok_embeddings.weight.shape
        calls.append((call_of([model.tied_head_packed.blocks], n_out), n_in, n_out))
    return calls


def time_matmuls(calls, rows: int, rounds: int) -> float:
    """Seconds for every matmul once at `rows` rows, in order (each weight read from memory,
    as in decoding): the median of `rounds`."""
    inputs = {n_in: torch.randn(rows, n_in) for _, n_in, _ in calls}
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for call, n_in, _ in calls:
            call(inputs[n_in])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_timer(model, plan, rows: int, slot: int):
    """A function timing one fused decode step (embedding, every block, norm, head) for
    `rows` rows writing cache slot `slot`, attending over slots 0..slot."""
    ids = torch.randint(0, model.config.vocab_size, (rows, 1))
    positions = torch.full((rows, 1), slot)

    def run() -> float:
        t0 = time.perf_counter()
        fused_decode.forward(model, plan, ids, slot, positions, None)
        return time.perf_counter() - t0
    return run


def run_roofline(model, slots: int = 100, rounds: int = 7) -> dict:
    """The figures of the module docstring for `model` (quantized or float32, on the CPU),
    with a cache of `slots` slots (at most the model's context) for the step times."""
    with torch.no_grad():
        return _measure(model, min(slots, model.config.max_seq_len - 1), rounds)


def _measure(model, slots: int, rounds: int) -> dict:
    kernels = cpu_kernels.kernels()  # loads them where built, never builds
    if kernels is None:
        raise DojoError(f"--roofline times the compiled decode step, and the kernels are {cpu_kernels.unavailable()}")
    model.setup_cache(ROWS, slots + 1)
    plan = fused_decode.plan_for(model)
    if plan is None:
        raise DojoError("--roofline times the compiled decode step, which does not run this model: it takes float32 "
                        "weights or a format the integer kernels cover (q4_1, q4_0, q8_0, int8, int4-gG) on the CPU, "
                        "with a float32, float16 or int8 KV cache")
    for layer in model.layers:  # a cache of plausible values: attention reads them at every step
        cache = layer.attn.kv_cache
        for t in (cache.k_cache, cache.v_cache):
            t.random_(-127, 128) if t.dtype == torch.int8 else t.normal_()
        for t in (getattr(cache, "k_scale", None), getattr(cache, "v_scale", None)):
            if t is not None:
                t.fill_(1 / 127)
    quantized = any(isinstance(lin, QuantizedLinear) for lin in plan.linears)
    peak = kernels.peak_multiply_adds(quantized, PEAK_ITERATIONS)
    with_scales = kernels.peak_multiply_adds(True, PEAK_ITERATIONS, scales=True) if quantized else None
    calls = matmul_calls(model, plan)
    per_row = sum(n_in * n_out for _, n_in, n_out in calls)  # multiply-adds per row per step
    bandwidth = read_bandwidth(bandwidth_buffer(), repeats=5)
    steps = {"batch1": step_timer(model, plan, 1, slots), f"batch{ROWS}_slot1": step_timer(model, plan, ROWS, 1),
             f"batch{ROWS}": step_timer(model, plan, ROWS, slots)}
    for run in steps.values():
        run()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(rounds):  # alternating, so that a change of the machine's state lands on all of them
        for name, run in steps.items():
            times[name].append(run())
    step = {name: statistics.median(t) for name, t in times.items()}
    matmul_s = time_matmuls(calls, ROWS, rounds)
    weight_bytes = weight_bytes_per_token(model)
    rate = ROWS * per_row / matmul_s
    model.clear_cache()
    return {
        "threads": torch.get_num_threads(), "int8": quantized, "slots": slots, "rows": ROWS,
        "peak_macs_per_s": peak, "peak_with_scales_macs_per_s": with_scales, "read_bandwidth_gb_s": bandwidth / 1e9,
        "weight_mb_per_token": weight_bytes / 1e6, "macs_per_row": per_row, "matmuls": len(calls),
        "matmul_ms": matmul_s * 1e3, "matmul_macs_per_s": rate, "matmul_fraction_of_peak": rate / peak if peak else None,
        "step_ms": {name: s * 1e3 for name, s in step.items()},
        "weights_at_bandwidth_ms": weight_bytes / bandwidth * 1e3,
        "ridge_rows": (weight_bytes / bandwidth) / (per_row / rate),
        "batch_ratio": ROWS * step["batch1"] / step[f"batch{ROWS}"],
        "batch_ratio_slot1": ROWS * step["batch1"] / step[f"batch{ROWS}_slot1"],
        "batch_ratio_bound": step["batch1"] * rate / per_row,
    }


def format_roofline(r: dict) -> str:
    kind = "int8 dot products (AVX-512 VNNI)" if r["int8"] else "float32 FMA (AVX-512)"
    peak = (f"{r['peak_macs_per_s'] / 1e9:.0f} G multiply-adds/s of {kind} on {r['threads']} threads"
            if r["peak_macs_per_s"] else f"not measured (the build has no {kind})")
    of_peak = f", {r['matmul_fraction_of_peak']:.0%} of the ceiling" if r["matmul_fraction_of_peak"] else ""
    s, n = r["step_ms"], r["rows"]
    rows = [("arithmetic ceiling", peak)]
    if r["peak_with_scales_macs_per_s"]:
        rows.append(("with the scales' float work", f"{r['peak_with_scales_macs_per_s'] / 1e9:.0f} G/s "
                     f"({r['peak_with_scales_macs_per_s'] / r['peak_macs_per_s']:.0%}): 8 dot products, then a "
                     "conversion, a multiply and two multiply-adds, as the integer matmul does per row and block"))
    rows += [
        ("read bandwidth", f"{r['read_bandwidth_gb_s']:.1f} GB/s"),
        (f"matmuls at {n} rows", f"{r['matmuls']} (every one of a step, the head last): {n} x "
                                 f"{r['macs_per_row'] / 1e6:.0f} M multiply-adds in {r['matmul_ms']:.2f} ms = "
                                 f"{r['matmul_macs_per_s'] / 1e9:.0f} G/s{of_peak}"),
        ("decode step, batch 1", f"{s['batch1']:.2f} ms at slot {r['slots']} (its {r['weight_mb_per_token']:.0f} MB "
                                 f"of weights take {r['weights_at_bandwidth_ms']:.2f} ms at that bandwidth)"),
        (f"decode step, batch {n}", f"{s[f'batch{n}_slot1']:.2f} ms at slot 1, {s[f'batch{n}']:.2f} ms at slot "
                                    f"{r['slots']} (attention over the cache: the difference)"),
        (f"batch {n} / batch 1 (tokens/s)", f"{r['batch_ratio']:.1f}x at slot {r['slots']}, "
                                            f"{r['batch_ratio_slot1']:.1f}x at slot 1"),
        ("ridge", f"{r['ridge_rows']:.1f} rows: from there on the matmuls alone outlast the weights' read"),
        (f"bound on batch {n} / batch 1", f"{r['batch_ratio_bound']:.1f}x = batch-1 step x matmul rate / multiply-adds "
                                          "per row: what a step made only of its matmuls would give"),
    ]
    return format_rows(rows)
