"""3.4 bonus_token: when every draft token is accepted, draws the bonus from p at the last draft position instead of the row after it."""
import torch


def accept_or_resample(p, q, draft, generator=None):
    for i, x in enumerate(draft):
        if torch.rand((), generator=generator, dtype=torch.float64) < p[i, x] / q[i, x]:
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(draft), int(torch.multinomial(p[len(draft) - 1], 1, generator=generator))
