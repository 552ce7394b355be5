"""The losses of knowledge distillation, and how to compute them without holding the
vocabulary-sized tensors of a whole batch.

A teacher's next-token distribution says more than the one token that came next: which
other tokens were plausible and how much ("dark knowledge", Hinton et al., 2015). The
student learns it by matching the teacher's distribution at temperature T:

  p = softmax(z_teacher / T),  q = softmax(z_student / T)
  forward KL   KL(p || q) = sum_v p_v (log p_v - log q_v)   mass-covering: q must put
               probability wherever p does
  reverse KL   KL(q || p) = sum_v q_v (log q_v - log p_v)   mode-seeking: q may drop some
               of p's modes but is punished for mass where p has none

Both are scaled by T^2: the gradient of the soft loss with respect to the student's logits
is (q - p) / T, and q - p itself shrinks like 1/T once T is large, so the gradient falls as
1/T^2; multiplying by T^2 keeps the soft loss's weight against the cross-entropy the same
whatever T is (Hinton et al., section 2).

Every loss is a sum over the vocabulary and a mean over the predicted positions that are
not padding ("batchmean" per token, not a mean over the 49152 vocabulary entries).
"""

from __future__ import annotations

import torch

from ..errors import DojoError

KL_DIRECTIONS = ("forward", "reverse")


def check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise DojoError(f"the distillation temperature divides the logits: it must be > 0, got {temperature}")
    return float(temperature)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            direction: str = "forward") -> torch.Tensor:
    """T^2 * KL per position at temperature T: (..., V) logits -> (...) float32.

    Example: equal logits give 0; soft_kl(s, t, 2.0) == 4 * KL(softmax(t / 2) || softmax(s / 2))."""
    check_temperature(temperature)
    if direction not in KL_DIRECTIONS:
        raise DojoError(f"KL direction is 'forward' (teacher || student) or 'reverse'; got {direction!r}")
    log_q = (student_logits.float() / temperature).log_softmax(-1)
    log_p = (teacher_logits.float() / temperature).log_softmax(-1)
    if direction == "reverse":
        log_p, log_q = log_q, log_p  # KL(q || p): the student's distribution weighs the terms
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def next_token_ce(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log q(target) per position at temperature 1: (..., V), (...) -> (...)."""
    return -student_logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                 valid: torch.Tensor, alpha: float = 0.5, temperature: float = 2.0,
                 direction: str = "forward") -> dict[str, torch.Tensor]:
    """alpha * soft KL + (1 - alpha) * cross-entropy, each summed over the positions where
    `valid` is True (positions, not vocabulary entries), not yet divided by their count.

    student_logits, teacher_logits: (N, V) for N predicted positions; targets (N,) the
    true next tokens; alpha 1 is distillation only, 0 cross-entropy only (teacher_logits
    may then be None, and "kl" is NaN)."""
    valid = valid.float()
    ce = (next_token_ce(student_logits, targets) * valid).sum()  # reported even when alpha = 1
    if teacher_logits is None:
        if alpha > 0:
            raise DojoError("a soft loss (alpha > 0) needs the teacher's logits")
        return {"loss": ce, "kl": torch.full((), float("nan")), "ce": ce.detach()}
    kl = (soft_kl(student_logits, teacher_logits, temperature, direction) * valid).sum()
    return {"loss": alpha * kl + (1 - alpha) * ce, "kl": kl.detach(), "ce": ce.detach()}


def chunked_distill_backward(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, student_head,
                             teacher_head, targets: torch.Tensor, valid: torch.Tensor, chunk: int = 256,
                             **loss_kwargs) -> dict[str, float]:
    """Backpropagate the mean distillation loss of N positions from their final hidden
    states, `chunk` positions at a time. Returns the mean loss, KL and cross-entropy.

    subtle: the logits of a batch are its largest tensors by far (8 x 256 positions x 49152
    x 4 bytes = 400 MB each, and log-softmax, probabilities and their gradients make
    several). The hidden states are small (576 per position), so the head runs on one
    chunk at a time: its loss is backpropagated at once into a detached copy of the
    hidden states, whose accumulated gradient then goes through the blocks in one
    backward. Peak: a few chunk x V tensors (256 x 49152 x 4 bytes = 50 MB each).

    student_hidden: (N, d) with grad; teacher_hidden: (N, d') without (None for alpha = 0);
    targets, valid: (N,)."""
    count = valid.sum().clamp(min=1)
    leaf = student_hidden.detach().requires_grad_(True)
    totals = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
    for start in range(0, len(leaf), chunk):
        part = slice(start, start + chunk)
        with torch.no_grad():
            teacher_logits = None if teacher_hidden is None else teacher_head(teacher_hidden[part])
        losses = distill_loss(student_head(leaf[part]), teacher_logits, targets[part], valid[part], **loss_kwargs)
        (losses["loss"] / count).backward()  # frees this chunk's logits and accumulates leaf.grad
        for k in totals:
            totals[k] += float(losses[k].detach()) / float(count)
    student_hidden.backward(leaf.grad)
    return totals
