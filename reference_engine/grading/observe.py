"""Call a learner's function and record what happened: outputs, inputs after the call,
the aten operators it ran, and timings. Nothing here judges; `checks.py` does.

This file imports only torch and the standard library, because it runs in two places:
inside the sandboxed child process (`child.py` executes this source before any learner
code exists in the process) and inside a notebook kernel (`notebook.py`).
Everything it returns is plain data: tensors, numbers, strings, lists and dicts.
"""

import gc
import inspect
import time

import torch

PERF_COUNTER = time.perf_counter  # captured now: a learner replacing time.perf_counter later changes nothing


def describe_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 500 else text[:500] + " ..."


def plain(value):
    """The value as plain data, or a string naming its type when it is not allowed through.
    Only exact torch.Tensor passes (a subclass could override __eq__ or comparisons)."""
    if type(value) is torch.Tensor:
        return value.detach().clone()
    if isinstance(value, (tuple, list)) and all(type(v) is torch.Tensor for v in value):
        return [v.detach().clone() for v in value]
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def signature_of(fn) -> list:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as e:
        return [f"<no signature: {describe_error(e)}>"]


def observe_call(fn, args: list, kwargs: dict) -> dict:
    """One call on copies of the inputs. Returns output, error, and the inputs as they were after."""
    args_copy = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    record = {"output": None, "error": None, "inputs_after": None}
    try:
        record["output"] = plain(fn(*args_copy, **kwargs))
    except Exception as e:  # the learner's bug (or stub): report it, keep grading
        record["error"] = describe_error(e)
    record["inputs_after"] = [plain(a) if isinstance(a, torch.Tensor) else None for a in args_copy]
    return record


def observe_same_object_twice(fn, first: list, second: list, kwargs: dict) -> dict:
    """Call fn on a tensor, overwrite that same tensor in place with new values, call again.
    A result cached by object identity (or data pointer) shows up as a stale second output."""
    try:
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in first]
        fn(*args, **kwargs)
        for a, b in zip(args, second):
            if isinstance(a, torch.Tensor):
                a.copy_(b)
        return {"output": plain(fn(*args, **kwargs)), "error": None}
    except Exception as e:
        return {"output": None, "error": describe_error(e)}


def observe_ops(fn, args: list, kwargs: dict) -> list:
    """Names of the aten operators fn runs, recorded by the profiler at the C++ dispatcher,
    so calls through torch.ops or with Python function/dispatch modes disabled count too."""
    from torch.profiler import ProfilerActivity, profile

    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(*args, **kwargs)
    except Exception:
        pass  # errors are reported by observe_call
    return sorted({event.name for event in prof.events()})


def observe_largest(fn, args: list, kwargs: dict) -> int:
    """The most elements of any tensor an aten operator produced during one call,
    recorded by a dispatch mode (the static scan refuses code that could disable it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    try:
        with Largest():
            fn(*args, **kwargs)
    except Exception:
        pass  # errors are reported by observe_call
    return Largest.largest


def observe_speed(fn, baseline, inputs: list, kwargs: dict, min_sample_s: float = 0.002) -> dict:
    """Interleaved timing of baseline (A) and candidate (B) in ABBA order on fresh inputs.

    Each sample repeats the call enough times to last about min_sample_s. Returns the
    seconds per call of each, one entry per pair, in order.
    """
    clock = PERF_COUNTER

    def per_call(f, args, reps):
        # Fresh inputs for every pair. Within a sample the same tensors are reused: a
        # function that caches results or edits its inputs has already failed the
        # correctness checks, and speed is judged only after those pass.
        args = [a.clone() for a in args]
        t0 = clock()
        for _ in range(reps):
            f(*args, **kwargs)
        return (clock() - t0) / reps

    warm = inputs[0]
    for _ in range(3):  # warm-up: a few rounds for short calls, one for calls that take a while
        t0 = clock()
        baseline(*[a.clone() for a in warm], **kwargs)
        fn(*[a.clone() for a in warm], **kwargs)
        if clock() - t0 > 0.2:
            break
    single = per_call(baseline, warm, 1)
    reps = max(1, min(200, int(min_sample_s / max(single, 1e-7))))
    result = {"baseline": [], "candidate": [], "error": None}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i, args in enumerate(inputs):
            order = (baseline, fn) if i % 2 == 0 else (fn, baseline)  # ABBA ABBA ...
            times = {}
            for f in order:
                times[f is fn] = per_call(f, args, reps)
            result["baseline"].append(times[False])
            result["candidate"].append(times[True])
    except Exception as e:
        result["error"] = describe_error(e)
    finally:
        if gc_was_enabled:
            gc.enable()
    return result


def run_job(fn, job: dict, baseline=None, progress=None, signature=None) -> dict:
    """Everything the parent asked for, for one task. `job` keys: calls (list of
    {args, kwargs}), same_object (optional {first, second, kwargs}), ops_call (index
    into calls, or None), memory (optional {args, kwargs}), speed (optional {inputs, kwargs}).
    progress(observed) is called after every stage, so that a later hang or crash loses
    nothing already seen. signature: the parameter names to report, when fn wraps the
    learner's function."""
    out = {"signature": signature or signature_of(fn), "calls": [], "same_object": None, "ops": None, "speed": None,
           "largest": None}
    report = progress or (lambda _: None)
    for call in job["calls"]:
        out["calls"].append(observe_call(fn, call["args"], call["kwargs"]))
        if job.get("report_each_call"):
            report(out)
    report(out)
    if job.get("same_object"):
        s = job["same_object"]
        out["same_object"] = observe_same_object_twice(fn, s["first"], s["second"], s["kwargs"])
        report(out)
    if job.get("ops_call") is not None:
        call = job["calls"][job["ops_call"]]
        out["ops"] = observe_ops(fn, call["args"], call["kwargs"])
        report(out)
    if job.get("memory"):
        out["largest"] = observe_largest(fn, job["memory"]["args"], job["memory"]["kwargs"])
        report(out)
    if job.get("speed") and baseline is not None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out["speed"] = observe_speed(fn, baseline, job["speed"]["inputs"], job["speed"]["kwargs"])
        finally:
            torch.set_num_threads(threads)
        report(out)
    return out
