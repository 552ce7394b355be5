"""Positional encodings: each checked against the formula written out element by element,
and by the property that makes it worth having."""

import math

import pytest
import torch

from reference_engine import ModelConfig, Transformer
from reference_engine.errors import DojoError
from reference_engine.positional import (
    adjacent_to_half_rows,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    half_to_adjacent_rows,
    rope_frequencies,
    rope_tables,
    sinusoidal_table,
)


def test_sinusoidal_table_matches_the_formula():
    table = sinusoidal_table(50, 12, base=10000.0)
    assert table.shape == (50, 12) and table.dtype == torch.float32
    for p in (0, 1, 7, 49):
        for i in range(6):
            angle = p / 10000.0 ** (2 * i / 12)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_shift_is_a_rotation_of_each_pair():
    """PE(p + k) is PE(p) with every (sin, cos) pair rotated by a fixed angle: a linear map
    that does not depend on p, which is what lets attention read relative offsets."""
    table = sinusoidal_table(64, 8).double()
    k = 5
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    c, s = (k * inv_freq).cos(), (k * inv_freq).sin()
    sin_p, cos_p = table[:-k, 0::2], table[:-k, 1::2]
    torch.testing.assert_close(table[k:, 0::2], sin_p * c + cos_p * s, atol=1e-6, rtol=0)
    torch.testing.assert_close(table[k:, 1::2], cos_p * c - sin_p * s, atol=1e-6, rtol=0)


def rope_at(x, positions, base=10000.0, layout="half"):
    """x (T, D) rotated at the given positions, through the engine's tables."""
    cos, sin = rope_tables(x.shape[-1], int(max(positions)) + 1, base, layout)
    idx = torch.tensor(positions)
    return apply_rope(x[None, :, None].float(), cos[idx][None, :, None], sin[idx][None, :, None], layout)[0, :, 0]


@pytest.mark.parametrize("layout", ["half", "adjacent"])
def test_rope_rotates_each_pair_by_position_times_frequency(layout):
    torch.manual_seed(0)
    x = torch.randn(1, 8)
    out = rope_at(x, [3], layout=layout)[0]
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    for i in range(4):
        a, b = (i, i + 4) if layout == "half" else (2 * i, 2 * i + 1)
        t = 3 * inv_freq[i].item()
        assert out[a].item() == pytest.approx(x[0, a].item() * math.cos(t) - x[0, b].item() * math.sin(t), abs=1e-5)
        assert out[b].item() == pytest.approx(x[0, a].item() * math.sin(t) + x[0, b].item() * math.cos(t), abs=1e-5)


@pytest.mark.parametrize("layout", ["half", "adjacent"])
def test_rope_score_depends_only_on_the_offset(layout):
    torch.manual_seed(0)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    scores = [(rope_at(q, [m], layout=layout) @ rope_at(k, [m - 3], layout=layout).T).item()
              for m in (3, 10, 100, 1000)]
    assert max(scores) - min(scores) < 1e-3
    assert abs((rope_at(q, [10], layout=layout) @ rope_at(k, [9], layout=layout).T).item() - scores[0]) > 1e-2


def test_rope_layouts_agree_once_the_rows_are_permuted():
    """Scores from adjacent-layout rows with adjacent RoPE equal scores from the permuted
    rows with half-split RoPE: the same model in two layouts."""
    torch.manual_seed(0)
    n_heads, D, d_model = 3, 8, 10
    w = torch.randn(n_heads * D, d_model)
    x = torch.randn(6, d_model)
    positions = list(range(6))
    heads_adj = (x @ w.T).view(6, n_heads, D)
    heads_half = (x @ adjacent_to_half_rows(w, n_heads).T).view(6, n_heads, D)
    for h in range(n_heads):
        qa = rope_at(heads_adj[:, h], positions, layout="adjacent")
        qh = rope_at(heads_half[:, h], positions, layout="half")
        torch.testing.assert_close(qa @ qa.T, qh @ qh.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(half_to_adjacent_rows(adjacent_to_half_rows(w, n_heads), n_heads), w, rtol=0, atol=0)


def test_the_row_permutation_is_per_head():
    rows = torch.arange(8.0)[:, None]  # two heads of D=4
    assert adjacent_to_half_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert half_to_adjacent_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    rows = torch.arange(12.0)[:, None]  # one head of D=12: the two directions differ
    assert adjacent_to_half_rows(rows, 1).flatten().tolist() == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]
    assert half_to_adjacent_rows(rows, 1).flatten().tolist() == [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]


