"""The compiled integer matmul on quantized weights (`csrc/quant_matmul.cpp`) and the fused
decode step with quantized weights: the same numbers as the PyTorch path, which does the
same arithmetic in float; taken only where it applies; a clean fallback elsewhere."""

import pytest
import torch

from reference_engine import cpu_kernels, fused_decode
from reference_engine.compression import formats, gguf_blocks
from reference_engine.compression.kernel_layout import quantize_activations, unsigned_codes
from reference_engine.compression.qlinear import QuantizedLinear
from reference_engine.generate import generate
from test_cpu_kernels import CountingKernels, decode_logits
from tiny_gguf import random_model

# every storage the kernel covers: GGUF blocks, and integer codes at 8, 4 and 3 bits
COVERED = {
    "Q4_1": lambda w: QuantizedLinear.from_blocks(gguf_blocks.quantize_blocks(w, "Q4_1"), "Q4_1", w.shape[1]),
    "Q4_0": lambda w: QuantizedLinear.from_blocks(gguf_blocks.quantize_blocks(w, "Q4_0"), "Q4_0", w.shape[1]),
    "Q8_0": lambda w: QuantizedLinear.from_blocks(gguf_blocks.quantize_blocks(w, "Q8_0"), "Q8_0", w.shape[1]),
    "int8": lambda w: QuantizedLinear.from_quantized(formats.quantize(w, 8, True, "channel")),
    "int8-g64-zero": lambda w: QuantizedLinear.from_quantized(formats.quantize(w, 8, False, 64)),
    "int4-g32-zero": lambda w: QuantizedLinear.from_quantized(formats.quantize(w, 4, False, 32)),
    "int4-g64": lambda w: QuantizedLinear.from_quantized(formats.quantize(w, 4, True, 64)),
    "int4-channel": lambda w: QuantizedLinear.from_quantized(formats.quantize(w, 4, True, "channel")),
    "int3-g32-zero": lambda w: QuantizedLinear.from_quantized(formats.quantize(w, 3, False, 32)),
}


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels.kernels(build=True)  # CI's set-up has built them already
    assert built is not None, cpu_kernels.status()
    return built


def test_this_machine_runs_the_vector_path(kernels):
    """CI's CPU has AVX-512 VNNI: the vector tiles, not only their plain twin, are tested here."""
    assert kernels.have_vnni()


# the vector path quantizes 16 blocks at a time: fewer than 16 in all (1 and 3 rows of 3
# blocks), groups that span rows (8, 13, 64), and groups inside one row (1536 inputs: 48 blocks)
@pytest.mark.parametrize("rows,n_in", [(1, 96), (3, 96), (8, 96), (13, 96), (64, 96), (3, 1536)])
def test_activation_codes_equal_the_pytorch_rounding(kernels, rows, n_in):
    torch.manual_seed(rows)
    nb = n_in // 32
    x = torch.randn(rows, n_in) * torch.logspace(-3, 2, n_in)  # blocks with small and large ranges
    x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    for simd in (True, False):
        a, dx, sx = kernels.quantize_rows(x, simd=simd)
        assert torch.equal((a.float().view(rows, nb, 32) * dx[..., None]).view(rows, n_in), quantize_activations(x))
        assert torch.equal(sx, dx * a.view(rows, nb, 32).sum(-1).float())
    ties = torch.tensor([[0.5, 1.5, 2.5, -0.5, 127.0] + [0.0] * 27])  # scale 1: x / dx lands on .5
    a, dx, _ = kernels.quantize_rows(ties)
    assert dx[0, 0] == 1.0 and a[0, :5].tolist() == [0, 2, 2, 0, 127], "half to even, as torch.round"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("rows,at", [(16, (5, 0)), (16, (5, 19)), (16, (5, 31)), (3, (2, 500))])
