"""Chapter 6: knowledge distillation. Six tasks: the soft-target loss, reverse KL, the
mixed loss over a batch of windows, a student's weights from teacher blocks, one training
step, and packing the teacher's sequences into padded windows.

The losses are compared with the engine's (`distill/losses.py`) in float64. The cases
are built so that each convention shows: T is never 1 where the T^2 factor or tempering
both sides is at stake, padding positions hold wild logits, teacher and student differ
enough that KL's two directions disagree. The student (6.4) is judged by running it: its
weights are loaded strictly into a model of the right depth and its logits compared with
the engine's `keep_blocks`. The training step (6.5) runs on a small student in the
trusted harness (`ch06_harness.py`) and is compared, parameter by parameter, with a
reference step from the same state; SGD is used where Adam's scale-free first step would
hide a missing clip.
"""

from __future__ import annotations

import torch

from ...compression.structured import keep_blocks
from ...distill.losses import distill_loss, soft_kl
from ..tasks import Case, Check, Task, register
from .ch06_harness import STUDENT, reference_step, run_steps, seeded, teacher

VOCAB = 40


def logits(g, n: int, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=g) * scale


def padded_valid(g, n: int, holes: int) -> torch.Tensor:
    valid = torch.ones(n, dtype=torch.bool)
    valid[torch.randperm(n, generator=g)[:holes]] = False
    return valid


