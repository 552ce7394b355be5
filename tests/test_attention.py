"""Every attention variant against an independent implementation, in float64."""

import math

import pytest
import torch

from reference_engine import DojoError
from reference_engine.attention import (causal_mask, cross_attention, multi_head_attention, padding_mask, repeat_kv,
                                        sdpa_math, stable_softmax, tiled_attention)
from reference_engine.grading.observe import observe_largest


@pytest.fixture(autouse=True, scope="module")
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_stable_softmax_matches_torch_and_survives_large_inputs():
    x = torch.randn(3, 5, 7) * 300
    torch.testing.assert_close(stable_softmax(x, 1), torch.softmax(x, 1))
    assert torch.isfinite(stable_softmax(x.float() + 1000, -1)).all()
    empty = torch.full((2, 4), float("-inf"))
    assert torch.equal(stable_softmax(empty), torch.zeros(2, 4))


def test_causal_mask_aligns_queries_with_the_end():
    assert causal_mask(2, 4).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert torch.equal(causal_mask(5, 5), torch.ones(5, 5, dtype=torch.bool).tril())


def test_repeat_kv_gives_each_query_head_its_group():
    kv = torch.arange(2.0).view(1, 2, 1, 1)  # K/V heads 0 and 1
    assert repeat_kv(kv, 3).flatten().tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("Tq,Tk", [(1, 9), (4, 9), (6, 6)])
def test_sdpa_math_matches_torch_fused_kernel(Tq, Tk):
    q, k, v = torch.randn(2, 4, Tq, 8), torch.randn(2, 4, Tk, 8), torch.randn(2, 4, Tk, 8)
    valid = torch.ones(2, Tk, dtype=torch.bool)
    valid[1, :2] = False  # left padding in the second sequence
    mask = causal_mask(Tq, Tk) & padding_mask(valid)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(sdpa_math(q, k, v, padding_mask(valid), is_causal=True), expected)


def nn_mha(d_model, n_heads, wq, wk, wv, wo):
    mha = torch.nn.MultiheadAttention(d_model, n_heads, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([wq, wk, wv]))
        mha.out_proj.weight.copy_(wo)
    return mha


def test_multi_head_attention_matches_torch_nn():
    B, T, d, H = 2, 7, 24, 4
    x, wq, wk, wv, wo = torch.randn(B, T, d), *(torch.randn(d, d) / d ** 0.5 for _ in range(4))
    ours = multi_head_attention(x, wq, wk, wv, wo, n_heads=H, n_kv_heads=H)
    theirs, _ = nn_mha(d, H, wq, wk, wv, wo)(x, x, x, attn_mask=~causal_mask(T, T), need_weights=False)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("n_kv", [1, 2])  # multi-query and grouped-query
def test_grouped_query_equals_multi_head_with_shared_kv_rows(n_kv):
    B, T, d, H, D = 2, 6, 24, 4, 6
    x, wq, wo = torch.randn(B, T, d), torch.randn(H * D, d), torch.randn(d, H * D)
    wk, wv = torch.randn(n_kv * D, d), torch.randn(n_kv * D, d)
    group = H // n_kv
    expand = lambda w: w.view(n_kv, D, d).repeat_interleave(group, 0).reshape(H * D, d)  # noqa: E731
    gqa = multi_head_attention(x, wq, wk, wv, wo, H, n_kv)
    mha = multi_head_attention(x, wq, expand(wk), expand(wv), wo, H, H)
    torch.testing.assert_close(gqa, mha)


def test_cross_attention_matches_torch_nn():
    B, Tq, Tk, d, H = 2, 5, 8, 16, 2
    x, memory = torch.randn(B, Tq, d), torch.randn(B, Tk, d)
    wq, wk, wv, wo = (torch.randn(d, d) / d ** 0.5 for _ in range(4))
    valid = torch.ones(B, Tk, dtype=torch.bool)
    valid[0, -3:] = False  # padded source sentence
    ours = cross_attention(x, memory, wq, wk, wv, wo, H, memory_valid=valid)
    theirs, _ = nn_mha(d, H, wq, wk, wv, wo)(x, memory, memory, key_padding_mask=~valid, need_weights=False)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("Tq,Tk,block", [(7, 7, 3), (3, 10, 4), (16, 16, 16), (1, 5, 2)])
@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2)])
def test_tiled_attention_equals_the_formula_and_its_lse(Tq, Tk, block, H, KV):
    q, k, v = torch.randn(2, H, Tq, 8), torch.randn(2, KV, Tk, 8), torch.randn(2, KV, Tk, 8)
    valid = torch.ones(2, Tk, dtype=torch.bool)
    valid[1, :2] = False
    out, lse = tiled_attention(q, k, v, padding_mask(valid), is_causal=True, block_size=block)
    torch.testing.assert_close(out, sdpa_math(q, k, v, padding_mask(valid), is_causal=True))
    scores = q @ repeat_kv(k, H // KV).transpose(-2, -1) / math.sqrt(8)
    scores = scores.masked_fill(~(causal_mask(Tq, Tk) & padding_mask(valid)), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1))


def test_tiled_attention_takes_a_full_mask_like_the_models():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.rand(2, 1, 5, 9) > 0.3
    mask[..., -1] = True
    out, _ = tiled_attention(q, k, v, mask, block_size=2)
    torch.testing.assert_close(out, sdpa_math(q, k, v, mask))


def test_tiled_attention_rows_with_nothing_visible_are_zero():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out, lse = tiled_attention(q, k, v, torch.zeros(1, 1, 1, 3, dtype=torch.bool), block_size=2)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


def test_tiled_attention_never_holds_the_score_matrix():
    T, block = 1024, 64
    q = k = v = torch.randn(1, 1, T, 16, dtype=torch.float32)
    naive = observe_largest(sdpa_math, [q, k, v], {"is_causal": True})
    tiled = observe_largest(tiled_attention, [q, k, v], {"is_causal": True, "block_size": block})
    assert naive >= T * T
    assert tiled <= T * 16, tiled  # the output itself; tiles are block x block


@pytest.mark.parametrize("impl", ["math", "tiled"])
def test_model_gives_the_same_logits_with_every_attention(any_tiny, impl):
    ids = torch.randint(0, any_tiny.config.vocab_size, (2, 9))
    expected = any_tiny(ids)
    any_tiny.set_attention(impl)
    torch.testing.assert_close(any_tiny(ids), expected)
    any_tiny.setup_cache(2, 12)  # cached decoding, where queries are fewer than keys
    steps = torch.cat([any_tiny(ids[:, :5])] + [any_tiny(ids[:, t:t + 1], start=t) for t in range(5, 9)], dim=1)
    any_tiny.clear_cache()
    torch.testing.assert_close(steps, expected)


def test_unknown_attention_is_explained(tiny):
    with pytest.raises(DojoError, match="unknown attention 'flash'"):
        tiny.set_attention("flash")
