"""Perplexity on real text that every Python installation ships: the pydoc topics
(`pydoc_data.topics`, about 465 kB of English documentation prose).

    perplexity = exp(mean over predicted tokens of -log p(token | tokens before it))

The text is cut into non-overlapping windows of `window` tokens; each window is scored
on its own, so the first tokens of a window see less context than in a sliding scheme.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import DojoError


def pydoc_topics() -> str:
    """All of the pydoc topics, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def reference_text(n_chars: int = 40_000) -> str:
    """The first n_chars of the pydoc topics: the text `perplexity` scores."""
    return pydoc_topics()[:n_chars]


@torch.inference_mode()
def perplexity(model, tokenizer, text: str | None = None, window: int = 512, max_windows: int = 8) -> float:
    """Perplexity of `model` on `text` (default: `reference_text()`)."""
    ids = tokenizer.encode(text if text is not None else reference_text())
    window = min(window, model.config.max_seq_len)
    n_windows = min(max_windows, len(ids) // window)
    if n_windows == 0:
        raise DojoError(f"the text has {len(ids)} tokens; perplexity needs at least one window of {window}")
    chunks = torch.tensor(ids[: n_windows * window], device=model.tok_embeddings.weight.device)
    chunks = chunks.view(n_windows, window)  # (N, window)
    total_nll = 0.0
    for chunk in chunks:
        logits = model(chunk[None])  # (1, window, V)
        # position t predicts token t+1
        total_nll += F.cross_entropy(logits[0, :-1].double(), chunk[1:], reduction="sum").item()
    return math.exp(total_nll / (n_windows * (window - 1)))
