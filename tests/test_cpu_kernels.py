"""The compiled decode kernels: the same numbers as the PyTorch path, taken only where
they compute what the modules would, and a clean fallback."""

import pytest
import torch

from reference_engine import DojoError, cpu_kernels, fused_decode
from reference_engine.generate import generate, pad_left
from reference_engine.kv_cache import dequantize_kv, quantize_kv
from reference_engine.model import PackedWeight, linear
from test_decoding import ListCache  # a learner-style cache class
from tiny_gguf import random_model


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels.kernels(build=True)  # CI's set-up has built them already
    assert built is not None, cpu_kernels.status()
    return built


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16, 17, 64])
@pytest.mark.parametrize("n_out,n_in", [(48, 32), (7, 37), (576, 1536), (1, 16), (50, 3)])
def test_packed_linear_equals_f_linear(kernels, rows, n_out, n_in):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, n_in), torch.randn(n_out, n_in)
    y = kernels.packed_linear(x, kernels.pack_weight(w), n_out)
    exact = (x.double() @ w.double().T).float()  # float32 sums of n_in terms drift like sqrt(n_in)
    torch.testing.assert_close(y, exact, rtol=1e-5, atol=2e-5 * n_in ** 0.5)


def test_kernels_reject_what_they_were_not_written_for(kernels):
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernels.packed_linear(torch.randn(2, 16), kernels.pack_weight(torch.randn(8, 17)), 8)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.pack_weight(torch.randn(8, 16, dtype=torch.float64))


def test_linear_sends_up_to_64_rows_through_the_kernel(kernels, monkeypatch):
    w, b = torch.randn(24, 16), torch.randn(24)
    packed = PackedWeight(w)
    assert packed.blocks is not None and packed.blocked is None, "one copy of the weight, not two"
    calls = []

    class Spy:
        def packed_linear(self, x, blocks, n_out):
            calls.append(tuple(x.shape))
            return kernels.packed_linear(x, blocks, n_out)

    packed.kernels = Spy()
    x = torch.randn(2, 1, 16)  # two sequences, one new token each
    torch.testing.assert_close(linear(x, w, b, packed), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    linear(torch.randn(65, 16), w, b, packed)  # 65 rows: MKL's gemm
    assert calls == [(2, 16)]


def test_argmax_rows_is_torch_argmax(kernels):
    """The first of equal values, across lanes of 16 and within one; the first NaN; rows
    of -inf; widths below 16 and past a multiple of 16."""
    torch.manual_seed(0)
    for rows, width in [(16, 49152 + 5), (1, 49152), (3, 7), (2, 16), (5, 33)]:
        x = torch.randn(rows, width)
        assert torch.equal(kernels.argmax_rows(x), x.argmax(-1)), (rows, width)
    x = torch.zeros(4, 100)
    x[0, [70, 3, 35]] = 5.0  # ties in lanes 6, 3 and 3: index 3 first
    x[1, [20, 36]] = 5.0  # one lane, two blocks of 16 apart: the earlier
    x[2, [90, 40]] = float("nan")  # the first NaN, whatever the values
    x[2, 0] = float("inf")
    x[3] = float("-inf")
    assert kernels.argmax_rows(x).tolist() == x.argmax(-1).tolist() == [3, 20, 40, 0]
    with pytest.raises(RuntimeError, match="float32"):
        kernels.argmax_rows(torch.zeros(2, 8, dtype=torch.float64))


def test_greedy_takes_the_kernel_for_contiguous_float32(kernels, monkeypatch):
    from reference_engine import generate as gen

    calls = []

    class Spy:
        def argmax_rows(self, logits):
            calls.append(tuple(logits.shape))
            return kernels.argmax_rows(logits)

    monkeypatch.setattr(cpu_kernels, "_loaded", Spy())
    logits = torch.randn(3, 50)
    assert torch.equal(gen.sample(logits), logits.argmax(-1))
    assert torch.equal(gen.greedy(logits.T), logits.T.argmax(-1))  # not contiguous: torch.argmax
    assert torch.equal(gen.greedy(logits.double()), logits.argmax(-1))
    assert calls == [(3, 50)]


def test_turned_off_kernels_report_why(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setenv("DOJO_KERNELS", "0")
    assert cpu_kernels.kernels() is None
    assert "DOJO_KERNELS=0" in cpu_kernels.status()
    packed = PackedWeight(torch.randn(24, 16))
    assert packed.blocks is None and packed.blocked is not None, "oneDNN's layout without the kernels"


# -- the fused decode step --------------------------------------------------------------


def test_fused_block_rejects_mismatched_weights(kernels):
    model = packed_llama()
    model.setup_cache(1, 8)
    layer = model.layers[0]
    plan = list(fused_decode.Plan(model).blocks[0])
    cos, sin = model.rope_cos[:1].contiguous(), model.rope_sin[:1].contiguous()
    none = torch.empty(0, dtype=torch.bool)
    with torch.inference_mode():
        kernels.llama_block_decode(torch.randn(1, 64), *plan[:7], *plan[7:9], 0, cos, sin, none, *plan[9:])
        plan[4], plan[6] = plan[6], plan[4]  # wo and w2 swapped: both give d_model outputs, from other inputs
        with pytest.raises(RuntimeError, match="a packed weight has shape"):
            kernels.llama_block_decode(torch.randn(1, 64), *plan[:7], *plan[7:9], 0, cos, sin, none, *plan[9:])
    assert layer.attn.kv_cache.k_cache[0, :, 0].abs().sum() > 0, "the first call wrote slot 0"


def packed_llama(preset="tiny", **overrides):
    model = random_model(preset, seed=3, **overrides).float()
    assert model.pack_for_cpu()
    return model


class CountingKernels:
    """The compiled module, counting calls of the fused block."""

    def __init__(self, real):
        self.real, self.blocks = real, 0

    def llama_block_decode(self, *args):
        self.blocks += 1
        return self.real.llama_block_decode(*args)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def counting(kernels, monkeypatch):
    spy = CountingKernels(kernels)
    monkeypatch.setattr(cpu_kernels, "_loaded", spy)
    return spy


def decode_logits(model, prompts, steps=5, after_prefill=None, before_clear=None):
    """Logits of a left-padded batch at every decode step, greedy; after_prefill(model) runs
    between the prompt and the first decode step, before_clear(model) after the last."""
    ids, valid, positions = pad_left(prompts)
    B, T = ids.shape
    key_valid = torch.ones(B, T + steps, dtype=torch.bool)
    key_valid[:, :T] = valid
    padded = not bool(valid.all())
    model.setup_cache(B, T + steps)
    out = []
    with torch.inference_mode():
        logits = model(ids, positions=positions, key_valid=key_valid if padded else None)[:, -1]
        pos = positions[:, -1:] + 1
        if after_prefill is not None:
            after_prefill(model)
        for step in range(steps):
            token = logits.argmax(-1)
            logits = model(token[:, None], start=T + step, positions=pos + step,
                           key_valid=key_valid if padded else None)[:, -1]
            out.append(logits)
    if before_clear is not None:
        before_clear(model)
    model.clear_cache()
    return torch.stack(out, 1)


# tiny: heads of 16 (one vector) in groups of 2; the last: 8 query heads on one KV head
# (two passes of 4 over the values) and heads of 96 (a pass of 64 outputs, then 32)
@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("tiny-mha", {}), ("tiny", {"rope_layout": "adjacent"}),
                                              ("tiny", {"n_heads": 8, "n_kv_heads": 1, "head_dim": 96})])
