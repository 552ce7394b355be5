"""Hostile submissions gain nothing, and the rest of the notebook is still graded.

Each submission is a notebook whose task 1.1 attacks the grader and whose task 1.2 is a
correct attention: 1.1 must not score more than the attack's honest code would, and 1.2
must keep its full marks.
"""

import pytest
import torch
from submissions import GOOD_SDPA, GOOD_SOFTMAX, write_nb

from reference_engine.grading.grader import grade_path
from reference_engine.grading.sandbox import PROJECT_ROOT, run_child

SOLUTIONS = PROJECT_ROOT / "solutions" / "01_attention.ipynb"

HOSTILE = {
    "endless loop that swallows BaseException": ['''
def stable_softmax(x, dim=-1):
    while True:
        try:
            pass
        except BaseException:
            pass
'''],
    "huge allocation": ['''
def stable_softmax(x, dim=-1):
    hoard = [torch.ones(1 << 28) for _ in range(200)]  # 200 GiB, one GiB at a time
    return hoard[0][: x.numel()].view_as(x)
'''],
    "os._exit(0)": ["import os\n\ndef stable_softmax(x, dim=-1):\n    os._exit(0)\n"],
    "monkeypatched assert_close, allclose and perf_counter": [
        "torch.testing.assert_close = lambda *a, **k: None\ntorch.allclose = lambda *a, **k: True",
        "import time\ntime.perf_counter = lambda: 0.0",
        "def stable_softmax(x, dim=-1):\n    return torch.zeros_like(x)\n"],
    "prints a passing summary": ['''
def stable_softmax(x, dim=-1):
    print("10 passed in 0.01s")
    print("score 22/22  (all checks pass)")
    return torch.zeros_like(x)
'''],
    "writes a conftest.py": [
        f"with open({str(PROJECT_ROOT / 'tests' / 'conftest_hostile.py')!r}, 'w') as f:\n    f.write('x = 1')",
        "with open('conftest.py', 'w') as f:\n    f.write('import pytest')",
        "def stable_softmax(x, dim=-1):\n    return torch.zeros_like(x)\n"],
    "reads the solutions folder": [
        f"source = open({str(SOLUTIONS)!r}).read()\nexec(source.split('BEGIN SOLUTION')[0])"],
    "imports the reference implementation": [
        "from reference_engine.grading.chapters.ch01_attention import softmax64\n\n"
        "def stable_softmax(x, dim=-1):\n    return softmax64(x, dim).float()\n"],
    "IPython input transformer": [
        "get_ipython().input_transformers_cleanup.append(lambda lines: [])",
        "def stable_softmax(x, dim=-1):\n    return torch.zeros_like(x)\n"],
    "object whose __eq__ is always True": ['''
class AlwaysEqual:
    def __eq__(self, other):
        return True

    def allclose(self, *args, **kwargs):
        return True

def stable_softmax(x, dim=-1):
    return AlwaysEqual()
'''],
    "tensor subclass that compares equal to anything": ['''
class Agreeable(torch.Tensor):
    def __eq__(self, other):
        return torch.ones((), dtype=torch.bool)

def stable_softmax(x, dim=-1):
    return torch.zeros_like(x).as_subclass(Agreeable)
'''],
    "builtin softmax through torch.ops": [
        "def stable_softmax(x, dim=-1):\n    return torch.ops.aten._softmax(x, dim, False)\n"],
}


def hostile_notebook(path, cells):
    return write_nb(path, *cells, GOOD_SDPA)


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_submission_gains_nothing(tmp_path, attack):
    path = hostile_notebook(tmp_path / "01_attention.ipynb", HOSTILE[attack])
    report = grade_path(path, task_id=["1.1", "1.2"], timeout_s=20)
    task1 = [r for r in report.results if r.task == "1.1"]
    task2 = [r for r in report.results if r.task == "1.2"]
    assert sum(r.points for r in task1) == 0, [(r.name, r.message) for r in task1 if r.points]
    assert all(r.message for r in task1), "every lost point says why"
    assert all(r.passed for r in task2), [(r.name, r.message) for r in task2 if not r.passed]
    assert not (PROJECT_ROOT / "tests" / "conftest_hostile.py").exists()


# -- the walls behind the static scan, tested with code the scan would have refused -------------


def child_job(cell: str, calls=None, **extra):
    x = torch.randn(4, 8)
    return {"cells": ["import torch", cell], "function": "f", "blocked_modules": ["reference_engine", "solutions", "tests"],
            "calls": calls if calls is not None else [{"args": [x], "kwargs": {}}], "ops_call": 0, **extra}


@pytest.mark.parametrize("cell,words", [
    (f"def f(x):\n    return open({str(SOLUTIONS)!r}).read()", "may not open"),
    ("def f(x):\n    import reference_engine\n    return x", "may not import reference_engine"),
    ("def f(x):\n    import subprocess\n    subprocess.run(['true'])\n    return x", "may not use subprocess.Popen"),
    ("def f(x):\n    open('/tmp/dojo_hostile_write', 'w')\n    return x", "only write inside its working directory"),
    ("import os\ndef f(x):\n    os.close(os.open('/tmp/dojo_hostile_write', os.O_WRONLY | os.O_CREAT))\n    return x",
     "only write inside its working directory"),
    ("import os\ndef f(x):\n    os.rename('/tmp/dojo_hostile_a', '/tmp/dojo_hostile_b')\n    return x",
     "only write inside its working directory"),
    ("import os\ndef f(x):\n    os.link('/etc/hostname', 'here')\n    return x", "only write inside its working directory"),
    ("import os\ndef f(x):\n    os.mkdir('/tmp/dojo_hostile_dir')\n    return x", "only write inside its working directory"),
    ("def f(x):\n    import gc\n    return gc.get_objects()", "may not use gc.get_objects"),
])
def test_audit_hooks_refuse_what_the_scan_would_have(cell, words):
    run = run_child(child_job(cell), timeout_s=30)
    error = run.results["observed"]["calls"][0]["error"]
    assert error and words in error, error


