"""The trusted machinery chapter 7's Triton tasks run the learner's launcher in. Runs in the
grader's child before the learner's code (and in the notebook kernel for the visible checks).

A launcher is called as f(*inputs, *outputs): the grader allocates the outputs. Around
every input and output tensor it lays NaN canaries (integer tensors: their largest value):
each row is followed by padding and the whole tensor by a margin, so rows are strided and
an access that ignores its mask touches a canary. After the call:

  - a canary around an output that changed means a store outside the tensor (an unmasked
    tl.store); a NaN in the result usually means a load outside one (an unmasked tl.load);
  - the launcher must have launched a Triton kernel, and must not have computed anything
    with PyTorch itself: every torch function it calls (outside the kernel launches) is
    recorded, and anything beyond reading shapes and strides or allocating is refused;
  - the kernels it launched may use only triton inside: a global name that is a module
    other than triton, a tensor or a plain Python function is refused, and so is a tensor
    passed as a tl.constexpr (on a GPU none of these would compile; in the interpreter
    they would quietly run on the CPU). A callable grid is the launcher's code: recorded.
On a GPU the tensors are moved there first and the results brought back.
"""

from __future__ import annotations

import ast
import inspect
import math
import os
import textwrap

import torch
from torch.overrides import TorchFunctionMode

from ...kernels import load_triton

# float32 tl.dot uses TF32 on a GPU unless told otherwise (10 bits of mantissa): the checks
# compare with float64 at float32 tolerances, as the interpreter computes
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
triton = load_triton()
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# canary elements after every row (and 16 rows' worth before and after the tensor); inputs
# and outputs differ, so a launcher passing an input's stride for an output is caught
PAD_IN, PAD_OUT = 3, 5
# torch functions a launcher may call: reading shapes and strides, views and copies (which
# compute nothing), allocating scratch space
ALLOWED = {"__get__", "size", "stride", "dim", "numel", "element_size", "is_contiguous", "storage_offset",
           "data_ptr", "empty", "empty_like", "zeros", "zeros_like", "new_empty", "new_zeros", "empty_strided",
           "contiguous", "view", "reshape", "flatten", "transpose", "permute", "unsqueeze", "squeeze",
           "__len__", "__index__", "__int__", "__hash__", "__format__", "__repr__"}


class LauncherRule(Exception):
    """The launcher broke a rule of the exercise (a message for the learner)."""


class _State:
    recording = False
    launches = 0
    torch_calls: list[str] = []


