"""Chapter 8's multi-rank grading holds against code written to fool it: forged records,
work hidden from the counters, torch.distributed reached around the recorder."""

from __future__ import annotations

import pytest

from reference_engine.grading.grader import grade_path
from reference_engine.grading.source import Cell, scan

REFUSED = {
    "import torch as T": "usual name",
    "from torch import distributed as D": "usual name",
    "import torch.distributed.distributed_c10d as c10d": "only the rank",
    "from torch.distributed import new_group": "only the rank",
    "import torch.distributed as dist\nmesh = dist.init_device_mesh('cpu', (3,))": "dist.init_device_mesh",
    "import torch.distributed as dist\ng = dist.group.WORLD": "dist.group",
    "import torch\nT = torch": "as a value",
    "import torch.distributed as dist\ndef f(m):\n    return m\nf(dist)": "as a value",
    "import torch\nx = torch._C": "may not use",
    "import torch.nn.functional as F\ny = F._canonical_mask": "private",
}


@pytest.mark.parametrize("source", REFUSED, ids=range(len(REFUSED)))
def test_the_scan_refuses_ways_around_the_recorder(source):
    problem = scan(Cell(1, source))
    assert problem is not None and REFUSED[source] in problem, problem


def test_the_usual_distributed_code_is_allowed():
    source = ("import math\nimport torch\nimport torch.distributed as dist\nimport torch.nn.functional as F\n"
              "def f(x):\n    y = F.silu(x)\n    dist.all_reduce(y, op=dist.ReduceOp.SUM)\n"
              "    return y if isinstance(y, torch.Tensor) else None\n")
    assert scan(Cell(1, source)) is None


FORGED = '''
import torch
import torch.distributed as dist

def row_parallel_linear(x, weight, bias):
    clean = torch.nan_to_num(x) @ torch.nan_to_num(weight).T + bias  # no communication at all
    return clean, torch.tensor([1.0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)  # a forged record
'''

HIDDEN_WORK = '''
import torch
import torch.distributed as dist

def data_parallel_forward(x, weight):
    # every rank computes every row with a broadcast product the flop counter does not see
    return torch.softmax((x[:, :, None] * weight[None]).sum(1), dim=-1)
'''


@pytest.mark.parametrize("source,task", [(FORGED, "8.1"), (HIDDEN_WORK, "8.4")], ids=["forged-record", "hidden-work"])
def test_cheats_score_nothing(source, task, tmp_path):
    path = tmp_path / "cheat.py"
    path.write_text(source)
    report = grade_path(path, task_id=task)
    assert report.score == 0, [(r.name, r.message) for r in report.results if r.passed]
