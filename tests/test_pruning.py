"""Pruning masks, low-rank factors and structurally pruned models (chapter 5's engine)."""

import re

import pytest
import torch

from reference_engine import cpu_kernels
from reference_engine.compression import lowrank, prune, structured
from reference_engine.errors import DojoError
from reference_engine.generate import generate
from test_cpu_kernels import CountingKernels, decode_logits
from tiny_gguf import random_model

# -- masks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_mask_removes_an_exact_count_per_row(sparsity):
    w = torch.randn(7, 37)
    mask = prune.magnitude_mask(w, sparsity)
    assert (mask.sum(1) == 37 - int(sparsity * 37)).all()
    kept_min = w.abs().masked_fill(~mask, float("inf")).amin(1)
    removed_max = w.abs().masked_fill(mask, -1.0).amax(1)
    assert (removed_max <= kept_min).all(), "every removed weight is no larger than every kept one of its row"


def test_counts_are_exact_despite_float_error():
    assert 0.29 * 100 < 29 and prune.pruned_count(0.29, 100) == 29
    assert (prune.magnitude_mask(torch.randn(3, 100), 0.29).sum(1) == 71).all()


def test_ties_are_broken_by_index():
    mask = prune.magnitude_mask(torch.ones(2, 6), 0.5)
    assert mask.tolist() == [[False, False, False, True, True, True]] * 2


def test_global_magnitude_ranks_the_whole_matrix():
    w = torch.cat([torch.full((1, 8), 0.1), torch.full((1, 8), 5.0)]) + torch.linspace(0, 0.01, 8)
    glob, row = prune.magnitude_mask(w, 0.5, "global"), prune.magnitude_mask(w, 0.5)
    assert glob.sum() == row.sum() == 8
    assert glob[0].sum() == 0 and glob[1].all(), "the small row loses everything"
    assert (row.sum(1) == 4).all()


def test_wanda_weighs_weights_by_their_inputs():
    w = torch.tensor([[1.0, 0.5, 0.2, 0.1]])
    norms = torch.tensor([0.01, 1.0, 10.0, 100.0])
    assert prune.magnitude_mask(w, 0.5).tolist() == [[True, True, False, False]]
    assert prune.wanda_mask(w, norms, 0.5).tolist() == [[False, False, True, True]]  # scores 0.01, 0.5, 2, 10
    g = torch.Generator().manual_seed(0)
    w, norms = torch.randn(5, 16, generator=g), torch.rand(16, generator=g)
    expected = torch.stack([prune.magnitude_mask((w[i] * norms)[None], 0.25)[0] for i in range(5)])
    assert torch.equal(prune.wanda_mask(w, norms, 0.25), expected)


def test_two_four_keeps_two_of_every_four_consecutive_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 32, generator=g)
    mask = prune.n_m_mask(w.abs(), 2, 4)
    groups = mask.view(6, 8, 4)
    assert (groups.sum(-1) == 2).all()
    top2 = w.abs().view(6, 8, 4).topk(2, dim=-1).indices
    assert torch.equal(groups.gather(-1, top2), torch.ones_like(top2, dtype=torch.bool))
    assert prune.n_m_mask(torch.tensor([[1.0, 4.0, 2.0, 3.0]])).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("call,words", [
    (lambda: prune.magnitude_mask(torch.ones(2, 4), 1.0), "[0, 1)"),
    (lambda: prune.magnitude_mask(torch.ones(2, 4), -0.1), "[0, 1)"),
    (lambda: prune.n_m_mask(torch.ones(2, 6), 2, 4), "must divide"),
    (lambda: prune.wanda_mask(torch.ones(2, 4), torch.ones(3), 0.5), "one activation norm per input channel"),
    (lambda: lowrank.svd_factors(torch.ones(4, 6), 5), "rank must be in [1, 4]"),
])
def test_bad_arguments_are_named(call, words):
    with pytest.raises(DojoError, match=re.escape(words)):
        call()


