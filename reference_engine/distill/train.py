"""Training a student on the teacher's outputs: the loop, its schedule, and checkpoints
that survive an interrupted run.

One step: the teacher's final hidden states (no gradient), the student's (with), the
loss on the head's logits a chunk of positions at a time (`losses.chunked_distill_backward`),
gradient clipping, AdamW. The learning rate warms up linearly, then decays along a cosine
to a tenth of its peak. The batches are fixed by the seed and the step number alone, so a
run resumed from a checkpoint sees exactly the batches it would have seen.

The embedding (which is also the tied LM head, a third of the parameters) is frozen by
default: it is the teacher's, and the student reads and writes the same vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..compression.quality import Quality, compare
from ..errors import DojoError
from .losses import KL_DIRECTIONS, check_temperature, chunked_distill_backward


@dataclass
class DistillConfig:
    steps: int = 100  # optimizer steps (the schedule's length)
    batch: int = 4  # windows per step
    lr: float = 1e-3  # peak learning rate (20 steps at 1e-3 take a 15-block SmolLM2 student from perplexity 509 to 56)
    warmup: int = 10  # steps of linear warm-up from lr / warmup
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW's, on matrices only (not norms)
    clip: float = 1.0  # max global gradient norm
    alpha: float = 0.5  # weight of the soft loss; 1 - alpha on cross-entropy (0: no teacher)
    temperature: float = 2.0
    direction: str = "forward"  # "forward" KL(teacher || student) or "reverse"
    chunk: int = 256  # positions whose logits are computed at once
    seed: int = 0
    train_embeddings: bool = False  # the tied embedding / head

    def check(self) -> None:
        check_temperature(self.temperature)
        if not 0 <= self.alpha <= 1:
            raise DojoError(f"alpha weighs the soft loss against cross-entropy: in [0, 1], got {self.alpha}")
        if self.direction not in KL_DIRECTIONS:
            raise DojoError(f"KL direction is 'forward' or 'reverse'; got {self.direction!r}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise DojoError(f"steps, batch and lr must be positive; got {self.steps}, {self.batch}, {self.lr}")


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up over cfg.warmup steps, then a cosine from lr down to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_rows(step: int, n_windows: int, batch: int, seed: int) -> torch.Tensor:
    """The window indices of step `step`: epochs of a seeded permutation, a function of the step alone."""
    first = step * batch
    rows = []
    for i in range(first, first + batch):
        epoch, k = divmod(i, n_windows)
        rows.append(int(torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 10_007 + epoch))[k]))
    return torch.tensor(rows)


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The final-normed hidden states (B, T, d) that the head turns into logits."""
    B, T = ids.shape
    x, rope, mask = model.embed(ids, 0, torch.arange(T).expand(B, T), None)
    for layer in model.layers:
        x = layer(x, rope, 0, mask)
    return model.norm(x)


class TeacherCache:
    """The teacher's final hidden states per training window, computed the first time a
    window is seen: runs that train on the same windows (the lesson's runs compared at one
    step budget, or a forward and a reverse run on the same text) pay for the teacher once.

    Hidden states rather than logits: 576 numbers per position instead of 49,152, and the
    teacher's head turns them into the logits a forward of that window gives (to float
    rounding where the window first ran in another batch), so the full distribution is
    kept (a top-k cache would cut the tail that temperature raises).
    A 256-token window takes 590 KB; the cache lives in memory, for one process's runs, and
    holds only while the teacher's weights do not change."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}  # window tokens -> (T, d)
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, d) for windows ids (B, T), running the teacher only on windows not seen yet."""
        keys = [tuple(row.tolist()) for row in ids]  # the tokens themselves: equal windows, one entry
        first = {}  # each window not cached yet, once, at its first row
        for i, k in enumerate(keys):
            if k not in self.rows:
                first.setdefault(k, i)
        if first:
            for k, h in zip(first, final_hidden(self.teacher, ids[list(first.values())])):
                self.rows[k] = h
        self.misses += len(first)
        self.hits += len(keys) - len(first)
        return torch.stack([self.rows[k] for k in keys])


