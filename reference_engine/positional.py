"""Every positional encoding the course teaches, building blocks first.

Attention by itself is blind to order: permute the tokens and each output row is permuted
the same way. A positional encoding breaks that symmetry, in one of three places:
  - added to the embeddings once, at the bottom of the stack:
      `sinusoidal_table` (fixed sines and cosines) or a learned table (`nn.Embedding` in
      `model.py`, GPT-2);
  - applied to the queries and keys of every layer: RoPE rotates each pair of features by
    an angle proportional to the position, so the score R(m)q . R(n)k depends only on the
    offset m - n (`rope_tables`, `apply_rope`, in either pairing layout);
  - added to the attention scores: ALiBi subtracts slope_h * distance (`alibi_bias`).

RoPE pairs features in one of two layouts, which give the same model once the weight rows
are permuted to match (`adjacent_to_half_rows`, `half_to_adjacent_rows`):
  - "half":     feature i with feature i + D/2 (HF transformers, this engine's default);
  - "adjacent": feature 2i with feature 2i + 1 (the RoPE paper, llama.cpp, GGUF files).
`rope_tables` also stretches a model past its trained length: "linear" position
interpolation divides positions by a factor; "ntk" raises the base instead, which slows
the low frequencies and leaves the high ones almost unchanged.
"""

from __future__ import annotations

import math

import torch

# -- added to the embeddings --------------------------------------------------------------


def sinusoidal_table(max_len: int, d_model: int, base: float = 10000.0, dtype=torch.float32) -> torch.Tensor:
    """PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)), shape (max_len, d).

    i counts feature *pairs* (0 .. d/2 - 1), so the wavelengths 2*pi*base^(2i/d) grow
    geometrically from 2*pi (i = 0) to almost 2*pi*base (the last pair).
    Example: d_model=4, p=1 -> [sin 1, cos 1, sin 0.01, cos 0.01] with base 10000.
    """
    inv_freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d/2,)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (max_len, d/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (max_len, d/2, 2): sin, cos per pair
    return table.reshape(max_len, d_model).to(dtype)  # interleaved: sin, cos, sin, cos, ...


# -- rotary (RoPE) --------------------------------------------------------------------------


ROPE_LAYOUTS = ("half", "adjacent")
ROPE_SCALINGS = ("none", "linear", "ntk")


def rope_frequencies(head_dim: int, base: float, scaling: str = "none", factor: float = 1.0) -> torch.Tensor:
    """inv_freq[i] = base^(-2i / head_dim) for i = 0 .. head_dim/2 - 1, float64, with scaling:

    "linear" (position interpolation): every frequency / factor, the same as feeding
        position p / factor; a model trained on L positions then covers factor * L, at the
        price of packing neighbouring tokens closer than it ever saw.
    "ntk": base * factor^(D / (D - 2)). The fastest pair (i = 0, which tells neighbours
        apart) is unchanged; the slowest is divided by exactly `factor`, like "linear".
    """
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling must be one of {ROPE_SCALINGS}, got {scaling!r}")
    if scaling == "ntk":
        base = base * factor ** (head_dim / (head_dim - 2))
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    return inv_freq / factor if scaling == "linear" else inv_freq


def rope_tables(head_dim: int, max_seq_len: int, base: float, layout: str = "half",
                scaling: str = "none", factor: float = 1.0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle[p, i] = p * inv_freq[i], each shape (max_seq_len, head_dim).

    Each of the head_dim/2 angles appears twice, at the two features it rotates:
    [a0 .. a_{D/2-1}, a0 .. a_{D/2-1}] in the "half" layout, [a0, a0, a1, a1, ...] in the
    "adjacent" layout. Computed in float64 so that positions near 8192 keep full float32
    accuracy (p * inv_freq in float32 loses about 3 digits there).
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    inv_freq = rope_frequencies(head_dim, base, scaling, factor)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (S, D/2)
    if layout == "half":
        angles = torch.cat([angles, angles], dim=-1)  # (S, D)
    else:
        angles = angles.repeat_interleave(2, dim=-1)  # (S, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate_adjacent(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): each adjacent pair turned by 90 degrees."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (..., D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotate x of shape (B, T, H, D) with cos/sin of shape (B, T, 1, D), already gathered at
    each token's position and built for the same layout: x * cos + rotate(x) * sin.

    Per pair (a, b) at angle t this is (a cos t - b sin t, a sin t + b cos t): a 2-D rotation.
    """
    rotate = rotate_half if layout == "half" else rotate_adjacent
    return x * cos + rotate(x) * sin


def adjacent_to_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection (n_heads * D, in) from the adjacent-pair layout
    to the half-split layout, head by head, so that `apply_rope(..., "half")` on the new
    rows gives the same scores as `apply_rope(..., "adjacent")` on the old ones.

    Within a head, rows 2i and 2i+1 (rotated together) move to rows i and i + D/2.
    Example (one head, D=4): rows [a0, b0, a1, b1] -> [a0, a1, b0, b1].
    subtle: K has n_kv_heads heads, not n_heads; the permutation is per head, so the wrong
    count scrambles rows across heads.
    """
    out_features = w.shape[0]
    D = out_features // n_heads
    w = w.reshape(n_heads, D // 2, 2, *w.shape[1:])  # (H, D/2, pair, ...)
    return w.transpose(1, 2).reshape(w.shape[0] * D, *w.shape[3:])  # (H, pair, D/2, ...) -> rows


def half_to_adjacent_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `adjacent_to_half_rows` (what llama.cpp's converter does to HF weights).
    Example (one head, D=4): rows [a0, a1, b0, b1] -> [a0, b0, a1, b1]."""
    out_features = w.shape[0]
    D = out_features // n_heads
    w = w.reshape(n_heads, 2, D // 2, *w.shape[1:])  # (H, pair, D/2, ...)
    return w.transpose(1, 2).reshape(w.shape[0] * D, *w.shape[3:])  # (H, D/2, pair, ...) -> rows


# -- added to the scores (ALiBi) ------------------------------------------------------------


def alibi_slopes(n_heads: int, dtype=torch.float32) -> torch.Tensor:
    """Per-head slopes of ALiBi, a geometric sequence, shape (n_heads,).

    n a power of two: slope_h = 2^(-8 (h + 1) / n), h = 0 .. n-1 (n=8: 1/2, 1/4, ... 1/256).
    Otherwise (the paper's recipe): the slopes for the largest power of two m < n, then
    every other slope of the 2m-head sequence (its odd-numbered ones, which interleave
    with the first m) until there are n.
    Example: n=4 -> [0.25, 0.0625, 0.015625, 0.00390625].
    """
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    m = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(m) + power_of_two(2 * m)[0::2][: n_heads - m]
    return torch.tensor(slopes, dtype=dtype)


def alibi_bias(n_heads: int, q_len: int, kv_len: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Additive attention bias (n_heads, q_len, kv_len):
    bias[h, i, j] = -slope_h * (i + kv_len - q_len - j) where key j is at or before query i,
    -inf after it (the causal mask). Queries are the last q_len of the kv_len positions.
    Example: 1 head (slope 1/256), q_len=2, kv_len=3 ->
        [[-1/256,      0,  -inf],
         [-2/256, -1/256,    0]]
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (q_len, 1)
    distance = (q_pos - torch.arange(kv_len, device=device)[None, :]).to(dtype)  # (q_len, kv_len)
    slopes = alibi_slopes(n_heads, dtype).to(device)[:, None, None]  # (H, 1, 1)
    bias = -slopes * distance  # (H, q_len, kv_len)
    return bias.masked_fill(distance < 0, float("-inf"))
