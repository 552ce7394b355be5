"""Judge what a learner's function did (as observed by `observe.py`) against the float64
reference. Runs in the trusted process only; every message names the property that
broke and what to look at."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from .tasks import Case, Task


@dataclass
class CheckResult:
    task: str
    name: str
    passed: bool
    points: int  # earned
    max_points: int
    message: str = ""
    status: str = ""  # "pass", "fail" or "inconclusive" (a speed check too noisy to decide)

    def __post_init__(self):
        self.status = self.status or ("pass" if self.passed else "fail")

    def to_dict(self) -> dict:
        return {"task": self.task, "name": self.name, "passed": self.passed, "points": self.points,
                "max_points": self.max_points, "status": self.status, "message": self.message}


def all_fail(task: Task, message: str) -> list[CheckResult]:
    return [CheckResult(task.id, name, False, 0, c.points, message) for name, c in task.all_checks().items()]


def blocking_problem(task: Task, observed: dict, cases: list[Case]) -> str | None:
    """A problem that makes every check of the task fail: wrong signature, stub, forbidden op."""
    params = observed["signature"]
    if params[: len(task.params)] != list(task.params):
        want = ", ".join(task.params)
        return (f"{task.function} must take the parameters ({want}) in this order; yours takes "
                f"({', '.join(map(str, params))}). Keep the signature given in the notebook.")
    errors = [c["error"] for c in observed["calls"]]
    if errors and all(e and e.startswith("NotImplementedError") for e in errors):
        return f"not implemented yet ({errors[0]})"
    used = [name for op, name in task.forbidden_ops.items() if op in (observed.get("ops") or [])]
    if used:
        return (f"uses {', '.join(sorted(set(used)))}, which this task asks you to write yourself "
                "(no points for the task while it is used)")
    return None


def compare(task: Task, case: Case, record: dict) -> str | None:
    """None if the call's output matches the float64 reference, else what is wrong."""
    if record["error"]:
        return f"raised {record['error']} ({case.note})"
    out = record["output"]
    if case.judge is not None:  # a property of the output (a tensor, or a tuple of them)
        if not isinstance(out, (torch.Tensor, list)):
            return f"returned {out if isinstance(out, str) else type(out).__name__}, not a torch.Tensor ({case.note})"
        try:
            problem = case.judge(out, *case.args, **case.kwargs)
        except Exception as e:  # noqa: BLE001 (an output of the wrong kind or shape: say so, do not crash)
            problem = f"the output could not be checked ({type(e).__name__}: {e}); it is not what the task asks for"
        return None if problem is None else f"{problem} ({case.note})"
    expected = reference_output(task, case)
    if case.output is not None:  # one element of a tuple result
        if not (isinstance(out, list) and len(out) == len(expected)):
            got = out if isinstance(out, str) else f"{len(out)} tensors" if isinstance(out, list) else "one tensor"
            return f"must return a tuple of {len(expected)} tensors, returned {got} ({case.note})"
        out, expected = out[case.output], expected[case.output]
    if not isinstance(out, torch.Tensor):
        return f"returned {out if isinstance(out, str) else type(out).__name__}, not a torch.Tensor ({case.note})"
    if out.shape != expected.shape:
        return f"output shape {tuple(out.shape)}, expected {tuple(expected.shape)} ({case.note})"
    got, expected = out.double(), expected.double()
    finite = torch.isfinite(expected)
    if not torch.isfinite(got[finite]).all():
        return f"inf or NaN where the answer is finite ({case.note})"
    if not torch.equal(torch.isnan(got), torch.isnan(expected)):
        return f"NaN in the wrong places ({case.note})"
    close = torch.isclose(got, expected, rtol=task.rtol, atol=task.atol, equal_nan=True)
    if not close.all():
        i = int((~close).flatten().nonzero()[0])
        return (f"wrong values ({case.note}): at flat index {i} got {got.flatten()[i].item():.6g}, "
                f"expected {expected.flatten()[i].item():.6g}; {int((~close).sum())} of {close.numel()} differ")
    return None


# Expected outputs by (task, inputs). A reference is a pure function of its inputs, and one
# process often judges many notebooks of a chapter (a class, the mutants): SmolLM2's greedy
# continuations, for one, are then computed once instead of once per notebook.
_EXPECTED: dict = {}
_EXPECTED_MAX = 256


