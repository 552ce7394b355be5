"""Correct learner code for chapter-1 tasks, for tests that need an honest neighbour to an
attack or a mistake (the solutions notebook is the reference for the grader itself)."""

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

GOOD_SOFTMAX = "def stable_softmax(x, dim=-1):\n    e = (x - x.amax(dim, keepdim=True)).exp()\n    return e / e.sum(dim, keepdim=True)\n"
GOOD_SDPA = (
    "import math\n\n"
    "def scaled_dot_product_attention(q, k, v, key_valid=None, causal=False):\n"
    "    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n"
    "    Tq, Tk = scores.shape[-2:]\n"
    "    visible = torch.ones(Tq, Tk, dtype=torch.bool)\n"
    "    if causal:\n"
    "        visible = visible.tril(Tk - Tq)\n"
    "    if key_valid is not None:\n"
    "        visible = visible & key_valid[:, None, None, :]\n"
    "    scores = scores.masked_fill(~visible, float('-inf'))\n"
    "    peak = scores.amax(-1, keepdim=True)\n"
    "    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))\n"
    "    e = (scores - peak).exp()\n"
    "    total = e.sum(-1, keepdim=True)\n"
    "    return torch.where(total > 0, e / total, torch.zeros_like(e)) @ v\n"
)


def write_nb(path, *cells):
    """A notebook of an `import torch` cell followed by one code cell per string."""
    nbformat.write(new_notebook(cells=[new_code_cell("import torch")] + [new_code_cell(c) for c in cells]), path)
    return path
