"""Drills written for interview practice rather than for a chapter's exercise: the source
articles' two programming problems, on SmolLM2's hidden states (`practice/classifier.py`).

D.1 trains a linear softmax classifier on the accelerator (`device`: "cuda" where the
grader has a GPU, else "cpu"); it is judged by what the classifier does on held-out texts
from paragraphs it never saw, against the reference's accuracy on the same split, so any
sound training recipe passes. The features are first put through a fixed per-feature affine
map (scales from 0.03 to 30, offsets of a few standard deviations): a sound classifier does
not care, while one whose standardization is folded back wrongly (the bias shifted by the
unscaled mean) or not at all stops working on raw features. D.2 computes that classifier's logits with int8 weights and activations; values are
compared with the same scheme in float64, allowing only the codes that sit on a rounding
tie (x / s within 1e-3 of k + 0.5, where float32 and float64 may round apart).

These tasks are registered outside the chapters (`register_drills`): they have no notebook,
their stubs are below and their solutions in `solutions/drills.py`.
"""

from __future__ import annotations

from functools import partial

import torch

from ..tasks import Case, Check, Task, register_drills

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_CLASSES = 5

STUBS = {
    "D.1": '''def train_classifier(features, labels, n_classes, device):
    """A linear softmax classifier trained on `device` ("cuda" on a GPU, else "cpu").
    features (N, d) float32: SmolLM2's mean final hidden state of each text; labels (N,) int64.
    Returns (weight (n_classes, d), bias (n_classes,)), float32, on `device`, such that
    (features @ weight.T + bias).argmax(1) predicts the class of new texts' raw features."""
    # YOUR CODE HERE
    raise NotImplementedError("Drill D.1: a classifier trained on the device (about 15 lines)")
''',
    "D.2": '''def int8_logits(features, weight, bias):
    """The classifier's logits with int8 weights and int8 activations: each row of `features`
    (N, d) and of `weight` (C, d) gets its own scale s = max|row| / 127 and codes
    round(row / s) in [-127, 127]; logits = (codes_x @ codes_w.T) * s_x * s_w + bias, the sum
    exact (int32 accumulation). Returns (N, C) float32."""
    # YOUR CODE HERE
    raise NotImplementedError("Drill D.2: int8 logits (about 8 lines)")
''',
}


def _dataset():
    from ...practice import classifier

    return classifier


def fitted_split(g, transform=None):
    """A fresh split of the texts and the reference classifier trained on it:
    (features, labels, train, held, weight, bias, seed), weight and bias in float64."""
    c = _dataset()
    x, y, source = c.dataset()
    if transform is not None:
        x = transform(x)
    seed = int(torch.randint(0, 10_000, (1,), generator=g))
    train, held = c.split(source, seed)
    weight, bias = c.train_linear(x[train], y[train], N_CLASSES)
    return x, y, train, held, weight, bias, seed


# -- D.1 --------------------------------------------------------------------------------------


def train64(features, labels, n_classes, device):
    c = _dataset()
    weight, bias = c.train_linear(features, labels, n_classes)
    return weight.float(), bias.float()