def reference_output(task: Task, case: Case):
    args = [a.double() if is_float(a) else a for a in case.args]
    key = (task.id, _fingerprint(args), _fingerprint(case.kwargs))
    if None in key:  # an input of a kind the digest does not cover: no memo
        return task.reference(*args, **case.kwargs)
    if key not in _EXPECTED:
        if len(_EXPECTED) >= _EXPECTED_MAX:
            _EXPECTED.clear()
        _EXPECTED[key] = task.reference(*args, **case.kwargs)
    return _EXPECTED[key]


def _fingerprint(value) -> str | None:
    """A digest of nested inputs (tensors by dtype, shape and bytes; numbers, strings, None,
    and lists, tuples and dicts of these), or None for anything else."""
    import hashlib

    digest = hashlib.sha256()

    class Unsupported(Exception):
        pass

    def feed(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            digest.update(b"{")
            for k in sorted(v, key=repr):
                digest.update(repr(k).encode())
                feed(v[k])
            digest.update(b"}")
        elif isinstance(v, (list, tuple)):
            digest.update(b"[" if isinstance(v, list) else b"(")
            for item in v:
                feed(item)
            digest.update(b"]")
        elif v is None or isinstance(v, (bool, int, float, str)):
            digest.update(f"{type(v).__name__}:{v!r}".encode())
        else:
            raise Unsupported

    try:
        feed(value)
    except Unsupported:
        return None
    return digest.hexdigest()


def is_float(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def judge_values(task: Task, cases: list[Case], observed: dict) -> list[CheckResult]:
    results = []
    for name, check in task.checks.items():
        problems = [p for case, rec in zip(cases, observed["calls"]) if case.check == name
                    for p in [compare(task, case, rec)] if p]
        message = "" if not problems else f"{problems[0]}. Hint: {check.hint}"
        results.append(CheckResult(task.id, name, not problems, 0 if problems else check.points, check.points, message))
    return results


def unchanged(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (torch.equal says NaN != NaN: an input that holds NaN
    on purpose, such as a one-token reply's TPOT, would look modified)."""
    if before.shape != after.shape or before.dtype != after.dtype:
        return False
    if not before.is_floating_point():
        return torch.equal(before, after)
    return bool(((before == after) | (before.isnan() & after.isnan())).all())


def judge_common(task: Task, cases: list[Case], observed: dict, same_object: dict | None) -> list[CheckResult]:
    checks = {name: Task.COMMON[name] for name in task.common_names}
    problems = {name: None for name in Task.COMMON}
    for case, rec in zip(cases, observed["calls"]):
        out = rec["output"]
        if problems["output_type"] is None and not rec["error"]:
            first_float = next((a for a in case.args if is_float(a)), None)
            outs = out if isinstance(out, list) and (case.output is not None or task.output_dtypes) else [out]
            for i, o in enumerate(outs):
                want = task.output_dtypes[i] if task.output_dtypes and i < len(task.output_dtypes) else None
                want = want or (first_float.dtype if first_float is not None else None)
                if not isinstance(o, torch.Tensor):
                    problems["output_type"] = f"returned {o if isinstance(o, str) else type(o).__name__} ({case.note})"
                elif want is not None and o.dtype != want:
                    what = f"output {i + 1}" if len(outs) > 1 else "the output"
                    problems["output_type"] = f"{what} has dtype {o.dtype}, expected {want} ({case.note})"
        if problems["inputs_unchanged"] is None and rec["inputs_after"] is not None:
            for before, after in zip(case.args, rec["inputs_after"]):
                if isinstance(before, torch.Tensor) and not (isinstance(after, torch.Tensor) and unchanged(before, after)):
                    problems["inputs_unchanged"] = f"an input tensor was modified by the call ({case.note})"
                    break
    if same_object is not None:
        rec = observed.get("same_object") or {"output": None, "error": "not observed"}
        probe = Case("no_caching", same_object["second"], same_object["kwargs"],
                     "same tensor object, new values written into it", output=same_object.get("output"))
        problems["no_caching"] = compare(task, probe, rec)
    results = []
    for name, check in checks.items():
        p = problems[name]
        results.append(CheckResult(task.id, name, p is None, 0 if p else check.points, check.points,
                                   "" if p is None else f"{p}. Hint: {check.hint}"))
    return results


def judge_memory(task: Task, largest: int | None) -> CheckResult:
    spec = task.memory
    if largest is None:
        return CheckResult(task.id, "memory", False, 0, spec.points, "could not be traced")
    if largest > spec.max_elements:
        return CheckResult(task.id, "memory", False, 0, spec.points,
                           f"the largest tensor created had {largest:,} elements, the limit is {spec.max_elements:,}. "
                           f"Hint: {spec.why}")
    return CheckResult(task.id, "memory", True, spec.points, spec.points,
                       f"largest tensor {largest:,} elements (limit {spec.max_elements:,})")


def gate(results: list[CheckResult], main: CheckResult) -> list[CheckResult]:
    """Properties of a working function (type, untouched inputs, no caching) score only
    once the task's main value check passes: returning torch.zeros_like(x) earns nothing."""
    if main.passed:
        return results
    return [r if not r.passed else CheckResult(r.task, r.name, False, 0, r.max_points,
                                               f"not counted until the '{main.name}' check passes")
            for r in results]


def speed_ratios(speed: dict) -> list[float]:
    return [c / b for c, b in zip(speed["candidate"], speed["baseline"]) if b > 0]


def judge_speed(task: Task, measurements: list[dict], values_ok: bool) -> tuple[CheckResult, bool]:
    """Decide from interleaved pairs: the median of per-pair ratios, pooled over rounds.
    Returns (result, wants_another_round)."""
    spec, points = task.speed, task.all_checks()["speed"].points
    if not values_ok:
        return CheckResult(task.id, "speed", False, 0, points, "not timed: correctness checks come first"), False
    errors = [m.get("error") for m in measurements if m and m.get("error")]
    ratios = [r for m in measurements if m for r in speed_ratios(m)]
    if errors or not ratios:
        return CheckResult(task.id, "speed", False, 0, points, f"could not be timed: {errors[0] if errors else 'no timings'}"), False
    med = statistics.median(ratios)
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [med, med, med]
    spread = (q[2] - q[0]) / med if med > 0 else math.inf
    base = statistics.median(t for m in measurements for t in m["baseline"])
    cand = statistics.median(t for m in measurements for t in m["candidate"])
    figures = (f"yours {_fmt_s(cand)} vs baseline {_fmt_s(base)} per call: ratio {med:.2f} "
               f"(median of {len(ratios)} interleaved pairs), target <= {spec.max_ratio:g}")
    noisy = spread > 0.3
    # noise decides nothing when three quarters of the pairs lie on one side of the target
    clearly_fast = q[2] <= spec.max_ratio or (med <= spec.max_ratio and not noisy)
    clearly_slow = q[0] > spec.max_ratio * 1.15 or (med > spec.max_ratio * 1.15 and not noisy)
    if not (clearly_fast or clearly_slow) and len(measurements) < 3:
        return None, True  # ambiguous or noisy: measure again
    if med <= spec.max_ratio:
        note = " Faster than 10x the baseline: flagged for review." if med < 0.1 else ""
        return CheckResult(task.id, "speed", True, points, points, figures + "." + note), False
    if noisy and not clearly_slow:
        return CheckResult(task.id, "speed", True, points, points,
                           f"inconclusive, the machine was too noisy to decide (spread {spread:.0%}); "
                           f"points given, re-run to confirm: {figures}.", status="inconclusive"), False
    return CheckResult(task.id, "speed", False, 0, points, f"too slow: {figures}. Hint: {spec.why}"), False


def judge_task(task: Task, cases: list[Case], observed: dict, same_object: dict | None,
               remeasure) -> list[CheckResult]:
    """Every check of a task, from what was observed. remeasure(round) -> a new speed
    measurement: the first one when the values were observed untimed (and are right), and
    more when a measurement is too noisy or too close to call."""
    blocking = blocking_problem(task, observed, cases)
    if blocking:
        return all_fail(task, blocking)
    results = judge_values(task, cases, observed)
    if task.common_names:
        results += gate(judge_common(task, cases, observed, same_object), results[0])
    if task.memory is not None:
        results += gate([judge_memory(task, observed.get("largest"))], results[0])
    if task.speed is not None:
        values_ok = all(r.passed for r in results)
        first = observed.get("speed")  # measured with the values in a notebook, on its own by the grader
        measurements = [first if first is not None or not values_ok else remeasure(0)]
        verdict, again = judge_speed(task, measurements, values_ok)
        while again:
            measurements.append(remeasure(len(measurements)))
            verdict, again = judge_speed(task, measurements, values_ok)
        results.append(verdict)
    return results


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"
