"""3.4 target_distribution: accepts with probability min(1, q(x) / p(x)), the ratio upside down."""
import torch


def accept_or_resample(p, q, draft, generator=None):
    for i, x in enumerate(draft):
        if torch.rand((), generator=generator, dtype=torch.float64) < q[i, x] / p[i, x]:
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))