@pytest.mark.parametrize("prompts", [[[5, 9, 2, 7]], [[5, 9, 2, 7, 1, 4], [8, 3], [6, 6, 6, 1]]])
def test_fused_decode_equals_the_modules(counting, monkeypatch, preset, overrides, prompts):
    model = packed_llama(preset, **overrides)
    fused = decode_logits(model, prompts)
    assert counting.blocks == 5 * model.config.n_layers, "every decode step ran the fused blocks"
    monkeypatch.setattr(fused_decode, "plan_for", lambda model: None)
    modules = decode_logits(model, prompts)
    assert counting.blocks == 5 * model.config.n_layers
    torch.testing.assert_close(fused, modules, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_cache_decodes_as_the_modules_do(counting, monkeypatch, kv_dtype):
    """Keys and values stored in 16 bits (prompts past 16 slots, left-padded): the fused step
    reads a float16 cache and rounds what it writes as the modules' cache write does;
    bfloat16, which it does not read, runs the modules. Both stay near a float32 cache."""
    model = packed_llama()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (40, 17, 33)]
    full = decode_logits(model, prompts)
    model.set_kv_dtype(kv_dtype)
    model.setup_cache(1, 8)
    assert model.layers[0].attn.kv_cache.k_cache.dtype == kv_dtype
    caches = []

    def keep(model):
        caches.append([[b.clone() for b in layer.attn.kv_cache.buffers()] for layer in model.layers])

    before = counting.blocks
    rounded = decode_logits(model, prompts, before_clear=keep)
    assert counting.blocks - before == (5 * model.config.n_layers if kv_dtype == torch.float16 else 0)
    monkeypatch.setattr(fused_decode, "plan_for", lambda model: None)
    torch.testing.assert_close(rounded, decode_logits(model, prompts, before_clear=keep), rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(*caches):  # each value rounded to nearest even, as the modules' copy rounds it
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=2 ** -10, atol=0)  # keys from float32 sums in another order
            assert (a == b).float().mean() > 0.99, "the same 16 bits for nearly every value"
    assert not torch.equal(rounded, full), "the cache really holds rounded values"
    torch.testing.assert_close(rounded, full, rtol=0, atol=0.05)
    model.set_kv_cache("paged")  # the paged pool rounds the same values
    torch.testing.assert_close(decode_logits(model, prompts), rounded, rtol=1e-4, atol=1e-4)


