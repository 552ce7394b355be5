"""3.4 acceptance_rate: tests every draft token and counts all the accepted ones, instead of stopping at the first rejection."""
import torch


def accept_or_resample(p, q, draft, generator=None):
    accepted, first_rejected = 0, None
    for i, x in enumerate(draft):
        if torch.rand((), generator=generator, dtype=torch.float64) < p[i, x] / q[i, x]:
            accepted += 1
        elif first_rejected is None:
            first_rejected = i
    if first_rejected is None:
        return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))
    residual = (p[first_rejected] - q[first_rejected]).clamp(min=0)
    return accepted, int(torch.multinomial(residual, 1, generator=generator))
