"""Run learner code in a child process and bring back only what it observed.

The child (`child.py`) gets an empty working directory, Python's isolated mode (no
PYTHONPATH, no user site, no current directory on sys.path), a minimal environment,
an address-space and CPU-time limit, and a process group of its own that is killed
whole at the deadline, whatever the code inside does with its signals or exceptions.
The parent reads one results file with torch.load(weights_only=True) and nothing else:
not the child's output, not its exit code.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CHILD = HERE / "child.py"
OBSERVE = HERE / "observe.py"
PROJECT_ROOT = HERE.parents[1]


@dataclass
class ChildRun:
    results: dict | None  # what the child saved (None: nothing readable)
    timed_out: bool
    seconds: float


def protected_paths() -> list[str]:
    """Folders graded code may not open: the solutions, the tests (mutants and graders),
    and the engine's own source (the reference implementations)."""
    return [str(PROJECT_ROOT / name) for name in ("solutions", "tests", "reference_engine")]


def _limits(memory_mb: int, cpu_s: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_child(job: dict, timeout_s: float = 60.0, memory_mb: int = 4096) -> ChildRun:
    """Run one job (see child.py) and return what came back."""
    import time

    job = {**job, "observe_source": OBSERVE.read_text(), "protected_paths": protected_paths()}
    with tempfile.TemporaryDirectory(prefix="dojo-grade-") as root:
        private, work = Path(root, "private"), Path(root, "work")
        private.mkdir()
        work.mkdir()
        torch.save(job, private / "job.pt")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(work),
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
            # Keep freed tensors in malloc's heap: otherwise glibc's adaptive threshold
            # decides, run by run, whether each MB-sized temporary costs fresh page faults,
            # and timings jump between two regimes 4x apart.
            "MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20),
        }
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", str(CHILD), str(private)], cwd=work, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_limits(memory_mb, int(timeout_s) + 5),
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group, also after a normal exit
            except ProcessLookupError:
                pass
            proc.wait()
        seconds = time.perf_counter() - t0
        results = _load(private / "results.pt")
        if results is not None and job.get("world_size", 1) > 1:
            results["ranks"] = [results] + [_load(private / f"results-{r}.pt") for r in range(1, job["world_size"])]
        return ChildRun(results=results, timed_out=timed_out, seconds=seconds)


def _load(path: Path) -> dict | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # cut mid-write by the kill, or not ours: nothing trusted
        return None
