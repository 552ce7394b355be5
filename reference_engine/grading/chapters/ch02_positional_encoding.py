"""Chapter 2: positional encodings. Four tasks: the sinusoidal table, RoPE (checked by value
and by its relative-position property), the GGUF-to-half-split row conversion (checked by
value and by SmolLM2's logits), and the ALiBi bias.

References are the engine's own functions (`positional.py`, tested against the formulas
element by element) in float64, in the trusted process only; the cases use bases,
head counts and positions that differ between seeds, so a hard-coded constant or a
power-of-two-only formula shows.
"""

from __future__ import annotations

import torch

from ...positional import adjacent_to_half_rows, alibi_bias, apply_rope, rope_tables, sinusoidal_table
from ..tasks import Case, Check, Task, register
from .ch01_attention import smollm, smollm_tokenizer

# -- 2.1 sinusoidal table -----------------------------------------------------------------


def sinusoidal64(max_len, d_model, base=10000.0):
    return sinusoidal_table(max_len, d_model, base, dtype=torch.float64)


def sinusoidal_cases(g):
    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    long_len = int(torch.randint(3000, 5000, (), generator=g))
    return [
        Case("values", [10, 16, 10000.0], {}, "max_len=10, d_model=16, base=10000"),
        Case("values", [7, 6, 10000.0], {}, "max_len=7, d_model=6, base=10000"),
        Case("base", [12, 8, round(uniform(50, 1000), 3)], {}, "max_len=12, d_model=8, another base"),
        Case("base", [9, 10, round(uniform(2000, 50000), 3)], {}, "max_len=9, d_model=10, another base"),
        Case("long_positions", [long_len, 32, 10000.0], {}, f"max_len={long_len}, d_model=32"),
    ]


# -- 2.2 RoPE -----------------------------------------------------------------------------


def rope64(x, positions, base):
    """Half-split RoPE in float64: pair (x_i, x_{i+D/2}) rotated by positions * base^(-2i/D)."""
    cos, sin = rope_tables(x.shape[-1], int(positions.max()) + 1, base, dtype=torch.float64)  # (P, D)
    return apply_rope(x.double(), cos[positions].unsqueeze(2), sin[positions].unsqueeze(2))  # tables (B, T, 1, D)


def scores_depend_only_on_offsets(out, x, positions, base):
    """The case's two batch rows hold the same vectors, the second at positions shifted by a
    constant: every head's score matrix out @ out^T must then be the same in both rows."""
    if out.shape != x.shape:
        return f"output shape {tuple(out.shape)}, expected {tuple(x.shape)}"
    out = out.double()
    if torch.allclose(out, x.double(), atol=1e-6):
        return "the output equals the input: nothing was rotated"
    gram = torch.einsum("bthd,bshd->bhts", out, out)  # (2, H, T, T): every query-key score
    worst = (gram[0] - gram[1]).abs().max().item()
    if worst > 1e-2:
        return (f"shifting every position by {int(positions[1, 0] - positions[0, 0])} changed a score "
                f"R(m)q . R(n)k by {worst:.3g}: it must depend only on m - n, so each pair must be turned "
                "by one angle, as a rotation")
    return None


def rope_cases(g):
    def x(B, T, H, D):
        return torch.randn(B, T, H, D, generator=g)

    def arange(B, T, start=0):
        return (torch.arange(T) + start).expand(B, T).clone()

    start = int(torch.randint(1, 100, (), generator=g))
    ragged = torch.stack([torch.randint(0, 200, (6,), generator=g), torch.tensor([0, 0, 0, 1, 2, 3])])
    base = float(torch.randint(100, 20000, (), generator=g))
    row = torch.randint(0, 500, (7,), generator=g)
    shift = int(torch.randint(1, 1000, (), generator=g))
    same = x(1, 7, 3, 16).expand(2, 7, 3, 16).clone()
    return [
        Case("values", [x(2, 5, 3, 8), arange(2, 5), 10000.0], {}, "x (2, 5, 3, 8), positions 0..4, base 10000"),
        Case("values", [x(1, 6, 2, 16), arange(1, 6, start), base], {}, f"x (1, 6, 2, 16), positions from {start}, base {base:g}"),
        Case("positions", [x(2, 6, 2, 8), ragged, 10000.0], {}, "each row its own positions (random; left-padded)"),
        Case("relative", [same, torch.stack([row, row + shift]), 10000.0], {},
             f"the same vectors at positions p and p + {shift}", judge=scores_depend_only_on_offsets),
    ]


