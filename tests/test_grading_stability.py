"""A speed check's decision does not flip: 10 runs of the solution all pass and 10 runs
of a variant doing the work twice all fail, also with a CPU-hogging process beside them.
(`python -m reference_engine.grading.stability` prints the ratios, 20 runs by default.)"""

import pytest

from reference_engine.grading.stability import stability

pytestmark = pytest.mark.serial  # the decisions are measured on a machine with nothing else running


@pytest.mark.parametrize("hog", [False, True], ids=["quiet", "with-cpu-hog"])
def test_speed_decisions_do_not_flip(hog):
    rows = stability(runs=10, hog=hog)
    assert set(rows["solution"]["statuses"]) == {"pass"}, rows["solution"]
    assert set(rows["twice as slow"]["statuses"]) == {"fail"}, rows["twice as slow"]