def test_padding_slots_are_not_read(counting, monkeypatch):
    """A left-padded row's run of padding slots, cut to whole groups of 16, is skipped, not
    weighed by 0: NaN stored there does not reach the fused step's logits (the modules, which
    multiply those values by 0, give NaN), and the logits are those of clean padding."""
    model = packed_llama()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (40,), generator=g).tolist(), [5, 9, 2]]  # row 1: 37 padding slots

    def poison(model):
        for layer in model.layers:
            layer.attn.kv_cache.v_cache[1, :, :32] = float("nan")

    clean = decode_logits(model, prompts)
    before = counting.blocks
    fused = decode_logits(model, prompts, after_prefill=poison)
    assert counting.blocks - before == 5 * model.config.n_layers
    assert torch.equal(fused, clean), "the skipped slots change nothing, bit for bit"
    monkeypatch.setattr(fused_decode, "plan_for", lambda model: None)
    assert decode_logits(model, prompts, after_prefill=poison)[1].isnan().all(), "the modules read them (0 x NaN)"


def test_an_int8_cache_decodes_as_the_modules_do(counting, monkeypatch):
    """Keys and values stored as int8 codes with a scale per 32 values (prompts past 16 slots,
    left-padded; heads of 64, the unrolled attention): the fused step writes the codes the
    modules' `quantize_kv` writes (the scales up to the last bit of the keys and values they
    come from) and attends to the same dequantized values; both stay near a float32 cache,
    and not equal to it."""
    model = packed_llama(n_heads=4, n_kv_heads=2, head_dim=64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (40, 17, 33)]
    full = decode_logits(model, prompts)
    model.set_kv_dtype("int8")
    caches = []

    def keep(model):
        caches.append([[b.clone() for b in layer.attn.kv_cache.buffers()] for layer in model.layers])

    before = counting.blocks
    fused = decode_logits(model, prompts, before_clear=keep)
    assert counting.blocks - before == 5 * model.config.n_layers, "the fused step read the int8 cache"
    monkeypatch.setattr(fused_decode, "plan_for", lambda model: None)
    modules = decode_logits(model, prompts, before_clear=keep)
    torch.testing.assert_close(fused, modules, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(*caches):
        assert [b.dtype for b in mine] == [torch.int8, torch.int8, torch.float32, torch.float32]
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1]), "the same codes written"
        for a, b in zip(mine[2:], theirs[2:]):  # the scales, from keys and values equal up to float rounding
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert not torch.equal(fused, full), "the cache really holds rounded values"
    # logits up to 19 here: the 8-bit codes move them by 0.1 at most, and no greedy token
    torch.testing.assert_close(fused, full, rtol=0, atol=0.2)
    assert torch.equal(fused.argmax(-1), full.argmax(-1))


def test_a_nan_in_one_key_channel_reaches_the_int8_cache_as_the_modules_write_it(counting, monkeypatch):
    """One NaN among a block's 32 keys (channel 5 of layer 0's first KV head, from a NaN row
    of wqkv): `quantize_kv` gives that block a NaN scale and codes 0, and so must the fused
    step's cache write. A float max drops a NaN in most lanes, and wrote the block as if it
    were fine: the NaN was gone from the cache."""
    model = random_model("tiny", seed=3, n_heads=4, n_kv_heads=2, head_dim=64).float()
    with torch.no_grad():
        model.layers[0].attn.wqkv.weight[4 * 64 + 5] = float("nan")  # rows [Q (4 heads); K; V]
    assert model.pack_for_cpu()
    model.set_kv_dtype("int8")
    prompts = [[5, 6, 7], [8, 9, 10]]
    scales = []

    def keep(model):
        scales.append(model.layers[0].attn.kv_cache.k_scale.clone())  # (rows, KV, slots, 2)

    before = counting.blocks
    decode_logits(model, prompts, steps=2, before_clear=keep)
    assert counting.blocks - before == 2 * model.config.n_layers, "the fused step wrote the cache"
    monkeypatch.setattr(fused_decode, "plan_for", lambda model: None)
    decode_logits(model, prompts, steps=2, before_clear=keep)
    fused, modules = scales
    assert modules[:, 0, :, 0].isnan().all() and not modules[:, 1].isnan().any(), "quantize_kv: that block only"
    assert torch.equal(fused.isnan(), modules.isnan())


