"""The trusted machinery chapter 6's model-level tasks run the learner's code in: a small
random teacher whose blocks a student is made of, and small students trained for a step or
two with the learner's step function. Runs in the grader's child (before the learner's
code) and in the notebook kernel; the cases are in `ch06_distillation.py`.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch

from ...config import ModelConfig
from ...distill.losses import distill_loss
from ...model import Transformer

# Deep enough for block subsets that must be renumbered (blocks 9, 10, 11 -> 0, 1, 2),
# small enough to build at once.
TEACHER = dict(vocab_size=64, d_model=32, n_layers=12, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64,
               max_seq_len=64)
STUDENT = dict(TEACHER, n_layers=2)


def seeded(config: dict, seed: int) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    model = Transformer(ModelConfig.from_name("tiny", **config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embeddings" in name else p.shape[-1] ** -0.5))
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model.requires_grad_(False)


@lru_cache(maxsize=None)
def teacher() -> Transformer:
    return seeded(TEACHER, 0)


# -- 6.4 a student made of teacher blocks --------------------------------------------------------------


def run_student(make_state, blocks: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of the student whose weights make_state(teacher_state, blocks) returns,
    loaded strictly (every key the student has, no other) into a model of len(blocks) blocks."""
    state = make_state(dict(teacher().state_dict()), blocks.tolist())
    if not isinstance(state, dict):
        raise TypeError(f"returned {type(state).__name__}, not a dict of tensors")
    student = Transformer(replace(teacher().config, n_layers=len(blocks))).eval()
    student.load_state_dict(state, strict=True)
    with torch.no_grad():
        return student(ids)


# -- 6.5 one training step -----------------------------------------------------------------------------


def optimizer_for(model: Transformer, kind: int) -> torch.optim.Optimizer:
    """0: AdamW (what training uses); 1: SGD, whose step is proportional to the gradient, so
    clipping and stale gradients show up at once (Adam's first step nearly ignores scale)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-2) if kind == 0 else torch.optim.SGD(params, lr=0.5)


def run_steps(step, ids, teacher_logits, alpha, temperature, max_norm, n_steps, optimizer_kind) -> list[torch.Tensor]:
    """[the student's parameters after n_steps calls of step(...) on the same batch, flattened;
    the loss the last call returned]."""
    student = seeded(STUDENT, 1).requires_grad_(True)
    optimizer = optimizer_for(student, int(optimizer_kind))
    loss = None
    for _ in range(int(n_steps)):
        loss = step(student, optimizer, ids, teacher_logits, float(alpha), float(temperature), float(max_norm))
    params = torch.cat([p.detach().flatten() for p in student.parameters()])
    return [params, torch.as_tensor(loss, dtype=torch.float32).detach().reshape(())]


def reference_step(student, optimizer, ids, teacher_logits, alpha, temperature, max_norm):
    """The step the learner's must match: zero the gradients, the mixed loss averaged over the
    predicted positions, backward, clip the global norm, step."""
    optimizer.zero_grad()
    logits = student(ids)
    V = logits.shape[-1]
    n = ids[:, 1:].numel()
    losses = distill_loss(logits[:, :-1].reshape(-1, V), teacher_logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1),
                          torch.ones(n, dtype=torch.bool), alpha, temperature)
    loss = losses["loss"] / n
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm)
    optimizer.step()
    return loss.detach()
