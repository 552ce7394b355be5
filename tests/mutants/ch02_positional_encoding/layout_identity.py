"""2.3 values: the rows returned unchanged (a loader that forgets the permutation)."""


def adjacent_to_half(w, n_heads):
    return w.clone()
