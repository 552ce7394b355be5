import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tiny_gguf helpers
# On a GPU, float32 tl.dot would use TF32 (10 mantissa bits): the kernel tests compare with
# float64 at float32 tolerances, as the interpreter computes on a CPU.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

from tiny_gguf import random_model, tiny_llama  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--notebook", default=None, metavar="PATH",
                     help="exercise notebook (or .py module) for tests/graders to grade; "
                          "default: each chapter's solution notebook (the graders' self-test)")


def pytest_configure(config):
    from reference_engine.grading.tasks import CHAPTERS, load_chapters

    load_chapters()
    for chapter, tasks in CHAPTERS.items():
        config.addinivalue_line("markers", f"{chapter}: graded checks of chapter {chapter}")
        for task in tasks:
            config.addinivalue_line("markers", f"task_{task.id.replace('.', '_')}: checks of task {task.id} ({task.title})")


@pytest.fixture
def tiny():
    return tiny_llama()


@pytest.fixture(params=["tiny", "tiny-mha", "tiny-gpt2", "tiny-alibi", "tiny-sinusoidal"])
def any_tiny(request):
    """Every architecture family and positional encoding (`random_model`: float64)."""
    return random_model(request.param, seed=1)


@pytest.fixture(scope="session")
def smollm():
    """The real model, loaded once per test session."""
    from reference_engine import load_model

    return load_model()


@pytest.fixture(scope="session")
def smollm64():
    """The real model in float64: the engine's math without float32 rounding."""
    from reference_engine import load_model

    return load_model(dtype=torch.float64)


def _smollm_dir_and_file():
    from reference_engine.gguf_loader import default_model_path

    path = default_model_path()
    return str(path.parent), path.name


@pytest.fixture(scope="session")
def hf_tok():
    """HF transformers' own tokenizer, converted from the GGUF file."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder, name = _smollm_dir_and_file()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def hf_model():
    """HF transformers' own LlamaForCausalLM, loaded by its own GGUF reader from the same file."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    folder, name = _smollm_dir_and_file()
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def executed_lessons(tmp_path_factory):
    """Every lesson executed once per session, in a scratch directory:
    {stem: (notebook with outputs, seconds it took)}. test_lessons checks them and
    test_book renders them, so CI runs each lesson once."""
    import time

    import nbformat
    from nbclient import NotebookClient

    executed = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "lessons").glob("*.ipynb")):
        stem, nb = path.stem, nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{stem}: commit lessons without outputs"
        started = time.perf_counter()
        NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": str(tmp_path_factory.mktemp(stem))}}).execute()
        executed[stem] = (nb, time.perf_counter() - started)
    return executed
