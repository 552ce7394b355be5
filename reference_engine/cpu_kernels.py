"""An optional compiled CPU kernel for decode-sized matmuls (`csrc/skinny_matmul.cpp`).

It is built once per machine with the system's C++ compiler (set-up runs
`python -m reference_engine build-kernels`, about 25 s) and cached under
~/.cache/inference-dojo/kernels (or $DOJO_KERNEL_DIR). Loading the model never builds
it: where it has not been built, or cannot be (no compiler), the engine uses oneDNN,
and `bench` says which path ran. DOJO_KERNELS=0 turns it off.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "skinny_matmul.cpp"
MAX_ROWS = 4  # the kernel is written for 1 to 4 input rows

_loaded = None  # the compiled module, once loaded
_error: str | None = None  # why it is not available, for `bench`


def build_dir() -> Path:
    """One folder per kernel source and torch version, so an upgrade rebuilds."""
    tag = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    root = Path(os.environ.get("DOJO_KERNEL_DIR", Path.home() / ".cache" / "inference-dojo" / "kernels"))
    return root / f"skinny_matmul_{tag}"


def skinny_matmul_kernel(build: bool = False):
    """The compiled `skinny_matmul(x, weight)` function, or None where unavailable.

    build=False loads a kernel built earlier and never compiles; build=True compiles
    it first if needed.
    """
    global _loaded, _error
    if _loaded is not None:
        return _loaded.skinny_matmul
    if os.environ.get("DOJO_KERNELS", "1") == "0":
        _error = "turned off by DOJO_KERNELS=0"
        return None
    folder = build_dir()
    if not build and not (folder / "dojo_skinny_matmul.so").exists():
        _error = "not built; run: python -m reference_engine build-kernels"
        return None
    try:
        from torch.utils.cpp_extension import load

        folder.mkdir(parents=True, exist_ok=True)
        _loaded = load("dojo_skinny_matmul", sources=[str(SOURCE)], build_directory=str(folder),
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       verbose=False)
    except Exception as e:  # no compiler, no ninja, a compile error: fall back, and say why
        _error = f"could not be built ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"
        return None
    _error = None
    return _loaded.skinny_matmul


def status() -> str:
    """One line for reports: which kernel decode-sized matmuls use."""
    if _loaded is not None:
        return "compiled skinny_matmul (1-4 rows), oneDNN (5-64 rows)"
    return f"oneDNN (compiled kernel {_error or 'not loaded'})"