# -- 2.3 GGUF rows to the half-split layout -------------------------------------------------------


HARNESS = """
    from dataclasses import replace

    import torch
    from reference_engine.grading.chapters.ch02_positional_encoding import file_model
    from reference_engine.load import model_from_state_dict

    FILE_MODEL = file_model()  # SmolLM2 with Q/K rows exactly as in the GGUF file
    C = FILE_MODEL.config

    def wrap(fn):
        def call(w, n_heads):
            if w.dtype != torch.long:
                return fn(w, n_heads)
            # token ids instead of a weight: build SmolLM2 with fn converting every Q and K
            sd = dict(FILE_MODEL.state_dict())
            for i in range(C.n_layers):
                name = f"layers.{i}.attn.wqkv.weight"
                q, k, v = sd[name].split([C.n_heads * C.head_dim, C.n_kv_heads * C.head_dim,
                                          C.n_kv_heads * C.head_dim])
                sd[name] = torch.cat([fn(q.clone(), C.n_heads), fn(k.clone(), C.n_kv_heads), v])
            model = model_from_state_dict(replace(C, rope_layout="half"), sd).eval()
            with torch.inference_mode():
                return model(w[None])
        return call
"""


def file_model():
    """SmolLM2 with the attention rows as the file stores them (adjacent-pair layout)."""
    from ...load import load_model

    return load_model(rope_layout="adjacent", pack=False)[0]


def layout64(w, n_heads):
    return adjacent_to_half_rows(w.double(), n_heads)


def same_logits_as_smollm(out, prompt_ids, n_heads):
    """The learner's conversion, used for every layer, must rebuild SmolLM2 exactly."""
    model, _ = smollm()
    with torch.inference_mode():
        expected = model(prompt_ids[None])
    if out.shape != expected.shape:
        return f"logits of shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    worst = (out.double() - expected.double()).abs().max().item()
    if not worst <= 1e-3:
        top_ours, top_ref = int(out[0, -1].argmax()), int(expected[0, -1].argmax())
        return (f"SmolLM2's logits differ by up to {worst:.3g} from the engine's (next-token choice "
                f"{top_ours} vs {top_ref}): the model you built is a different model")
    return None


def layout_cases(g):
    def w(rows, cols):
        return torch.randn(rows, cols, generator=g)

    tokenizer = smollm_tokenizer()
    texts = ["The Eiffel Tower is in", "def add(a, b):\n    return", "Water boils at a temperature of"]
    text = texts[int(torch.randint(0, len(texts), (), generator=g))]
    return [
        Case("values", [w(8, 5), 1], {}, "one head, head_dim 8"),
        Case("values", [w(12, 3), 1], {}, "one head, head_dim 12"),
        Case("heads", [w(24, 6), 3], {}, "3 heads of head_dim 8"),
        Case("heads", [w(32, 4), 2], {}, "2 heads of head_dim 16"),
        Case("smollm_logits", [torch.tensor(tokenizer.encode(text)), 0], {},
             f"SmolLM2 on {text!r}, your function converting every layer's Q (9 heads) and K (3 heads)",
             judge=same_logits_as_smollm),
    ]


# -- 2.4 ALiBi ----------------------------------------------------------------------------------


def alibi64(n_heads, q_len, kv_len):
    return alibi_bias(n_heads, q_len, kv_len, dtype=torch.float64)


