"""The forward pass: cached decoding, masks and attention paths agree with plain recomputation."""

import pytest
import torch

from reference_engine import cpu_kernels
from reference_engine.attention import attention, sdpa_math
from reference_engine.generate import pad_left
from reference_engine.model import PackedWeight, linear


def test_logits_shape_and_dtype(any_tiny):
    ids = torch.randint(0, any_tiny.config.vocab_size, (2, 7))
    logits = any_tiny(ids)
    assert logits.shape == (2, 7, any_tiny.config.vocab_size)
    assert logits.dtype == torch.float32


def test_kv_cached_decode_equals_full_recomputation(any_tiny):
    ids = torch.randint(0, any_tiny.config.vocab_size, (2, 12))
    full = any_tiny(ids)  # (2, 12, V), no cache
    any_tiny.setup_cache(2, 16)
    step_logits = [any_tiny(ids[:, :5], start=0)]  # prefill 5
    for t in range(5, 12):
        step_logits.append(any_tiny(ids[:, t:t + 1], start=t))  # one token at a time
    any_tiny.clear_cache()
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_full_recomputation(any_tiny):
    ids = torch.randint(0, any_tiny.config.vocab_size, (1, 10))
    any_tiny.setup_cache(1, 10)
    chunks = [any_tiny(ids[:, :4], start=0), any_tiny(ids[:, 4:10], start=4)]  # start > 0, T > 1
    any_tiny.clear_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), any_tiny(ids), rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_a_row(any_tiny):
    long, short = [5, 6, 7, 8, 9, 10], [11, 12, 13]
    ids, valid, positions = pad_left([long, short])
    key_valid = valid.clone()
    padded = any_tiny(ids, positions=positions, key_valid=key_valid)
    alone = any_tiny(torch.tensor([short]))
    torch.testing.assert_close(padded[1, -3:], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all(), "padding rows must stay finite (NaN would leak)"


def test_future_tokens_do_not_change_past_logits(any_tiny):
    ids = torch.randint(0, any_tiny.config.vocab_size, (1, 9))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % any_tiny.config.vocab_size
    torch.testing.assert_close(any_tiny(ids)[:, :6], any_tiny(changed)[:, :6])


@pytest.mark.parametrize("T,L,H,KV", [(1, 9, 6, 2), (1, 9, 4, 4), (5, 5, 6, 3), (4, 4, 4, 1)])
def test_fast_attention_matches_the_formula(T, L, H, KV):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, H, T, 8), torch.randn(2, KV, L, 8), torch.randn(2, KV, L, 8)
    expected = sdpa_math(q, k, v, is_causal=True)
    torch.testing.assert_close(attention(q, k, v, None, is_causal=T > 1), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["compiled", "oneDNN"])
def packed_layout(request, monkeypatch):
    """PackedWeight in the compiled kernels' layout (built by set-up) or, without them, oneDNN's."""
    if request.param == "oneDNN":
        monkeypatch.setattr(cpu_kernels, "_loaded", None)
        monkeypatch.setenv("DOJO_KERNELS", "0")
    else:
        assert cpu_kernels.kernels(build=True) is not None, cpu_kernels.status()
    return request.param


@pytest.mark.parametrize("rows", [1, 3, 16, 64, 65])
def test_packed_linear_equals_f_linear(rows, packed_layout):
    w, b, x = torch.randn(48, 32), torch.randn(48), torch.randn(rows, 32)
    packed = PackedWeight(w)
    assert (packed.blocks is not None) == (packed_layout == "compiled")
    torch.testing.assert_close(linear(x, w, b, packed), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x[:, None], w, None, packed), (x @ w.T)[:, None], rtol=1e-5, atol=1e-5)


def test_a_stale_packed_copy_is_never_used(packed_layout):
    w, x = torch.randn(48, 32), torch.randn(2, 32)
    packed = PackedWeight(w)
    with torch.no_grad():
        w.mul_(2.0)  # edited in place after packing
    torch.testing.assert_close(linear(x, w, None, packed), x @ w.T)
    other = torch.randn(48, 32)  # a different tensor altogether
    torch.testing.assert_close(linear(x, other, None, packed), x @ other.T)


def test_packed_model_gives_the_same_logits(tiny, packed_layout):
    ids = torch.randint(0, 300, (3, 6))
    plain = tiny(ids)
    assert tiny.pack_for_cpu()
    tiny.setup_cache(3, 8)
    packed_steps = torch.cat([tiny(ids[:, :4]), tiny(ids[:, 4:5], start=4), tiny(ids[:, 5:6], start=5)], dim=1)
    tiny.clear_cache()
    torch.testing.assert_close(packed_steps, plain, rtol=1e-4, atol=1e-4)
    assert not tiny.double().pack_for_cpu(), "float64 has no packed path"
