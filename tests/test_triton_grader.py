"""Chapter 7's harness against launchers that try to pass without doing the work in a
Triton kernel, and against correct code written in ways the harness must accept."""

from __future__ import annotations

import textwrap

import pytest

from reference_engine.grading.grader import grade_path

SETUP = """
from os import environ

import torch

if not torch.cuda.is_available():
    environ.setdefault("TRITON_INTERPRET", "1")
import triton
import triton.language as tl
"""

KERNEL = """
@triton.jit
def softmax_kernel(x_ptr, out_ptr, n_cols, x_stride, out_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < n_cols, other=float("-inf"))
    e = tl.exp(x - tl.max(x, axis=0))
    tl.store(out_ptr + row * out_stride + cols, e / tl.sum(e, axis=0), mask=cols < n_cols)
"""


def grade(tmp_path, code: str):
    path = tmp_path / "submission.py"
    path.write_text(SETUP + code)
    return grade_path(path, task_id="7.1")


CHEATS = {
    "a callable grid that computes with torch": (KERNEL + textwrap.dedent("""
        def softmax_rows(x, out):
            grid = lambda meta: (out.copy_(torch.softmax(x, -1)), (1,))[1]
            softmax_kernel[grid](x, out, 0, x.stride(0), out.stride(0), BLOCK=16)
    """), "computed with PyTorch"),
    "a kernel that reaches torch under another name": (textwrap.dedent("""
        import torch as th

        @triton.jit
        def copy_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
            th.manual_seed(0)

        def softmax_rows(x, out):
            copy_kernel[(1,)](x, out, x.shape[1], BLOCK=16)
    """), "imports torch as th"),  # refused by the scan: an alias would slip past the name checks
    "a kernel that reaches torch": (textwrap.dedent("""
        import torch

        @triton.jit
        def copy_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
            torch.manual_seed(0)

        def softmax_rows(x, out):
            copy_kernel[(1,)](x, out, x.shape[1], BLOCK=16)
    """), "uses torch"),
    "a tensor passed as a tl.constexpr": (textwrap.dedent("""
        @triton.jit
        def holder_kernel(x_ptr, X: tl.constexpr):
            pass

        def softmax_rows(x, out):
            holder_kernel[(1,)](x, x)
    """), "tl.constexpr"),
    "no kernel launched, the work done elsewhere": (textwrap.dedent("""
        def softmax_rows(x, out):
            out[:] = x.softmax(-1)
    """), "computed with PyTorch"),
}


@pytest.mark.parametrize("code,message", CHEATS.values(), ids=CHEATS.keys())
def test_launchers_that_do_not_compute_in_their_kernel_score_nothing(tmp_path, code, message):
    report = grade(tmp_path, code)
    assert report.score == 0
    assert any(message in r.message for r in report.results), [r.message for r in report.results]


def test_views_copies_and_a_global_named_like_a_local_are_fine(tmp_path):
    """A launcher may make its input contiguous, and a notebook may hold a tensor called x
    while the kernel has a local x: neither is computing outside the kernel."""
    report = grade(tmp_path, "x = torch.randn(3, 3)\n" + KERNEL + textwrap.dedent("""
        def softmax_rows(x, out):
            x = x.contiguous()
            softmax_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), out.stride(0),
                                          BLOCK=triton.next_power_of_2(x.shape[1]))
    """))
    assert report.score == report.max_score, [r.message for r in report.results if not r.passed]