def test_a_nan_or_an_infinity_in_the_activations_comes_out_as_nan(kernels, bad, rows, at):
    """As in the PyTorch twin: the bad value's block is all NaN, and so is its row of the
    product, down both paths. A max that skipped the NaN (by lane: 0, 19 and 31 of a block
    were treated differently) would quantize the rest of the block and hide it. Row 2 of 3
    at column 500 lies in the blocks left after the groups of 16."""
    torch.manual_seed(rows)
    layer = COVERED["Q4_1"](torch.randn(37, 576))
    assert layer.prepare_kernel()
    k = layer.kernel
    x = torch.randn(rows, 576)
    x[at] = bad
    twin = quantize_activations(x)
    others = torch.arange(rows) != at[0]
    for simd in (True, False):
        a, dx, _ = kernels.quantize_rows(x, simd=simd)
        codes = (a.float().view(rows, 18, 32) * dx[..., None]).view(rows, 576)
        assert torch.equal(codes.isnan(), twin.isnan()) and twin.isnan().sum() == 32
        y = kernels.quant_linear(x, k.codes, k.d, k.m, 37, simd=simd)
        assert y[at[0]].isnan().all() and not y[others].isnan().any()


@pytest.mark.parametrize("name", sorted(COVERED))
@pytest.mark.parametrize("n_out,n_in", [(37, 64), (960, 576), (576, 1536)])
def test_integer_matmul_equals_its_arithmetic_in_float64(kernels, name, n_out, n_in):
    torch.manual_seed(n_out)
    w = torch.randn(n_out, n_in)
    layer = COVERED[name](w)
    assert layer.prepare_kernel() and layer.activations == "int8"
    k = layer.kernel
    for rows in (1, 5, 16, 64):
        x = torch.randn(rows, n_in) * 3
        exact = quantize_activations(x).double() @ layer.dequantized_weight().double().T
        y = kernels.quant_linear(x, k.codes, k.d, k.m, n_out)
        assert torch.equal(y, kernels.quant_linear(x, k.codes, k.d, k.m, n_out, simd=False)), "vector == plain loop"
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


def test_the_layout_keeps_the_files_q4_1_values_exactly():
    """d * u + m in the kernel's layout is the file's own dequantization, value for value."""
    w = torch.randn(48, 96)
    layer = COVERED["Q4_1"](w)
    u, d, m, bits = unsigned_codes(layer)
    rebuilt = u.float().view(48, 3, 32) * d[..., None] + m[..., None]
    assert bits == 4 and torch.equal(rebuilt.view(48, 96), layer.dequantized_weight())


@pytest.mark.parametrize("name", sorted(COVERED))
def test_layer_with_and_without_the_kernel(kernels, name, monkeypatch):
    """The module's forward runs the kernel where built and the PyTorch twin otherwise: same numbers."""
    torch.manual_seed(1)
    layer = COVERED[name](torch.randn(40, 64))
    layer.register_buffer("bias", torch.randn(40))
    assert layer.prepare_kernel()
    x = torch.randn(2, 3, 64)
    compiled = layer(x)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    torch.testing.assert_close(compiled, layer(x), rtol=1e-5, atol=1e-5)


def test_formats_the_kernel_does_not_cover_stay_as_they_were():
    torch.manual_seed(2)
    w = torch.randn(40, 64)
    for layer in (QuantizedLinear.w8a8(w), QuantizedLinear.from_quantized(formats.quantize(w, 4, False, 16)),
                  QuantizedLinear.from_quantized(formats.quantize(torch.randn(8, 48), 8, True, "channel"))):
        x = torch.randn(3, layer.in_features)
        before = layer(x)
        assert not layer.prepare_kernel() and layer.activations == "float" and layer.kernel is None
        assert torch.equal(layer(x), before)


def test_an_edited_code_is_seen(kernels):
    """A buffer edited in place after the repack makes the copy stale: the PyTorch twin runs, on the new codes."""
    layer = COVERED["Q8_0"](torch.randn(32, 64))
    assert layer.prepare_kernel()
    x = torch.randn(1, 64)
    before = layer(x)
    with torch.no_grad():
        layer.raw.view(32, 2, 34)[:, :, 2:] = 0  # every code 0: the weight is now all zeros
    assert not layer.kernel.current(layer)
    assert torch.equal(layer(x), torch.zeros(1, 32)) and not torch.equal(before, torch.zeros(1, 32))
    assert layer.prepare_kernel() and layer.kernel.current(layer), "preparing again repacks"