def test_int8_codes_round_each_block_of_32_to_its_own_scale():
    x = torch.randn(3, 2, 5, 64) * torch.logspace(-3, 2, 64)  # blocks of very different ranges
    x[0, 0, 0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and scale.shape == (3, 2, 5, 2)
    blocks = x.unflatten(-1, (2, 32))
    assert torch.equal(scale, blocks.abs().amax(-1) / 127) and codes.abs().max() == 127
    assert scale[0, 0, 0, 0] == 0 and not codes[0, 0, 0, :32].any()
    error = (dequantize_kv(codes, scale) - x).unflatten(-1, (2, 32)).abs()
    assert (error <= scale[..., None] / 2 * (1 + 1e-6)).all(), "half a step at most, block by block"
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5] + [0.0] * 27)  # scale 1: x / scale lands on .5
    assert quantize_kv(ties)[0][:5].tolist() == [127, 0, 2, 2, 0], "half to even, as the kernel's nearbyint"


def test_kv_dtypes_the_cache_cannot_store_are_refused():
    with pytest.raises(DojoError, match="float32, float16, bfloat16 or int8"):
        packed_llama().set_kv_dtype(torch.int16)
    model = packed_llama()  # heads of 16: no whole block of 32
    model.set_kv_dtype("int8")
    with pytest.raises(DojoError, match="multiple of 32 values; this model's have 16"):
        model.setup_cache(1, 8)
    model = packed_llama(head_dim=32)
    model.set_kv_dtype(torch.int8)
    model.set_kv_cache("paged")
    with pytest.raises(DojoError, match="the int8 KV cache is the static one"):
        model.setup_cache(1, 8)


def test_fused_generation_equals_the_modules(counting, monkeypatch):
    model = packed_llama()
    prompts = [[5, 9, 2, 7, 1], [8, 3]]
    fused = generate(model, prompts, max_new_tokens=12)
    assert counting.blocks > 0
    monkeypatch.setattr(fused_decode, "plan_for", lambda model: None)
    assert generate(model, prompts, max_new_tokens=12).tokens == fused.tokens


def swap_attention(model):
    calls = []

    def mine(q, k, v, mask, is_causal):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                                enable_gqa=True)

    model.set_attention(mine)
    return calls


def register_hook(model):
    calls = []
    model.layers[1].mlp.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    return calls


@pytest.mark.parametrize("change", ["attention function", "cache class", "paged cache", "forward hook",
                                    "weight edited", "autograd"])
def test_anything_swapped_in_runs_instead_of_the_fused_step(counting, change):
    """A learner's attention, cache or hook must run: the fused step would bypass it."""
    model = packed_llama()
    seen = []
    if change == "attention function":
        seen = swap_attention(model)
    elif change == "cache class":
        model.set_kv_cache(ListCache)
    elif change == "paged cache":
        model.set_kv_cache("paged")
    elif change == "forward hook":
        seen = register_hook(model)
    elif change == "weight edited":
        with torch.no_grad():
            model.layers[0].mlp.w2.weight.mul_(0.5)
    ids = torch.tensor([[5, 9, 2, 7]])
    if change == "autograd":
        model.setup_cache(1, 8)
        model(ids)
        model(torch.tensor([[3]]), start=4).sum().backward()
        assert model.layers[0].mlp.w2.weight.grad is not None
    else:
        generate(model, ids.tolist(), max_new_tokens=4)
    assert counting.blocks == 0
    if change in ("attention function", "forward hook"):
        assert len(seen) == 4 * (model.config.n_layers if change == "attention function" else 1)


@pytest.mark.parametrize("preset,overrides", [("tiny-gpt2", {}), ("tiny", {"head_dim": 24})])
def test_fused_step_is_only_for_the_llama_family(counting, preset, overrides):
    """Not for other families, nor for heads the compiled attention's 16-float vectors do not tile."""
    model = random_model(preset, seed=3, **overrides).float()
    assert model.pack_for_cpu()
    generate(model, [[5, 9, 2]], max_new_tokens=3)
    assert counting.blocks == 0


