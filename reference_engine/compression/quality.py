"""How far a compressed model is from its reference, beside perplexity (as llama.cpp's
perplexity tool reports it):

  - KL divergence KL(P_ref || P_model) of the next-token distributions, averaged over the
    predicted positions (nats per token): 0 only when the two distributions agree, and it
    sees changes to the whole distribution that perplexity, which looks only at the
    probability of the token that came next, averages away;
  - top-1 agreement: how often both models put the same token first (greedy decoding
    follows the reference exactly as long as this holds).

For SmolLM2 the reference is the float32 model dequantized from the file (there is no
unquantized SmolLM2 offline): requantizing weights that were already 4-bit flatters the
formats that can represent those values again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class Quality:
    perplexity: float
    reference_perplexity: float
    kl: float  # mean KL(reference || model), nats per predicted token
    top1: float  # fraction of positions where both models rank the same token first
    tokens: int  # predicted positions compared

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def reference_logprobs(reference, windows: torch.Tensor) -> list[torch.Tensor]:
    """The reference's next-token log-probabilities on each window, (W - 1, vocab) float32
    each: compute them once to compare several models (SmolLM2: 200 KB per position)."""
    return [reference(window[None])[0, :-1].double().log_softmax(-1).float() for window in windows]


@torch.inference_mode()
def compare(reference, model, windows: torch.Tensor) -> Quality:
    """Score `model` against `reference` (a model, or its `reference_logprobs`) on token
    windows (N, W), one window at a time, in float64."""
    nll_ref = nll = kl = 0.0
    agree = total = 0
    for i, window in enumerate(windows):
        target = window[1:]
        ref = (reference[i].double() if isinstance(reference, list)
               else reference(window[None])[0, :-1].double().log_softmax(-1))  # (W - 1, V)
        out = model(window[None])[0, :-1].double().log_softmax(-1)
        rows = torch.arange(len(target))
        nll_ref -= ref[rows, target].sum().item()
        nll -= out[rows, target].sum().item()
        kl += (ref.exp() * (ref - out)).sum().item()
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        total += len(target)
    return Quality(math.exp(nll / total), math.exp(nll_ref / total), kl / total, agree / total, total)