class _Recorder(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _State.recording:
            name = getattr(func, "__name__", str(func))
            if name not in ALLOWED:
                _State.torch_calls.append(name)
        return func(*args, **(kwargs or {}))


def _kernel_problem(fn) -> str | None:
    """What a kernel reaches outside triton, or None. Every global name the kernel's body
    uses must be triton itself, a @triton.jit function, a number or a builtin: a module like
    torch or numpy, a tensor, or a plain Python function (which could call them) is refused."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return f"the source of the kernel {getattr(fn, '__name__', '?')} cannot be read"
    names = [n for n in ast.walk(tree) if isinstance(n, ast.Name)]
    local = set(inspect.signature(fn).parameters) | {n.id for n in names if isinstance(n.ctx, ast.Store)}
    for name in sorted({n.id for n in names} - local):  # globals: a name assigned in the kernel is local
        if name not in fn.__globals__:
            continue  # a local variable or a builtin (range, float, min)
        value = fn.__globals__[name]
        module = getattr(value, "__module__", None) or getattr(value, "__name__", "")
        if isinstance(value, (JITFunction, InterpretedFunction, int, float, bool, str)) or value is None:
            continue
        if inspect.ismodule(value) and value.__name__.split(".")[0] == "triton":
            continue
        if str(module).split(".")[0] == "triton":  # triton's own objects (tl.constexpr, ...)
            continue
        return f"the kernel {fn.__name__} uses {name} ({type(value).__name__})"
    return None


def _tensor_constexprs(fn, args, kwargs) -> str | None:
    """In the interpreter a tl.constexpr argument arrives as the host object itself: a
    tensor passed there could be computed on with torch. Pointers are plain arguments."""
    names = list(inspect.signature(fn).parameters.values())
    given = dict(zip([p.name for p in names], args)) | kwargs
    for p in names:
        if "constexpr" in str(p.annotation) and isinstance(given.get(p.name), torch.Tensor):
            return f"a tensor is passed to {fn.__name__} as the tl.constexpr {p.name}: pass tensors as pointers"
    return None


def _recorded(grid):
    """A callable grid runs the launcher's own code: it is recorded like the launcher."""
    def run_grid(meta):
        was, _State.recording = _State.recording, True
        try:
            return grid(meta)
        finally:
            _State.recording = was
    return run_grid


def _patched(run):
    def launch(self, *args, **kwargs):
        _State.launches += 1
        for problem in (_kernel_problem(self.fn), _tensor_constexprs(self.fn, args, kwargs)):
            if problem:  # refused before it runs: such a kernel could do anything in the interpreter
                raise LauncherRule(f"{problem}: inside @triton.jit only triton.language (tl) works on a GPU")
        if callable(kwargs.get("grid")):
            kwargs["grid"] = _recorded(kwargs["grid"])
        was, _State.recording = _State.recording, False  # the launch itself is Triton's business
        try:
            return run(self, *args, **kwargs)
        finally:
            _State.recording = was
    return launch


InterpretedFunction.run = _patched(InterpretedFunction.run)
JITFunction.run = _patched(JITFunction.run)


# Float canaries are NaNs with a payload of their own: a NaN the kernel computes and stores
# has other bits, so a stray store of NaN is caught too. Compared as integers.
NAN_BITS = {torch.float32: (torch.int32, 0x7FC0DEAD), torch.float16: (torch.int16, 0x7E5A),
            torch.bfloat16: (torch.int16, 0x7FDA), torch.float64: (torch.int64, 0x7FF8DEAD00000000)}


def as_bits(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor viewed as integers, and its canary as an integer."""
    if t.dtype.is_floating_point:
        int_dtype, bits = NAN_BITS[t.dtype]
        return t.view(int_dtype), bits
    return t, torch.iinfo(t.dtype).max


def in_canaries(x: torch.Tensor, pad: int = PAD_IN, fill: bool = False) -> torch.Tensor:
    """A tensor equal to x (or, with fill=True, holding only canaries) whose rows are followed
    by `pad` canaries and whose whole storage has 16 rows of canaries before and after."""
    if x.dim() == 2 and x.stride(0) == 1 and x.stride(1) > 1:  # stored transposed: keep it so
        return in_canaries(x.T, pad, fill).T
    shape = tuple(x.shape)
    width = shape[-1] + pad
    rows = math.prod(shape[:-1])
    margin = 16 * width
    buf = torch.empty((2 * margin + rows * width,), dtype=x.dtype, device=DEVICE)
    bits, canary = as_bits(buf)
    bits.fill_(canary)
    strides, step = [], 1
    for size in reversed((*shape[:-1], width)):
        strides.insert(0, step)
        step *= size
    view = buf.as_strided(shape, strides, margin)
    if not fill:
        view.copy_(x)
    return view


def canaries_intact(view: torch.Tensor) -> bool:
    """Everything in the view's storage outside the view still holds canaries."""
    buf = torch.empty(0, dtype=view.dtype, device=view.device).set_(view.untyped_storage())
    inside = torch.zeros(buf.shape, dtype=torch.bool, device=view.device)
    inside.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
    bits, canary = as_bits(buf)
    return bool((bits[~inside] == canary).all())


def launcher_wrap(fn, out_specs):
    """call(*inputs) -> the outputs (one tensor or a list), after fn(*inputs, *outputs) with
    everything in canaries. out_specs(*inputs) -> [(shape, dtype), ...]."""
    def call(*inputs):
        args = [in_canaries(a) if isinstance(a, torch.Tensor) else a for a in inputs]
        outs = [in_canaries(torch.empty(shape, dtype=dtype), PAD_OUT, fill=True) for shape, dtype in out_specs(*inputs)]
        _State.launches, _State.torch_calls = 0, []
        with _Recorder():
            _State.recording = True
            try:
                fn(*args, *outs)
            finally:
                _State.recording = False
        if _State.torch_calls:
            names = ", ".join(sorted(set(_State.torch_calls)))
            raise LauncherRule(f"the launcher computed with PyTorch ({names}): the work belongs in the Triton "
                               "kernel; a launcher only reads shapes and strides and launches kernel[grid](...)")
        if not _State.launches:
            raise LauncherRule("no Triton kernel was launched: call your @triton.jit kernel as kernel[grid](...)")
        for i, out in enumerate(outs):
            if not canaries_intact(out):
                raise LauncherRule(f"a store landed outside output {i} (a canary next to it changed): mask every "
                                   "tl.store, and use the output's own strides")
        results = [o.cpu().clone() for o in outs]
        return results[0] if len(results) == 1 else results
    return call


# What each task's launcher writes, from its inputs, by the launcher's parameters (the
# task's signature). One harness for every task: a notebook cell that never ends then costs
# one time limit for the whole chapter, not one per task (grader.StoppedCell).
OUT_SPECS = {
    ("x", "out"): lambda x: [(x.shape, x.dtype)],
    ("x", "weight", "eps", "out"): lambda x, w, eps: [(x.shape, x.dtype)],
    ("a", "b", "out"): lambda a, b: [((a.shape[0], b.shape[1]), a.dtype)],
    ("x", "packed", "scale", "zero", "group", "out"):
        lambda x, packed, scale, zero, group: [((x.shape[0], packed.shape[0]), x.dtype)],
    ("q", "k", "v", "causal", "out", "lse"): lambda q, k, v, causal: [(q.shape, q.dtype), (q.shape[:3], torch.float32)],
}


def wrap_task(fn):
    params = tuple(inspect.signature(fn).parameters)
    keys = [key for key in OUT_SPECS if params[: len(key)] == key]  # extra parameters with defaults are fine
    if not keys:
        return fn  # a signature no task has: the grader reports the parameters it expected
    return launcher_wrap(fn, OUT_SPECS[max(keys, key=len)])