def test_a_change_between_steps_is_seen_at_the_next_step(counting, monkeypatch):
    """The fused step's plan is gathered once; a hook, a new attention function or a
    reordered cache between two steps must still be honoured at the very next step."""
    model = packed_llama()
    n = model.config.n_layers

    def steps(model):
        model.setup_cache(2, 16)
        out, hooked = [], []
        with torch.inference_mode():
            model(torch.tensor([[5, 9, 2, 7], [1, 2, 3, 4]]))
            out.append(model(torch.tensor([[3], [8]]), start=4))
            handle = model.layers[1].register_forward_hook(lambda mod, args, y: hooked.append(y.shape))
            out.append(model(torch.tensor([[4], [4]]), start=5))
            handle.remove()
            out.append(model(torch.tensor([[6], [1]]), start=6))
            model.reorder_cache(torch.tensor([1, 1]))  # beam search: both rows become row 1
            out.append(model(torch.tensor([[2], [2]]), start=7))
            calls = swap_attention(model)
            out.append(model(torch.tensor([[7], [7]]), start=8))
        model.set_attention("sdpa")
        model.clear_cache()
        return torch.cat(out, 1), len(hooked), len(calls)

    fused, hooked, calls = steps(model)
    assert (hooked, calls) == (1, n)
    assert counting.blocks == 3 * n, "fused at steps 1, 3 and 4; the modules at steps 2 and 5"
    monkeypatch.setattr(fused_decode, "plan_for", lambda model: None)
    torch.testing.assert_close(fused, steps(model)[0], rtol=1e-4, atol=1e-4)


def test_a_lock_left_by_an_interrupted_build_never_hangs(tmp_path, monkeypatch, capsys):
    """PyTorch's builder waits for its lock file forever; a build killed mid-way leaves one."""
    import os
    import time

    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setenv("DOJO_KERNEL_DIR", str(tmp_path))
    folder = cpu_kernels.build_dir()
    folder.mkdir(parents=True)
    (folder / "dojo_decode_kernels.so").write_bytes(b"")
    (folder / "lock").touch()
    monkeypatch.setattr(cpu_kernels, "LOAD_WAIT_S", 0.3)
    started = time.monotonic()
    assert cpu_kernels.kernels() is None, "loading waits a little for another process's lock, not forever"
    assert 0.3 <= time.monotonic() - started < 5 and "interrupted" in cpu_kernels.status()
    assert cpu_kernels.wait_for_lock(folder / "no-lock", 0.0)
    old = time.time() - 400
    os.utime(folder / "lock", (old, old))
    assert cpu_kernels.clear_stale_lock(folder / "lock")
    assert not (folder / "lock").exists() and "interrupted kernel build" in capsys.readouterr().err
    (folder / "lock").touch()
    started = time.time()
    assert cpu_kernels.clear_stale_lock(folder / "lock", wait_s=1.5), "a fresh lock is waited for, then cleared"
    assert time.time() - started >= 1.0


@pytest.mark.parametrize("tied", [True, False])
def test_roofline_of_a_float32_model(kernels, tied):
    """float32 weights: the FMA ceiling, the packed matmuls, the head (the embedding, or its own matrix)."""
    from reference_engine.roofline import run_roofline

    model = packed_llama(tie_embeddings=tied)
    assert ("lm_head" in model._modules) != tied
    c = model.config
    r = run_roofline(model, slots=20, rounds=1)
    assert not r["int8"] and r["matmuls"] == 4 * c.n_layers + 1 and r["peak_with_scales_macs_per_s"] is None
    d, f, qkv = c.d_model, c.ffn_dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    assert r["macs_per_row"] == c.n_layers * (d * qkv + c.n_heads * c.head_dim * d + 3 * d * f) + c.vocab_size * d
    assert 0 < r["matmul_fraction_of_peak"] < 1 and r["slots"] == 20
    assert model.layers[0].attn.kv_cache is None, "the cache it set up is cleared"
    assert torch.is_grad_enabled(), "and autograd is as it was"


def test_roofline_with_an_int8_cache(kernels):
    """The roofline fills an int8 cache with codes and scales before timing attention over it."""
    from reference_engine.roofline import run_roofline

    model = packed_llama(n_heads=2, n_kv_heads=1, head_dim=32)
    model.set_kv_dtype("int8")
    r = run_roofline(model, slots=20, rounds=1)
    assert r["step_ms"]["batch16"] > 0 and model.layers[0].attn.kv_cache is None
