"""Students made from the teacher, so that they start from its weights instead of noise.

  every-other      blocks 0, 2, 4, ...: half the depth, spread evenly (DistilBERT's choice);
  least-important  the blocks whose output is least like their input removed (chapter 5's
                   depth-pruning score, on calibration text): keeps the blocks that work;
  a list           any blocks, in order.

The embedding, the final norm and the tied head come with them. A width-pruned student is
chapter 5's `prune_ffn_channels` or `prune_kv_groups` output, distilled the same way.
"""

from __future__ import annotations

import torch

from ..compression import structured
from ..errors import DojoError


def student_blocks(teacher, how: str, n_blocks: int | None = None, windows: torch.Tensor | None = None) -> list[int]:
    """Which of the teacher's blocks the student keeps, in order."""
    n = teacher.config.n_layers
    keep = (n + 1) // 2 if n_blocks is None else n_blocks
    if not 1 <= keep <= n:
        raise DojoError(f"the student keeps 1 to {n} of the teacher's {n} blocks; got {keep}")
    if how == "every-other":
        return sorted(set(torch.linspace(0, n - 1, keep).round().long().tolist())) if n_blocks else list(range(0, n, 2))
    if how == "least-important":
        if windows is None:
            raise DojoError("ranking blocks needs calibration windows (calibration.calibration_windows)")
        scores = structured.block_scores(teacher, windows)
        return sorted(torch.topk(scores, keep).indices.tolist())
    try:
        blocks = [int(b) for b in how.split(",")]
    except ValueError:
        raise DojoError(f"--blocks is 'every-other', 'least-important' or a list like 0,2,4; got {how!r}") from None
    return blocks


def make_student(teacher, blocks: list[int]):
    """A new float model of these blocks of the teacher (a copy: training it leaves the teacher alone)."""
    return structured.keep_blocks(teacher, blocks)