def alibi_cases(g):
    odd_heads = [3, 5, 6, 9, 12][int(torch.randint(0, 5, (), generator=g))]
    kv = int(torch.randint(5, 12, (), generator=g))
    return [
        Case("values", [8, 6, 6], {}, "8 heads, 6 queries, 6 keys"),
        Case("values", [4, 5, 5], {}, "4 heads, 5 queries, 5 keys"),
        Case("any_heads", [odd_heads, 4, 4], {}, f"{odd_heads} heads (not a power of two)"),
        Case("any_heads", [9, 3, 3], {}, "9 heads, like SmolLM2"),
        Case("decode_alignment", [8, 1, kv], {}, f"1 query (decoding), {kv} keys"),
        Case("decode_alignment", [4, 3, kv + 2], {}, f"3 queries, {kv + 2} keys"),
    ]


register(
    Task(
        id="2.1", chapter="ch02_positional_encoding", title="the sinusoidal position table",
        function="sinusoidal_table", params=("max_len", "d_model", "base"),
        reference=sinusoidal64, make_cases=sinusoidal_cases,
        checks={
            "values": Check(3, "PE[p, 2i] = sin(p / base^(2i/d_model)) and PE[p, 2i+1] = cos(same angle): "
                               "i counts pairs (0 .. d_model/2 - 1), sin and cos interleaved, positions from 0"),
            "base": Check(2, "use the `base` argument, not a hard-coded 10000"),
            "long_positions": Check(2, "at position 4000 the angle needs about 7 significant digits before "
                                       "sin/cos, all that float32 has: compute the angles in float64 and "
                                       "cast the table to float32 at the end"),
        },
        common=False, atol=2e-5, rtol=0.0,
    ),
    Task(
        id="2.2", chapter="ch02_positional_encoding", title="rotary position embedding (RoPE)",
        function="apply_rope", params=("x", "positions", "base"),
        reference=rope64, make_cases=rope_cases,
        checks={
            "values": Check(3, "half-split layout: feature i pairs with i + D/2 and turns by angle "
                               "position * base^(-2i/D): (a, b) -> (a cos - b sin, a sin + b cos)"),
            "positions": Check(2, "use the `positions` argument (B, T) of each token, not 0..T-1: left-padded "
                                  "rows and cached decoding start elsewhere"),
            "relative": Check(3, "both features of a pair must turn by the same angle (a rotation), so that "
                                 "R(m)q . R(n)k depends only on m - n"),
        },
        atol=2e-4, rtol=1e-4,
    ),
    Task(
        id="2.3", chapter="ch02_positional_encoding", title="GGUF's RoPE layout to the half-split layout",
        function="adjacent_to_half", params=("w", "n_heads"),
        reference=layout64, make_cases=layout_cases,
        checks={
            "values": Check(2, "within a head, rows 2i and 2i+1 (a pair) move to rows i and i + D/2: view the "
                               "rows as (D/2, 2), swap those two axes, flatten"),
            "heads": Check(2, "the permutation works head by head: view the rows as (n_heads, D/2, 2, in) "
                              "with D = rows / n_heads"),
            "smollm_logits": Check(3, "the same conversion must serve Q (9 heads) and K (3 heads) of all 30 "
                                      "layers and give back exactly the engine's SmolLM2"),
        },
        harness_source=HARNESS, memory_mb=8192, seeds=(0,), hidden_seeds=(1,), atol=1e-6, rtol=0.0,
    ),
    Task(
        id="2.4", chapter="ch02_positional_encoding", title="the ALiBi bias", function="alibi_bias",
        params=("n_heads", "q_len", "kv_len"), reference=alibi64, make_cases=alibi_cases,
        checks={
            "values": Check(3, "bias[h, i, j] = -slope_h * (distance from key j to query i), 0 on the diagonal, "
                               "-inf for keys after the query; slope_h = 2^(-8(h+1)/n_heads)"),
            "any_heads": Check(2, "for a head count n that is not a power of two, take the slopes of the largest "
                                  "power of two m < n, then slopes 0, 2, 4, ... of the 2m-head sequence"),
            "decode_alignment": Check(2, "queries are the last q_len of the kv_len positions: query i sits at "
                                         "position i + kv_len - q_len"),
        },
        common=False,
    ),
)
