"""Does a speed check decide the same way every time? A benchmark of the grader itself.

    python -m reference_engine.grading.stability [--runs 20]

Grades the speed check of task 1.1 (softmax) `runs` times for the solution and for a variant that
does the same work twice, first on a quiet machine, then with a CPU-hogging process
beside it, and prints how often each decision came out and the range of the measured
ratios. A stable check never flips: the solution always passes, the slow variant always
fails.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from contextlib import contextmanager, nullcontext

from .checks import judge_speed, speed_ratios
from .grader import measure_speed
from .tasks import TASKS, load_chapters

SOLUTION = ("import torch\n\ndef stable_softmax(x, dim=-1):\n"
            "    e = (x - x.amax(dim, keepdim=True)).exp()\n    return e / e.sum(dim, keepdim=True)\n")
TWICE = ("import torch\n\ndef stable_softmax(x, dim=-1):\n    for _ in range(2):\n"
         "        e = (x - x.amax(dim, keepdim=True)).exp()\n        out = e / e.sum(dim, keepdim=True)\n    return out\n")


@contextmanager
def cpu_hog():
    """A process spinning on one core for as long as the block runs."""
    hog = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


def speed_decision(source: str, task_id: str = "1.1") -> tuple[str, float]:
    """(status, median ratio) of one speed check, re-measuring as the grader does."""
    task = TASKS[task_id]
    measurements = []
    while True:
        measurements.append(measure_speed(task, [source], len(measurements), timeout_s=120))
        verdict, again = judge_speed(task, measurements, values_ok=True)
        if not again:
            ratios = [r for m in measurements if m for r in speed_ratios(m)]
            return verdict.status, statistics.median(ratios) if ratios else float("nan")


def stability(runs: int, hog: bool) -> dict:
    load_chapters()
    rows = {}
    with cpu_hog() if hog else nullcontext():
        for name, source in (("solution", SOLUTION), ("twice as slow", TWICE)):
            outcomes = [speed_decision(source) for _ in range(runs)]
            rows[name] = {"statuses": [s for s, _ in outcomes], "ratios": [r for _, r in outcomes]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    for hog in (False, True):
        print(f"{'with a CPU hog beside it' if hog else 'quiet machine'}, {args.runs} runs each:")
        for name, row in stability(args.runs, hog).items():
            counts = {s: row["statuses"].count(s) for s in sorted(set(row["statuses"]))}
            print(f"  {name:<14} decisions {counts}  median ratio {min(row['ratios']):.2f}-{max(row['ratios']):.2f}")


if __name__ == "__main__":
    main()
