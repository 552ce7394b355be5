"""1.1 no_caching: remembers the answer for a shape and returns it for new values."""
import torch

_seen = {}


def stable_softmax(x, dim=-1):
    key = (tuple(x.shape), dim)
    if key not in _seen:
        e = (x - x.amax(dim, keepdim=True)).exp()
        _seen[key] = e / e.sum(dim, keepdim=True)
    return _seen[key]
