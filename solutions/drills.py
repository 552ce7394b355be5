"""Solutions of the practice drills that have no notebook (`grading/chapters/drills.py`):
the source articles' two programming problems, on SmolLM2's hidden states."""

import torch
import torch.nn.functional as F


def train_classifier(features, labels, n_classes, device):
    x, y = features.to(device), labels.to(device)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std  # standardized: one learning rate suits every feature
    weight = torch.zeros(n_classes, x.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(n_classes, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=0.05, weight_decay=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(z @ weight.T + bias, y).backward()
        optimizer.step()
    with torch.no_grad():
        folded = weight / std  # w . (x - m) / s + b = (w / s) . x + (b - (w / s) . m)
        return folded, bias - folded @ mean


def int8_logits(features, weight, bias):
    def quantize(rows):
        scale = rows.abs().amax(dim=1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero row: codes 0
        return torch.round(rows / safe[:, None]).clamp(-127, 127).to(torch.int32), scale

    qx, sx = quantize(features)
    qw, sw = quantize(weight)
    sums = (qx.double() @ qw.double().T)  # exact: |sum| < 2^53 (int32 accumulation on hardware that has it)
    return (sums * sx[:, None].double() * sw[None, :].double()).float() + bias