def test_linear_scaling_is_position_interpolation():
    cos2, sin2 = rope_tables(16, 40, 10000.0, scaling="linear", factor=2.0)
    cos1, sin1 = rope_tables(16, 40, 10000.0)
    torch.testing.assert_close(cos2[0::2][:20], cos1[:20])  # position 2p scaled == position p
    torch.testing.assert_close(sin2[0::2][:20], sin1[:20])


def test_ntk_scaling_keeps_the_fastest_pair_and_slows_the_slowest_by_the_factor():
    plain = rope_frequencies(64, 100000.0)
    ntk = rope_frequencies(64, 100000.0, "ntk", 4.0)
    assert ntk[0].item() == pytest.approx(plain[0].item())
    assert ntk[-1].item() == pytest.approx(plain[-1].item() / 4.0, rel=1e-9)
    assert torch.all(ntk <= plain)


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == pytest.approx([2.0 ** -(h + 1) for h in range(8)])
    assert alibi_slopes(4).tolist() == pytest.approx([0.25, 0.0625, 0.015625, 0.00390625])
    # 6 heads: the 4-head slopes, then 2^-1 and 2^-3 from the 8-head sequence
    assert alibi_slopes(6).tolist() == pytest.approx([0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125])


def test_alibi_bias_matches_the_formula():
    bias = alibi_bias(6, q_len=3, kv_len=5)
    slopes = alibi_slopes(6)
    assert bias.shape == (6, 3, 5)
    for h in range(6):
        for i in range(3):
            for j in range(5):
                q_pos = i + 2
                want = -slopes[h].item() * (q_pos - j) if j <= q_pos else float("-inf")
                assert bias[h, i, j].item() == pytest.approx(want)


def test_config_rejects_unknown_encodings():
    with pytest.raises(DojoError, match="pos_encoding"):
        ModelConfig(pos_encoding="relative")
    with pytest.raises(DojoError, match="rope_layout"):
        ModelConfig(rope_layout="interleaved")
    with pytest.raises(DojoError, match="rope_scaling_factor"):
        ModelConfig(rope_scaling="linear", rope_scaling_factor=0.5)


def test_tiny_model_is_the_same_in_both_rope_layouts():
    torch.manual_seed(0)
    half = Transformer(ModelConfig.from_name("tiny")).double().eval()
    adjacent = Transformer(ModelConfig.from_name("tiny", rope_layout="adjacent")).double().eval()
    sd = half.state_dict()
    H, KV, D = half.config.n_heads, half.config.n_kv_heads, half.config.head_dim
    for name, w in list(sd.items()):
        if name.endswith("wqkv.weight"):
            q, k, v = w.split([H * D, KV * D, KV * D])
            sd[name] = torch.cat([half_to_adjacent_rows(q, H), half_to_adjacent_rows(k, KV), v])
    adjacent.load_state_dict(sd)
    ids = torch.randint(0, 300, (2, 20))
    torch.testing.assert_close(adjacent(ids), half(ids))


def test_positions_change_the_output_of_every_encoding(any_tiny):
    """Swapping two tokens must change the last token's logits: no model is order-blind."""
    ids = torch.randint(0, any_tiny.config.vocab_size, (1, 8))
    swapped = ids.clone()
    swapped[0, [2, 5]] = ids[0, [5, 2]]
    assert (any_tiny(ids)[0, -1] - any_tiny(swapped)[0, -1]).abs().max() > 1e-6


def test_set_rope_rebuilds_the_tables_and_rejects_other_fields(tiny):
    ids = torch.randint(0, 300, (1, 12))
    before = tiny(ids)
    tiny.set_rope(rope_scaling="linear", rope_scaling_factor=2.0)
    cos, _ = rope_tables(tiny.config.head_dim, tiny.config.max_seq_len, tiny.config.rope_base,
                         scaling="linear", factor=2.0)
    torch.testing.assert_close(tiny.rope_cos, cos)
    assert (tiny(ids) - before).abs().max() > 1e-4
    with pytest.raises(DojoError, match="set_rope"):
        tiny.set_rope(n_heads=2)