def test_kernel_rejects_a_weight_of_the_wrong_shape(kernels):
    layer = COVERED["Q4_1"](torch.randn(32, 64))
    layer.prepare_kernel()
    k = layer.kernel
    with pytest.raises(RuntimeError, match="does not fit 96 inputs"):
        kernels.quant_linear(torch.randn(1, 96), k.codes, k.d, k.m, 32)
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels.quant_linear(torch.randn(1, 64), k.codes, k.d, k.m, 48)


# -- whole models --------------------------------------------------------------------------

FORMATS = ["q4_1", "q4_0", "q8_0", "int8", "int4-g32", "int3-g32"]


def quantized_tiny(fmt):
    model = random_model("tiny", seed=3).float().quantize(fmt)
    assert model.pack_for_cpu()
    return model


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_quantized_decode_equals_the_modules(kernels, monkeypatch, fmt):
    """Padded batch of three prompts: the fused step with quantized weights gives the
    logits of the modules (whose matmuls are the same integer kernel, one call each)."""
    model = quantized_tiny(fmt)
    spy = CountingKernels(kernels)
    monkeypatch.setattr(cpu_kernels, "_loaded", spy)
    prompts = [[5, 9, 2, 7, 1, 4], [8, 3], [6, 6, 6, 1]]
    fused = decode_logits(model, prompts)
    assert spy.blocks == 5 * model.config.n_layers, "every decode step ran the fused blocks"
    monkeypatch.setattr(fused_decode, "plan_for", lambda model: None)
    torch.testing.assert_close(fused, decode_logits(model, prompts), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)  # no kernels at all: the PyTorch twin
    torch.testing.assert_close(fused, decode_logits(model, prompts), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["fp32", "q4_1"])
def test_fused_decode_over_long_padded_prompts(kernels, monkeypatch, fmt):
    """Prompts longer than 16 slots, left-padded: the fused attention's vector softmax runs
    over whole 16-slot chunks that contain padding (which must weigh exactly nothing)."""
    model = random_model("tiny", seed=3).float()
    if fmt != "fp32":
        model.quantize(fmt)
    assert model.pack_for_cpu()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (40, 17, 33)]
    spy = CountingKernels(kernels)
    monkeypatch.setattr(cpu_kernels, "_loaded", spy)
    fused = decode_logits(model, prompts)
    assert spy.blocks == 5 * model.config.n_layers
    monkeypatch.setattr(fused_decode, "plan_for", lambda model: None)
    torch.testing.assert_close(fused, decode_logits(model, prompts), rtol=1e-4, atol=1e-4)


def test_fused_quantized_generation_equals_the_modules(kernels, monkeypatch):
    model = quantized_tiny("q4_1")
    prompts = [[5, 9, 2, 7, 1], [8, 3]]
    fused = generate(model, prompts, max_new_tokens=12)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    assert generate(model, prompts, max_new_tokens=12).tokens == fused.tokens


def test_weight_only_models_keep_float_activations(kernels):
    """quantize() alone is weight-only (chapter 4's figures); pack_for_cpu switches to int8 activations."""
    model = random_model("tiny", seed=3).float().quantize("q4_1")
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        weight_only = model(ids)
        assert all(m.activations == "float" for m in model.modules() if isinstance(m, QuantizedLinear))
        model.pack_for_cpu()
        assert all(m.activations == "int8" for m in model.modules() if isinstance(m, QuantizedLinear))
        with_int8 = model(ids)
    assert not torch.equal(weight_only, with_int8)
    assert (weight_only - with_int8).abs().max() < 0.1 * weight_only.abs().max(), "close, as 8 bits are"