def trainable(student, cfg: DistillConfig) -> list[tuple[str, torch.nn.Parameter]]:
    params = []
    for name, p in student.named_parameters():
        p.requires_grad_(cfg.train_embeddings or not name.startswith("tok_embeddings"))
        if p.requires_grad:
            params.append((name, p))
    return params


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: DistillConfig) -> torch.optim.AdamW:
    matrices = [p for _, p in params if p.dim() >= 2]
    vectors = [p for _, p in params if p.dim() < 2]  # norm weights: no decay
    return torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                              {"params": vectors, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def train_step(student, teacher, ids: torch.Tensor, valid: torch.Tensor, cfg: DistillConfig,
               optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
               cache: TeacherCache | None = None) -> dict[str, float]:
    """One optimizer step on windows ids (B, T); valid (B, T) False on padding. Position t
    predicts token t + 1, so the last position has no target and padding targets are masked.
    With `cache`, the teacher's hidden states come from it (computed there once per window)."""
    optimizer.zero_grad(set_to_none=True)
    targets = ids[:, 1:].reshape(-1)
    keep = valid[:, 1:].reshape(-1) & valid[:, :-1].reshape(-1)
    teacher_hidden = None
    if cfg.alpha > 0:
        with torch.no_grad():
            hidden = cache(ids) if cache is not None else final_hidden(teacher, ids)
            teacher_hidden = hidden[:, :-1].reshape(-1, teacher.config.d_model)
    student_hidden = final_hidden(student, ids)[:, :-1].reshape(-1, student.config.d_model)
    out = chunked_distill_backward(student_hidden, teacher_hidden, student.head, teacher.head, targets, keep,
                                   chunk=cfg.chunk, alpha=cfg.alpha, temperature=cfg.temperature,
                                   direction=cfg.direction)
    out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
    optimizer.step()
    return out


# -- checkpoints -------------------------------------------------------------------------------------


def run_identity(cfg: DistillConfig, blocks: list[int], data: str, teacher_name: str) -> dict:
    """What makes two runs the same run: a checkpoint resumes only the run that wrote it."""
    return {"config": asdict(cfg), "blocks": blocks, "data": data, "teacher": teacher_name}


def save_checkpoint(path: Path, student, optimizer: torch.optim.Optimizer, step: int, identity: dict) -> None:
    """The student's weights, AdamW's moments and the step, as one safetensors file,
    written to a temporary name and renamed: an interrupted save leaves the previous one."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in student.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"optim.{i}.{key}"] = state[key].contiguous()
        tensors[f"optim.{i}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"step": str(step), "run": json.dumps(identity, sort_keys=True)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, student, optimizer: torch.optim.Optimizer, identity: dict) -> int:
    """Restore a checkpoint of this same run; returns the step to continue from."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 (a damaged or foreign file: say which and what to do)
        raise DojoError(f"{path} is not a readable distillation checkpoint ({type(e).__name__}: {e}); "
                        "remove it or pass another --checkpoint") from None
    theirs = json.loads(meta.get("run", "{}"))
    if theirs != json.loads(json.dumps(identity, sort_keys=True)):
        differ = sorted(k for k in set(theirs.get("config", {})) | set(identity["config"])
                        if theirs.get("config", {}).get(k) != identity["config"].get(k))
        differ += [k for k in ("blocks", "data", "teacher") if theirs.get(k) != identity[k]]
        raise DojoError(f"{path} is a checkpoint of another run (it differs in: {', '.join(differ) or 'everything'}). "
                        "Resume with the same settings, or pass a new --checkpoint path.")
    student.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state = optimizer.state_dict()
    for i in range(sum(len(group["params"]) for group in state["param_groups"])):
        if f"optim.{i}.exp_avg" in tensors:
            state["state"][i] = {"step": tensors[f"optim.{i}.step"][0].clone(),
                                 "exp_avg": tensors[f"optim.{i}.exp_avg"], "exp_avg_sq": tensors[f"optim.{i}.exp_avg_sq"]}
    optimizer.load_state_dict(state)
    return int(meta["step"])


# -- the loop ------------------------------------------------------------------------------------------


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)  # T^2-scaled soft KL on the training batch
    ce: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    resumed_from: int = 0


def distill(student, teacher, windows: torch.Tensor, cfg: DistillConfig, valid: torch.Tensor | None = None,
            checkpoint: str | os.PathLike | None = None, identity: dict | None = None, save_every: int = 25,
            progress: bool = True, cache: TeacherCache | None = None) -> History:
    """Train `student` in place for cfg.steps steps on token windows (N, T) (valid: False
    on padding). With `checkpoint`, an existing checkpoint of the same run is resumed and a
    new one is written every `save_every` steps and at the end. With `cache` (a
    `TeacherCache` of this teacher), windows another run already showed the teacher are
    not run through it again."""
    cfg.check()
    if cache is not None and cache.teacher is not teacher:
        raise DojoError("this TeacherCache holds another teacher's hidden states: make one with TeacherCache(teacher)")
    if len(windows) < 1:
        raise DojoError("no training windows")
    valid = torch.ones_like(windows, dtype=torch.bool) if valid is None else valid
    named = trainable(student, cfg)
    params = [p for _, p in named]
    optimizer = make_optimizer(named, cfg)
    student.train()
    history, start = History(), 0
    path = Path(checkpoint) if checkpoint is not None else None
    identity = identity or run_identity(cfg, [], "text", "")
    if path is not None and path.exists():
        start = history.resumed_from = load_checkpoint(path, student, optimizer, identity)
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="distilling", unit="step", initial=start, total=cfg.steps,
               disable=not progress)
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            rows = batch_rows(step, len(windows), cfg.batch, cfg.seed)
            out = train_step(student, teacher, windows[rows], valid[rows], cfg, optimizer, params, cache)
            tokens += int(valid[rows].sum())
            history.steps.append(step)
            for k in ("loss", "kl", "ce"):
                getattr(history, k).append(out[k])
            history.tokens_per_s = tokens / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{history.tokens_per_s:.0f}")
            if path is not None and ((step + 1) % save_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(path, student, optimizer, step + 1, identity)
    finally:
        student.eval()
        for p in params:
            p.requires_grad_(False)
    return history


def evaluate(student, reference_logprobs: list[torch.Tensor], windows: torch.Tensor) -> Quality:
    """Held-out perplexity, KL(teacher || student) at T = 1 and top-1 agreement."""
    return compare(reference_logprobs, student, windows)