def judge_outputs(out, features, labels, n_classes, device) -> str | None:
    if not (isinstance(out, list) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        return "return a tuple (weight, bias) of two tensors"
    weight, bias = out
    d = features.shape[1]
    if tuple(weight.shape) != (n_classes, d) or tuple(bias.shape) != (n_classes,):
        return (f"weight must be ({n_classes}, {d}) and bias ({n_classes},); got {tuple(weight.shape)} and "
                f"{tuple(bias.shape)}")
    if weight.dtype != torch.float32 or bias.dtype != torch.float32:
        return f"return float32 tensors, not {weight.dtype} and {bias.dtype}"
    if weight.device.type != torch.device(device).type or bias.device.type != torch.device(device).type:
        return f"the classifier must live on the device asked for ({device}), not {weight.device}"
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        return "weight or bias holds inf or NaN (a learning rate too large for raw features?)"
    return None


def judge_accuracy(held_x, held_y, reference_accuracy, out, *args) -> str | None:
    c = _dataset()
    weight, bias = (t.detach().cpu().double() for t in out)
    got = c.accuracy(held_x.double() @ weight.T + bias, held_y)
    if got < max(reference_accuracy - 0.08, 0.6):
        return (f"held-out accuracy {got:.1%}, the reference reaches {reference_accuracy:.1%} on the same split; "
                f"the returned weight and bias must work on raw features")
    return None


def rescaled(x: torch.Tensor) -> torch.Tensor:
    """x * scale + offset per feature, the same map every time (see the module docstring)."""
    g = torch.Generator().manual_seed(7)
    d = x.shape[1]
    scale = torch.logspace(-1.5, 1.5, d)[torch.randperm(d, generator=g)]
    offset = torch.randn(d, generator=g) * 4 * x.std(0) * scale
    return x * scale + offset


def train_cases(g) -> list[Case]:
    c = _dataset()
    x, y, train, held, weight, bias, seed = fitted_split(g, rescaled)
    reference = c.accuracy(x[held].double() @ weight.T + bias, y[held])
    args = [x[train].clone(), y[train].clone(), N_CLASSES, DEVICE]
    note = f"{len(train)} texts, split {seed}, device {DEVICE}"
    return [Case("outputs", args, note=note, judge=judge_outputs),
            Case("accuracy", [a.clone() if isinstance(a, torch.Tensor) else a for a in args], note=note,
                 judge=partial(judge_accuracy, x[held], y[held], reference))]


# -- D.2 --------------------------------------------------------------------------------------


def int8_64(features, weight, bias):
    return _dataset().int8_logits(features, weight, bias)


def tie_slack(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, C): how far a correct float32 implementation may sit from the float64 scheme, from
    the codes on a rounding tie (one code step each) plus float32 rounding of the rest."""
    c = _dataset()

    def ties(t):
        codes, scale = c.quantize_rows(t.double())  # a zero row: scale 1, codes 0, no ties
        frac = (t.double() / scale[:, None]).abs() % 1
        return ((frac - 0.5).abs() < 1e-3).double(), codes.abs(), scale

    tx, qx, sx = ties(features)
    tw, qw, sw = ties(weight)
    steps = tx @ qw.T + qx @ tw.T + tx @ tw.T  # code steps that may differ, weighted by the other side
    return steps * sx[:, None] * sw[None, :]


def judge_int8(out, features, weight, bias) -> str | None:
    expected = int8_64(features, weight, bias)
    if tuple(out.shape) != tuple(expected.shape):
        return f"output shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    if out.dtype != torch.float32:
        return f"return float32 logits, not {out.dtype}"
    got = out.detach().cpu().double()
    if not torch.isfinite(got).all():
        return "inf or NaN in the logits (a row of zeros has scale 0: dividing by it gives NaN; its codes are 0)"
    slack = tie_slack(features, weight) + 1e-5 * expected.abs() + 1e-5
    bad = (got - expected).abs() > slack
    if bad.any():
        i, j = (int(v) for v in bad.nonzero()[0])
        return (f"logit [{i}, {j}] is {got[i, j].item():.6g}, the int8 scheme gives {expected[i, j].item():.6g}; "
                f"{int(bad.sum())} of {bad.numel()} differ")
    return None


def judge_int8_accuracy(held_y, float_accuracy, out, features, weight, bias) -> str | None:
    got = _dataset().accuracy(out.detach().cpu().double(), held_y)
    if got < float_accuracy - 0.04:
        return f"held-out accuracy {got:.1%} with your int8 logits, {float_accuracy:.1%} in float"
    return None


def int8_cases(g) -> list[Case]:
    c = _dataset()
    x, y, train, held, weight, bias, seed = fitted_split(g)
    weight, bias = weight.float(), bias.float()
    held_x = x[held].clone()
    float_accuracy = c.accuracy(held_x.double() @ weight.double().T + bias.double(), y[held])
    zero = held_x[:6].clone()
    zero[torch.randint(0, 6, (2,), generator=g)] = 0.0
    wide = torch.randn(9, 576, generator=g) * torch.logspace(-3, 2, 576)[torch.randperm(576, generator=g)]
    return [Case("values", [held_x, weight.clone(), bias.clone()], note=f"{len(held)} held-out texts, split {seed}",
                 judge=judge_int8),
            Case("values", [wide.float(), weight.clone(), bias.clone()], judge=judge_int8,
                 note="random rows whose entries span five orders of magnitude"),
            Case("zero_rows", [zero, weight.clone(), bias.clone()], judge=judge_int8,
                 note="two rows of features are all zeros"),
            Case("accuracy", [held_x.clone(), weight.clone(), bias.clone()], note=f"split {seed}",
                 judge=partial(judge_int8_accuracy, y[held], float_accuracy))]


register_drills(
    Task(
        id="D.1", chapter="drills", title="a text classifier on the accelerator", function="train_classifier",
        params=("features", "labels", "n_classes", "device"), reference=train64, make_cases=train_cases,
        checks={
            "outputs": Check(1, "return (weight (n_classes, d), bias (n_classes,)), float32, on the device given"),
            "accuracy": Check(3, "train softmax regression with cross-entropy (standardizing the features helps: then "
                                 "fold the mean and scale back into weight and bias, so they apply to raw features)"),
        },
        common_checks=("inputs_unchanged",), seeds=(0,), hidden_seeds=(101,), rtol=1e-4, atol=1e-4,
    ),
    Task(
        id="D.2", chapter="drills", title="the classifier in int8", function="int8_logits",
        params=("features", "weight", "bias"), reference=int8_64, make_cases=int8_cases,
        checks={
            "values": Check(3, "s = max|row| / 127 per row (of features and of weight), codes = round(row / s); "
                               "sum codes_x * codes_w exactly, then multiply by s_x * s_w and add the bias"),
            "zero_rows": Check(1, "a row of zeros has s = 0: its codes are 0 (do not divide by 0)"),
            "accuracy": Check(1, "int8 logits should classify as well as float ones (within a few points)"),
        },
        common_checks=("inputs_unchanged",), seeds=(0,), hidden_seeds=(101,), rtol=1e-5, atol=1e-5,
    ),
)
