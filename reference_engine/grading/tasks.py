"""What a graded task is: the function a learner writes, the cases it is called on, the
float64 reference it is compared with, and the checks that award its points.

Chapters define their tasks in `grading/chapters/`; `TASKS` collects them by id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Case:
    """One call: f(*args, **kwargs), judged by the check named `check`."""

    check: str
    args: list
    kwargs: dict = field(default_factory=dict)
    note: str = ""  # shown on failure, e.g. "shape (3, 5, 7), dim=0"
    output: int | None = None  # for functions returning a tuple: which element this case judges
    # A property to check instead of equality with the reference: judge(output, *args) ->
    # None when it holds, else what is wrong (e.g. RoPE's scores depend only on offsets).
    judge: Callable | None = None


@dataclass
class Check:
    points: int
    hint: str  # what the learner should look at when this check fails


@dataclass
class Speed:
    """Candidate time / baseline time must stay at or below `max_ratio`, measured in the
    same process (see `checks.judge_speed`)."""

    baseline_source: str  # Python source defining `baseline_name`, run in the child
    baseline_name: str
    make_inputs: Callable[[torch.Generator], list]  # fresh arguments for one timed pair
    max_ratio: float
    why: str  # the reason a naive version misses the target
    kwargs: dict = field(default_factory=dict)
    pairs: int = 21


@dataclass
class Memory:
    """The largest tensor any operator produces during one traced call must have at most
    `max_elements(*args)` elements: how "never materialises the T x T matrix" is checked."""

    args: list
    kwargs: dict
    max_elements: int
    why: str
    points: int = 2


@dataclass
class Task:
    id: str  # "1.2"
    chapter: str  # pytest marker and notebook name stem, "ch01_attention"
    title: str
    function: str  # the name the learner's code must define
    params: tuple[str, ...]  # required parameter names, in order
    reference: Callable  # float64 oracle, called in the trusted process only
    make_cases: Callable[[torch.Generator], list[Case]]
    checks: dict[str, Check]  # value checks by name, in report order
    forbidden_ops: dict[str, str] = field(default_factory=dict)  # aten op name -> what the learner wrote
    speed: Speed | None = None
    memory: Memory | None = None
    common: bool = True  # output type, untouched inputs, no caching (off where inputs are token ids)
    common_checks: tuple[str, ...] | None = None  # only these of COMMON (None: all three, when common)
    # dtypes of a tuple's outputs (None: the first float input's), for outputs that are codes
    output_dtypes: tuple[torch.dtype | None, ...] | None = None
    harness_source: str | None = None  # trusted code run in the child before the learner's: defines wrap(fn)
    memory_mb: int = 4096  # the child's address-space limit
    rtol: float = 1e-5
    atol: float = 1e-6
    seeds: tuple[int, ...] = (0, 1, 2)  # visible checks in the notebook, and the trusted grader
    hidden_seeds: tuple[int, ...] = (101, 102)  # nbgrader's hidden tests, and the trusted grader
    blocked_modules: tuple[str, ...] = ("reference_engine", "solutions", "tests")
    # names under a blocked part of torch this task's code may use (`source.scan`), e.g. a
    # training step's "torch.nn.utils.clip_grad_norm_"; every other task still refuses them
    allowed_names: tuple[str, ...] = ()
    # a kernel whose speed only means something on a GPU: not timed, and the report says so
    # (no points lost or given)
    gpu_speed: bool = False
    # ranks of one gloo group that each run the learner's code on every case (chapter 8);
    # each rank's output comes back and the case's judge sees them all, by rank
    world_size: int = 1

    # Checks every task has, besides its own value checks.
    COMMON = {
        "output_type": Check(1, "return a torch.Tensor (not a subclass, list or numpy array) with the "
                                "documented shape and the input's dtype"),
        "inputs_unchanged": Check(1, "do not modify the input tensors in place (x -= ..., x.sub_(...)); "
                                     "work on new tensors"),
        "no_caching": Check(1, "compute the result from the input's current values on every call; "
                               "do not keep results between calls"),
    }

    @property
    def common_names(self) -> tuple[str, ...]:
        """The COMMON checks this task has."""
        if self.common_checks is not None:
            return self.common_checks
        return tuple(self.COMMON) if self.common else ()

    def all_checks(self) -> dict[str, Check]:
        checks = {**self.checks, **{name: self.COMMON[name] for name in self.common_names}}
        if self.memory is not None:
            checks["memory"] = Check(self.memory.points, self.memory.why)
        if self.speed is not None:
            checks["speed"] = Check(2, self.speed.why)
        return checks

    @property
    def max_score(self) -> int:
        return sum(c.points for c in self.all_checks().values())


GPU_SPEED_NOTE = "speed: not graded (it means something only on a GPU); no points lost or given"

TASKS: dict[str, Task] = {}
CHAPTERS: dict[str, list[Task]] = {}


def register(*tasks: Task) -> None:
    for task in tasks:
        TASKS[task.id] = task
        CHAPTERS.setdefault(task.chapter, []).append(task)


def register_drills(*tasks: Task) -> None:
    """Tasks written for practice drills only: graded like the others, in no chapter (no notebook)."""
    for task in tasks:
        TASKS[task.id] = task


def load_chapters() -> None:
    """Import every chapter module, which registers its tasks."""
    from .chapters import (  # noqa: F401
        ch01_attention,
        ch02_positional_encoding,
        ch03_decoding_kv_cache,
        ch04_quantization,
        ch05_pruning_low_rank,
        ch06_distillation,
        ch07_gpu_acceleration,
        ch08_parallel_inference,
        ch09_batching_serving,
        drills,
    )
