"""2.3 values: llama.cpp's permutation applied again instead of undone (half -> adjacent)."""


def adjacent_to_half(w, n_heads):
    rows, cols = w.shape
    D = rows // n_heads
    return w.reshape(n_heads, 2, D // 2, cols).transpose(1, 2).reshape(rows, cols)