def forced_logits(model, ids: list[int], steps: int) -> torch.Tensor:
    """Prefill all but the last `steps` tokens, then feed those one decode step at a time:
    the logits of each step (1, steps, vocab), for the same tokens whatever the model predicts."""
    model.setup_cache(1, len(ids))
    out = []
    with torch.inference_mode():
        model(torch.tensor([ids[:-steps]]))
        for i in range(len(ids) - steps, len(ids)):
            out.append(model(torch.tensor([[ids[i]]]), start=i)[:, -1])
    model.clear_cache()
    return torch.stack(out, 1)


def kl_per_token(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    p, q = reference.log_softmax(-1), other.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def test_smollm_q4_1_decodes_through_the_fused_kernels(kernels, monkeypatch):
    """SmolLM2 as shipped, through the fused integer path, against the dequantized float32
    reference and against its own PyTorch twin.

    subtle: the twin does the same arithmetic, but not bit for bit (float sums in another
    order), and an activation that lands near a rounding boundary gets the neighbouring
    int8 code in one of them; over 30 blocks that moves logits by up to ~1 (measured 0.89)
    with a KL of ~0.003 nats, as large as the KL that 8-bit activations cause in the first
    place. So the model-level check is a KL bound; the layer-level checks above are exact."""
    from reference_engine import load_model

    model, tok = load_model(quantize="q4_1")
    ids = tok.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    spy = CountingKernels(kernels)
    monkeypatch.setattr(cpu_kernels, "_loaded", spy)
    fused = forced_logits(model, ids, steps=4)
    assert spy.blocks == 4 * 30, "every step ran the fused blocks"
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    twin = forced_logits(model, ids, steps=4)
    reference, _ = load_model(pack=False)
    exact = forced_logits(reference, ids, steps=4)
    for name, other in [("compiled", fused), ("PyTorch twin", twin)]:
        kl = kl_per_token(exact, other)
        assert kl.max() < 0.05, f"{name}: KL against the dequantized reference {kl.tolist()}"
    assert kl_per_token(twin, fused).max() < 0.02


@pytest.mark.parametrize("change", ["codes edited", "bias added"])
def test_a_changed_quantized_layer_stops_the_fused_step_at_the_next_step(kernels, monkeypatch, change):
    model = quantized_tiny("q4_1")
    w2, n = model.layers[1].mlp.w2, model.config.n_layers
    spy = CountingKernels(kernels)
    monkeypatch.setattr(cpu_kernels, "_loaded", spy)
    model.setup_cache(1, 16)
    with torch.inference_mode():
        model(torch.tensor([[5, 9, 2, 7]]))
        model(torch.tensor([[3]]), start=4)
        assert spy.blocks == n
        if change == "codes edited":
            w2.raw.view(-1, 20)[:, 4:] = 0  # every nibble 0: only the block mins remain
        else:
            w2.bias = torch.ones(64)  # the fused block has no bias
        changed = model(torch.tensor([[3]]), start=5)
    assert spy.blocks == n, "the changed layer made the step run as modules"
    if change == "codes edited":
        w2.prepare_kernel()
        with torch.inference_mode():
            assert torch.allclose(model(torch.tensor([[3]]), start=5), changed, atol=1e-4), "the modules used the edit"
        assert spy.blocks == 2 * n, "repacked: fused again"


def test_gptq_layers_get_the_kernels_too(kernels, monkeypatch):
    """GPTQ builds its layers under inference_mode (tensors without version counters)."""
    model = random_model("tiny", seed=3).float()
    calibration = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    model.quantize("int4-g32-gptq", calibration=calibration)
    assert model.pack_for_cpu()
    assert all(m.kernel is not None for m in model.modules() if isinstance(m, QuantizedLinear))
    spy = CountingKernels(kernels)
    monkeypatch.setattr(cpu_kernels, "_loaded", spy)
    fused = decode_logits(model, [[5, 9, 2, 7], [8, 3]])
    assert spy.blocks == 5 * model.config.n_layers
    monkeypatch.setattr(fused_decode, "plan_for", lambda model: None)
    torch.testing.assert_close(fused, decode_logits(model, [[5, 9, 2, 7], [8, 3]]), rtol=1e-4, atol=1e-4)