@pytest.mark.parametrize("method", ["magnitude", "magnitude-global", "wanda"])
def test_prune_model_zeroes_the_blocks_linears(method):
    model = random_model("tiny", seed=3).float()
    assert model.pack_for_cpu()
    windows = torch.randint(0, 300, generator=torch.Generator().manual_seed(0), size=(2, 24))
    norms = prune.input_norms(model, windows)
    assert set(norms) == {f"layers.{i}.{n}" for i in range(2) for n in ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2")}
    removed = prune.prune_model(model, method, 0.5, norms=norms)
    for name, fraction in removed.items():
        w = model.get_submodule(name).weight
        assert (w == 0).float().mean().item() == pytest.approx(fraction)
        if method != "magnitude-global":
            assert fraction == 0.5
        assert model.get_submodule(name).packed.current(w), "packed copies follow the pruned weights"
    assert (model.tok_embeddings.weight != 0).all(), "the embedding and head are left alone"


def test_prune_model_two_four():
    model = random_model("tiny", seed=3).float()
    prune.prune_model(model, "magnitude", pattern=(2, 4))
    w = model.layers[0].mlp.w2.weight
    assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()


# -- low rank ----------------------------------------------------------------------------


def test_svd_error_is_the_discarded_singular_values():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 32, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for rank in (1, 7, 31, 32):
        a, b = lowrank.svd_factors(w, rank)
        assert a.shape == (48, rank) and b.shape == (rank, 32)
        error = torch.linalg.norm(w - a @ b)
        assert error.item() == pytest.approx(s[rank:].square().sum().sqrt().item(), abs=1e-9)


def test_break_even_rank():
    assert lowrank.break_even_rank(576, 576) == 288 and lowrank.break_even_rank(1536, 576) == 418
    r = lowrank.break_even_rank(100, 60)
    assert r * 160 <= 6000 < (r + 1) * 160


def test_whitening_lowers_the_output_error():
    """Inputs with very unequal channel scales: whitened SVD spends its rank where the outputs are."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 32, generator=g, dtype=torch.float64)
    x = torch.randn(500, 32, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 32, dtype=torch.float64)
    gram = x.T @ x
    errors = {}
    for name, (a, b) in [("plain", lowrank.svd_factors(w, 8)), ("whitened", lowrank.whitened_factors(w, gram, 8))]:
        errors[name] = torch.linalg.norm(x @ (w - a @ b).T).item()
    assert errors["whitened"] < 0.5 * errors["plain"], errors


def test_factorized_model_at_the_break_even_rank_and_below():
    model = random_model("tiny", seed=4)  # float64
    ids = torch.tensor([[5, 9, 2, 7, 1]])
    with torch.inference_mode():
        before = model(ids)
    big = {name: min(model.get_submodule(name).weight.shape) for name in ("layers.0.mlp.w2",)}
    ranks = lowrank.factorize_model(model, 1.0, names=("w2",))
    assert set(ranks) == {"layers.0.mlp.w2", "layers.1.mlp.w2"} and ranks["layers.0.mlp.w2"] < big["layers.0.mlp.w2"]
    assert isinstance(model.layers[0].mlp.w2, lowrank.LowRankLinear)
    with torch.inference_mode():
        after = model(ids)
    assert not torch.allclose(before, after), "the break-even rank is below full rank: some error"
    windows = torch.randint(0, 300, generator=torch.Generator().manual_seed(0), size=(4, 32))
    whitened = random_model("tiny", seed=4)
    grams = lowrank.input_grams(whitened, windows)
    lowrank.factorize_model(whitened, 0.5, grams=grams)
    plain = random_model("tiny", seed=4)
    lowrank.factorize_model(plain, 0.5)
    exact = random_model("tiny", seed=4)
    with torch.inference_mode():
        ref = exact(windows)
        err = {n: (m(windows) - ref).norm().item() for n, m in [("plain", plain), ("whitened", whitened)]}
    assert err["whitened"] < err["plain"], err


# -- structured --------------------------------------------------------------------------


def masked_copy(model, edit):
    """The model with weights zeroed in place by edit(model): what the pruned model must compute."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        edit(twin)
    return twin


def same_logits(a, b, ids):
    with torch.inference_mode():
        torch.testing.assert_close(a(ids), b(ids), rtol=1e-9, atol=1e-9)


def test_ffn_channel_pruning_equals_the_masked_big_model():
    model = random_model("tiny", seed=5)  # float64: equality up to summation order
    windows = torch.randint(0, 300, generator=torch.Generator().manual_seed(0), size=(2, 24))
    scores = structured.ffn_channel_scores(model, prune.input_norms(model, windows))
    small = structured.prune_ffn_channels(model, 48, scores)
    assert small.config.ffn_dim == 48 and small.layers[0].mlp.w2.weight.shape == (64, 48)
    dropped = [torch.topk(-s, 128 - 48).indices for s in scores]

    def zero_channels(twin):
        for layer, idx in zip(twin.layers, dropped):
            layer.mlp.w2.weight[:, idx] = 0  # the down projection never sees them

    same_logits(small, masked_copy(model, zero_channels), windows)


def test_kv_group_pruning_equals_the_masked_big_model():
    model = random_model("tiny", seed=6)  # 4 query heads in 2 KV groups of 2
    windows = torch.randint(0, 300, generator=torch.Generator().manual_seed(0), size=(2, 24))
    scores = structured.kv_group_scores(model, prune.input_norms(model, windows))
    small = structured.prune_kv_groups(model, 1, scores)
    assert (small.config.n_heads, small.config.n_kv_heads) == (2, 1)
    assert small.layers[0].attn.wqkv.weight.shape == ((2 + 2) * 16, 64)
    dropped = [int(s.argmin()) for s in scores]

    def zero_group(twin):
        for layer, g in zip(twin.layers, dropped):
            layer.attn.wo.weight[:, g * 32:(g + 1) * 32] = 0  # its two query heads' outputs

    same_logits(small, masked_copy(model, zero_group), windows)
    with pytest.raises(DojoError, match="one must stay"):
        structured.prune_kv_groups(model, 2, scores)


def test_block_pruning_drops_the_blocks_that_change_least():
    model = random_model("tiny", seed=7, n_layers=4)
    windows = torch.randint(0, 300, generator=torch.Generator().manual_seed(0), size=(2, 24))
    scores = structured.block_scores(model, windows)
    small = structured.prune_blocks(model, 2, scores)
    kept = sorted(torch.topk(scores, 2).indices.tolist())
    assert small.config.n_layers == 2
    for new, old in zip(small.layers, kept):
        assert torch.equal(new.mlp.w2.weight, model.layers[old].mlp.w2.weight)
    with pytest.raises(DojoError, match="remove 0 to 3"):
        structured.prune_blocks(model, 4, scores)


def test_a_pruned_model_decodes_through_the_compiled_path(monkeypatch):
    model = random_model("tiny", seed=8).float()
    assert model.pack_for_cpu()
    windows = torch.randint(0, 300, generator=torch.Generator().manual_seed(0), size=(2, 24))
    norms = prune.input_norms(model, windows)
    small = structured.prune_ffn_channels(model, 64, structured.ffn_channel_scores(model, norms))
    small = structured.prune_kv_groups(small, 1, structured.kv_group_scores(small, prune.input_norms(small, windows)))
    kernels = cpu_kernels.kernels(build=True)
    spy = CountingKernels(kernels)
    monkeypatch.setattr(cpu_kernels, "_loaded", spy)
    prompts = [[5, 9, 2, 7, 1, 4], [8, 3], [6, 6, 6, 1]]
    fused = decode_logits(small, prompts)
    assert spy.blocks == 5 * small.config.n_layers, "packed again: the fused step runs"
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    torch.testing.assert_close(fused, decode_logits(small, prompts), rtol=1e-4, atol=1e-4)
    assert len(generate(small, prompts, max_new_tokens=4).tokens) == 3


# -- sparse storage ------------------------------------------------------------------------


def test_csr_and_coo_round_trip_and_multiply():
    from reference_engine.compression import sparse

    w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    values, cols, row_ptr = sparse.to_csr(w)
    assert values.tolist() == [2.0, 1.0, 3.0] and cols.tolist() == [1, 0, 2] and row_ptr.tolist() == [0, 1, 3, 3]
    rows, cols2, values2 = sparse.to_coo(w)
    assert rows.tolist() == [0, 1, 1] and torch.equal(cols2, cols) and torch.equal(values2, values)
    g = torch.Generator().manual_seed(9)
    big = torch.randn(96, 80, generator=g) * (torch.rand(96, 80, generator=g) < 0.2)
    big[5] = 0  # an empty row
    x = torch.randn(80, generator=g, dtype=torch.float64)
    y = sparse.csr_matvec(*[t.double() if t.is_floating_point() else t for t in sparse.to_csr(big)], x)
    torch.testing.assert_close(y, big.double() @ x)
    assert sparse.csr_bytes(big) == int((big != 0).sum()) * 8 + 97 * 4


def test_matvec_timings_reports_both_kernels():
    from reference_engine.compression import sparse

    rows = sparse.matvec_timings(64, 48, [0.1, 1.0], repeats=2)
    assert [r["density"] for r in rows] == [0.1, 1.0]
    assert all(r["dense_us"] > 0 and r["csr_us"] > 0 for r in rows)
    assert rows[0]["csr_bytes"] < rows[0]["dense_bytes"] < rows[1]["csr_bytes"]
    with pytest.raises(DojoError, match="density"):
        sparse.matvec_timings(8, 8, [0.0])


# -- saved pruned models ---------------------------------------------------------------------


def test_a_saved_model_loads_back_with_the_same_logits(tmp_path):
    from reference_engine import load_model
    from reference_engine.gguf_writer import save_gguf
    from tiny_gguf import tiny_llama, write_gguf

    write_gguf(tiny_llama(), tmp_path / "tiny.gguf")  # F32
    model, tokenizer = load_model(tmp_path / "tiny.gguf")
    windows = torch.randint(0, 300, generator=torch.Generator().manual_seed(0), size=(2, 24))
    small = structured.prune_kv_groups(model, 1, structured.kv_group_scores(model, prune.input_norms(model, windows)))
    save_gguf(small, tokenizer, tmp_path / "small.gguf")
    back, tok2 = load_model(tmp_path / "small.gguf")
    assert back.config == small.config and tok2.encode("hello world") == tokenizer.encode("hello world")
    with torch.inference_mode():
        torch.testing.assert_close(back(windows), small(windows), rtol=1e-5, atol=1e-5)
    untied = random_model("tiny", seed=3, tie_embeddings=False).float()
    save_gguf(untied, tokenizer, tmp_path / "untied.gguf")
    back, _ = load_model(tmp_path / "untied.gguf")
    assert not back.config.tie_embeddings
    with torch.inference_mode():
        torch.testing.assert_close(back(windows), untied(windows), rtol=1e-5, atol=1e-5)
    from reference_engine.gguf_loader import field_value, open_gguf

    reader = open_gguf(tmp_path / "small.gguf")  # heads no longer d_model / n_heads wide: stated for llama.cpp
    assert field_value(reader, "llama.attention.key_length") == small.config.head_dim == 16
    assert field_value(reader, "llama.attention.head_count") == 2
    quantized = random_model("tiny", seed=3).float().quantize("q8_0")
    with pytest.raises(DojoError, match="save before quantizing"):
        save_gguf(quantized, tokenizer, tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()