def test_the_working_directory_stays_writable():
    """Within its own folder the child may write, by open, os.open, rename and mkdir."""
    cell = ("import os\ndef f(x):\n    os.mkdir('d')\n    os.close(os.open('d/a', os.O_WRONLY | os.O_CREAT))\n"
            "    os.rename('d/a', 'd/b')\n    open('d/c', 'w').close()\n    return x")
    run = run_child(child_job(cell), timeout_s=30)
    assert run.results["observed"]["calls"][0]["error"] is None


def test_exit_inside_the_function_returns_nothing_for_it():
    run = run_child(child_job("import os\ndef f(x):\n    os._exit(0)"), timeout_s=30)
    assert run.results["found"] and run.results["observed"] is None


def test_profiler_sees_ops_behind_torch_ops_and_disabled_modes():
    cell = ("def f(x):\n    with torch._C.DisableTorchFunction():\n"
            "        return torch.ops.aten._softmax(x, -1, False)")
    run = run_child(child_job(cell), timeout_s=30)
    assert "aten::_softmax" in run.results["observed"]["ops"]


def test_patched_clock_does_not_change_the_timing():
    slow = ("import time\ntime.perf_counter = lambda: 0.0\n"
            "def f(x):\n    for _ in range(3):\n        y = (x - x.amax(-1, keepdim=True)).exp()\n    return y / y.sum(-1, keepdim=True)")
    baseline = "def base(x):\n    y = (x - x.amax(-1, keepdim=True)).exp()\n    return y / y.sum(-1, keepdim=True)\n"
    job = child_job(slow, calls=[], ops_call=None, baseline_source=baseline, baseline_name="base",
                    speed={"inputs": [[torch.randn(128, 512)] for _ in range(9)], "kwargs": {}})
    speed = run_child(job, timeout_s=60).results["observed"]["speed"]
    ratios = sorted(c / b for c, b in zip(speed["candidate"], speed["baseline"]))
    assert ratios[len(ratios) // 2] > 1.8, ratios


# -- a cell that never ends, in the cells every task runs ---------------------------------------

ENDLESS_TOP_LEVEL = GOOD_SDPA + '''
while True:  # at the top level of a cell: every task's child runs it
    try:
        pass
    except BaseException:
        pass
'''


@pytest.mark.serial  # asserts a time
def test_an_endless_shared_cell_costs_one_time_limit(tmp_path):
    """Chapter 1's five tasks all run this cell; before, each waited out its own limit (5x)."""
    import time

    path = write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX, ENDLESS_TOP_LEVEL)
    started = time.perf_counter()
    report = grade_path(path, timeout_s=15)
    elapsed = time.perf_counter() - started
    assert elapsed < 2 * 15 + 10, f"{elapsed:.0f} s for a 15 s limit"
    assert report.score == 0 and {r.task for r in report.results} == {"1.1", "1.2", "1.3", "1.4", "1.5"}
    assert all("cell 3 did not finish within the time limit" in r.message for r in report.results)


def test_a_cell_that_ends_the_process_is_named():
    """The scan refuses `import os` in a notebook; behind it, the child still names the cell."""
    from reference_engine.grading.grader import child_problem, unfinished_cell
    from reference_engine.grading.source import Cell
    from reference_engine.grading.tasks import TASKS

    job = child_job("import os\nos._exit(0)")
    run = run_child(job, timeout_s=30)
    assert unfinished_cell(run) == 1 and not run.timed_out
    cells = [Cell(i + 1, source) for i, source in enumerate(job["cells"])]
    assert "ended while running cell 2" in child_problem(TASKS["1.1"], run, cells)


def test_a_stopped_cell_is_not_blamed_on_tasks_with_more_room():
    """A cell that ran out of time after a task's own set-up (loading a model, say) may well
    finish without it, and one that ran out of memory may finish with more."""
    from dataclasses import replace

    from reference_engine.grading.grader import StoppedCell
    from reference_engine.grading.tasks import TASKS

    plain, with_setup = TASKS["1.1"], TASKS["1.5"]
    cells = ["import torch", "while True: pass"]
    after_setup = StoppedCell(tuple(cells), "stopped", 1 << 30, with_setup.harness_source)
    alone = StoppedCell(tuple(cells), "stopped", 1 << 30, None)
    assert after_setup.stops(with_setup, cells) and not after_setup.stops(plain, cells)
    assert alone.stops(plain, cells) and alone.stops(with_setup, cells)
    assert not alone.stops(plain, ["import torch", "x = 1"])
    out_of_memory = StoppedCell(tuple(cells), "stopped", 4096, None)
    assert not out_of_memory.stops(replace(plain, memory_mb=8192), cells)
