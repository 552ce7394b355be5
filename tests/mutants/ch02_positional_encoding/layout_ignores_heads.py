"""2.3 heads: the whole matrix permuted as if it were one head."""


def adjacent_to_half(w, n_heads):
    rows, cols = w.shape
    return w.reshape(rows // 2, 2, cols).transpose(0, 1).reshape(rows, cols)