def with_wild_padding(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Padding positions get logits far from anything real: counting them changes the loss a lot."""
    x = x.clone()
    x[~valid] = x[~valid] * 10 + 20
    return x


# -- 6.1 soft-target loss ---------------------------------------------------------------------------------


def soft64(student_logits, teacher_logits, temperature, valid):
    return soft_kl(student_logits, teacher_logits, temperature)[valid].mean()


def soft_cases(g):
    def case(check, n, temperature, holes, note):
        valid = padded_valid(g, n, holes)
        return Case(check, [with_wild_padding(logits(g, n), valid), logits(g, n), temperature, valid], {}, note)

    return [
        case("values", 8, 2.0, 0, "8 positions, T = 2"),
        case("values", 5, 1.5, 0, "5 positions, T = 1.5"),
        case("t_squared", 6, 4.0, 0, "T = 4: the loss carries a factor T^2 = 16"),
        case("both_tempered", 6, 3.0, 0, "T = 3 divides the student's and the teacher's logits"),
        case("batchmean", 12, 2.0, 0, "12 positions, 40-token vocabulary: sum over the vocabulary, mean over positions"),
        case("padding", 10, 2.0, 4, "4 of 10 positions are padding (valid False)"),
    ]


# -- 6.2 reverse KL ----------------------------------------------------------------------------------------


def reverse64(student_logits, teacher_logits, temperature, valid):
    return soft_kl(student_logits, teacher_logits, temperature, "reverse")[valid].mean()


def peaked_pair(g, n: int) -> list[torch.Tensor]:
    """A sharp student and a broad teacher: the two directions of KL differ by a lot."""
    return [logits(g, n, scale=6.0), logits(g, n, scale=1.0)]


def reverse_cases(g):
    def case(check, n, temperature, holes, note):
        valid = padded_valid(g, n, holes)
        student, teacher_ = peaked_pair(g, n)
        return Case(check, [with_wild_padding(student, valid), teacher_, temperature, valid], {}, note)

    return [
        case("values", 8, 2.0, 0, "8 positions, T = 2"),
        case("direction", 6, 1.0, 0, "a sharp student, a broad teacher: KL(q || p) is not KL(p || q)"),
        case("direction", 6, 2.0, 0, "a sharp student, a broad teacher, T = 2"),
        case("t_squared", 5, 4.0, 0, "T = 4"),
        case("padding", 10, 2.0, 3, "3 of 10 positions are padding"),
    ]


# -- 6.3 the mixed loss over windows ---------------------------------------------------------------------------


def mixed64(student_logits, teacher_logits, ids, valid, alpha, temperature):
    V = student_logits.shape[-1]
    keep = valid[:, 1:].reshape(-1)
    out = distill_loss(student_logits[:, :-1].reshape(-1, V), teacher_logits[:, :-1].reshape(-1, V),
                       ids[:, 1:].reshape(-1), keep, alpha, temperature)
    return out["loss"] / keep.sum()


def window_batch(g, B: int, T: int, pad_from: list[int] | None = None) -> list[torch.Tensor]:
    """student logits, teacher logits (B, T, V), ids (B, T), valid (B, T); rows padded on the
    right from pad_from[b] on."""
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, start in enumerate(pad_from or []):
        valid[b, start:] = False
    student = logits(g, B * T).view(B, T, VOCAB)
    student[~valid] = student[~valid] * 10 + 20
    return [student, logits(g, B * T).view(B, T, VOCAB), ids, valid]


def mixed_cases(g):
    return [
        Case("values", window_batch(g, 2, 7) + [0.5, 2.0], {}, "2 windows of 7 tokens, alpha 0.5, T = 2"),
        Case("values", window_batch(g, 3, 5) + [0.3, 1.5], {}, "3 windows of 5 tokens, alpha 0.3, T = 1.5"),
        Case("shift", window_batch(g, 2, 6) + [0.0, 1.0], {},
             "alpha 0 (cross-entropy only): position t predicts token t + 1"),
        Case("alpha", window_batch(g, 2, 6) + [1.0, 2.0], {}, "alpha 1: the soft loss alone"),
        Case("alpha", window_batch(g, 2, 6) + [0.8, 2.0], {}, "alpha 0.8: mostly the soft loss"),
        Case("padding", window_batch(g, 3, 8, pad_from=[8, 5, 3]) + [0.5, 2.0], {},
             "rows 1 and 2 padded on the right from tokens 5 and 3"),
    ]


# -- 6.4 a student from teacher blocks ---------------------------------------------------------------------------

HARNESS_STUDENT = """
    from reference_engine.grading.chapters.ch06_harness import run_student

    def wrap(make_state):
        def call(blocks, ids):
            return run_student(make_state, blocks, ids)
        return call
"""


def student64(blocks, ids):
    with torch.no_grad():
        return keep_blocks(teacher(), blocks.tolist())(ids)


def student_cases(g):
    def ids():
        return torch.randint(0, 64, (2, 10), generator=g)

    return [
        Case("values", [torch.tensor([0, 2, 4, 6, 8, 10]), ids()], {}, "every other block of 12"),
        Case("values", [torch.tensor([0, 1, 5, 11]), ids()], {}, "blocks 0, 1, 5, 11"),
        Case("renumbered", [torch.tensor([9, 10, 11]), ids()], {}, "blocks 9, 10, 11 become the student's 0, 1, 2"),
        Case("renumbered", [torch.tensor([3, 7]), ids()], {}, "blocks 3 and 7 become 0 and 1"),
        Case("order", [torch.tensor([5, 2, 8]), ids()], {}, "blocks in the order given: 5, 2, 8"),
    ]


# -- 6.5 one training step ------------------------------------------------------------------------------------------

HARNESS_STEP = """
    from reference_engine.grading.chapters.ch06_harness import run_steps

    def wrap(step):
        def call(ids, teacher_logits, alpha, temperature, max_norm, n_steps, optimizer_kind):
            return run_steps(step, ids, teacher_logits, alpha, temperature, max_norm, n_steps, optimizer_kind)
        return call
"""


def step64(ids, teacher_logits, alpha, temperature, max_norm, n_steps, optimizer_kind):
    return run_steps(reference_step, ids, teacher_logits.float(), alpha, temperature, max_norm, n_steps,
                     optimizer_kind)


def step_cases(g):
    def batch():
        ids = torch.randint(0, 64, (2, 8), generator=g)
        with torch.no_grad():
            teacher_logits = seeded(STUDENT, 7)(ids)  # another small model of the student's shape
        return [ids, teacher_logits]

    return [
        Case("parameters", batch() + [0.5, 2.0, 100.0, 1, 0], {}, "one AdamW step, alpha 0.5, T = 2", output=0),
        Case("parameters", batch() + [0.7, 1.5, 100.0, 1, 1], {}, "one SGD step, alpha 0.7, T = 1.5", output=0),
        Case("loss", batch() + [0.5, 2.0, 100.0, 1, 0], {}, "the returned loss (before the step)", output=1),
        Case("clipping", batch() + [0.5, 2.0, 0.05, 1, 1], {}, "one SGD step, gradients clipped to norm 0.05",
             output=0),
        Case("fresh_gradients", batch() + [0.5, 2.0, 100.0, 2, 1], {}, "two SGD steps on the same batch",
             output=0),
    ]


# -- 6.6 the teacher's sequences as training windows -------------------------------------------------------------


def pack64(sequences, window, pad_id):
    ids = torch.full((len(sequences), window), pad_id, dtype=torch.long)
    valid = torch.zeros(len(sequences), window, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        seq = seq[:window]
        ids[row, : len(seq)] = seq
        valid[row, : len(seq)] = True
    return ids, valid


def pack_cases(g):
    def seqs(*lengths):
        return [torch.randint(1, 50, (n,), generator=g) for n in lengths]

    return [
        Case("values", [seqs(5, 8, 3), 8, 0], {}, "lengths 5, 8, 3 in windows of 8: ids", output=0),
        Case("values", [seqs(5, 8, 3), 8, 0], {}, "lengths 5, 8, 3 in windows of 8: valid", output=1),
        Case("pad_id", [seqs(2, 6), 6, 49152 - 1], {}, "pad_id 49151: padding holds pad_id", output=0),
        Case("right_padding", [seqs(1, 4, 7), 7, 0], {}, "padding after the tokens, not before them: ids", output=0),
        Case("right_padding", [seqs(1, 4, 7), 7, 0], {}, "padding after the tokens: valid", output=1),
        Case("truncation", [seqs(12, 5), 8, 0], {}, "a sequence of 12 in windows of 8 keeps its first 8", output=0),
    ]


STEP_NAMES = ("torch.nn.utils.clip_grad_norm_", "torch.nn.utils.clip_grad_norm")

register(
    Task(
        id="6.1", chapter="ch06_distillation", title="the soft-target loss", function="soft_target_loss",
        params=("student_logits", "teacher_logits", "temperature", "valid"), reference=soft64,
        make_cases=soft_cases,
        checks={
            "values": Check(3, "p = softmax(teacher / T), log q = log_softmax(student / T); KL(p || q) = "
                               "sum_v p (log p - log q) per position, times T^2, averaged over the valid positions"),
            "t_squared": Check(2, "multiply by T^2: the soft gradients shrink like 1 / T^2, and T^2 keeps their "
                                  "weight against the cross-entropy the same whatever T is"),
            "both_tempered": Check(2, "divide both the student's and the teacher's logits by T"),
            "batchmean": Check(2, "sum over the vocabulary, mean over positions (F.kl_div's reduction='mean' "
                                  "divides by positions x vocabulary)"),
            "padding": Check(2, "average over the positions where valid is True only: kl[valid].mean()"),
        },
        common_checks=("output_type", "inputs_unchanged"), rtol=1e-4, atol=1e-5,
    ),
    Task(
        id="6.2", chapter="ch06_distillation", title="reverse KL", function="reverse_kl",
        params=("student_logits", "teacher_logits", "temperature", "valid"), reference=reverse64,
        make_cases=reverse_cases,
        checks={
            "values": Check(2, "KL(q || p) = sum_v q (log q - log p): the student's probabilities weigh the terms"),
            "direction": Check(3, "reverse KL is weighted by the student's q, not the teacher's p: swap the roles "
                                  "of the two distributions, not only of the logits' names"),
            "t_squared": Check(1, "times T^2, as the forward loss"),
            "padding": Check(1, "average over the valid positions only"),
        },
        common_checks=("output_type", "inputs_unchanged"), rtol=1e-4, atol=1e-5,
    ),
    Task(
        id="6.3", chapter="ch06_distillation", title="the mixed loss over windows", function="mixed_loss",
        params=("student_logits", "teacher_logits", "ids", "valid", "alpha", "temperature"), reference=mixed64,
        make_cases=mixed_cases,
        checks={
            "values": Check(3, "alpha * soft_target_loss + (1 - alpha) * cross-entropy (at T = 1), both averaged "
                               "over the predicted positions"),
            "shift": Check(2, "the logits at position t predict ids[:, t + 1]: use logits[:, :-1] against "
                              "ids[:, 1:]"),
            "alpha": Check(1, "alpha weighs the soft loss, 1 - alpha the cross-entropy"),
            "padding": Check(2, "a prediction counts when its target token is valid: valid[:, 1:]"),
        },
        common_checks=("output_type", "inputs_unchanged"), rtol=1e-4, atol=1e-5,
    ),
    Task(
        id="6.4", chapter="ch06_distillation", title="a student from teacher blocks", function="student_state_dict",
        params=("teacher_state", "blocks"), reference=student64, make_cases=student_cases,
        checks={
            "values": Check(3, "keep every key outside the blocks (embedding, final norm) and the keys of the "
                               "chosen blocks"),
            "renumbered": Check(2, "the student's blocks are numbered 0 .. len(blocks) - 1: teacher block blocks[i] "
                                   "becomes 'layers.{i}.', compare the index as a number (int), not as text"),
            "order": Check(1, "blocks[i] becomes block i, in the order given"),
        },
        common=False, harness_source=HARNESS_STUDENT, rtol=1e-5, atol=1e-5, seeds=(0, 1), hidden_seeds=(2,),
    ),
    Task(
        id="6.5", chapter="ch06_distillation", title="one training step", function="distill_step",
        params=("student", "optimizer", "ids", "teacher_logits", "alpha", "temperature", "max_norm"),
        reference=step64, make_cases=step_cases,
        checks={
            "parameters": Check(3, "zero the gradients, loss = mixed_loss(student(ids), teacher_logits, ids, all "
                                   "valid, alpha, temperature), loss.backward(), clip, optimizer.step()"),
            "loss": Check(1, "return the loss of this step (a tensor), computed before the update"),
            "clipping": Check(2, "clip the global gradient norm after backward() and before step(): "
                                 "torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm)"),
            "fresh_gradients": Check(2, "gradients accumulate across backward() calls: optimizer.zero_grad() "
                                        "before each step"),
        },
        common=False, harness_source=HARNESS_STEP, allowed_names=STEP_NAMES, rtol=1e-4, atol=1e-5, seeds=(0,),
        hidden_seeds=(1,),
    ),
    Task(
        id="6.6", chapter="ch06_distillation", title="the teacher's sequences as windows", function="pack_sequences",
        params=("sequences", "window", "pad_id"), reference=pack64, make_cases=pack_cases,
        checks={
            "values": Check(2, "ids (N, window) int64 and valid (N, window) bool, one row per sequence"),
            "pad_id": Check(1, "fill the padding with pad_id (torch.full), not 0"),
            "right_padding": Check(2, "tokens first, padding after: causal attention then never lets a real token "
                                      "see padding, and positions need no shift"),
            "truncation": Check(1, "a sequence longer than the window keeps its first `window` tokens"),
        },
        output_dtypes=(torch.int64, torch.bool), common_checks=("output_type",), atol=0, rtol=0,
    ),
)
