"""3.4 target_distribution: after a rejection, draws the replacement from p instead of max(0, p - q), which over-weights tokens the draft already proposes."""
import torch


def accept_or_resample(p, q, draft, generator=None):
    for i, x in enumerate(draft):
        if torch.rand((), generator=generator, dtype=torch.float64) < p[i, x] / q[i, x]:
            continue
        return i, int(torch.multinomial(p[i], 1, generator=generator))
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))
