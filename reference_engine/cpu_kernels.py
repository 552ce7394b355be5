"""Optional compiled CPU kernels for decoding (`csrc/`):
  - `pack_weight` / `packed_linear`: a matmul for 1-64 rows of activations on weights
    copied once into column blocks of 16 outputs;
  - `quant_linear`: a matmul on quantized weights with int8 activations and integer dot
    products (`quant_matmul.cpp`; `compression/kernel_layout.py` repacks the weights);
  - `llama_block_decode`: one Llama block for one new token per row, in one call, with
    float32 or quantized weights (`fused_decode.py` uses it).

They are built once per machine with the system's C++ compiler (set-up runs
`python -m reference_engine build-kernels`, about 30 s) and cached under
~/.cache/inference-dojo/kernels (or $DOJO_KERNEL_DIR). Loading the model never builds
them: where they have not been built, or cannot be (no compiler), the engine runs its
PyTorch path with oneDNN matmuls, and `bench` says which path ran. DOJO_KERNELS=0 turns
them off.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch

FOLDER = Path(__file__).parent / "csrc"
SOURCES = [FOLDER / "decode_kernels.cpp", FOLDER / "packed_matmul.cpp", FOLDER / "quant_matmul.cpp",
           FOLDER / "paged_attention.cpp", FOLDER / "ceilings.cpp", FOLDER / "argmax.cpp"]  # and the headers they share

_loaded = None  # the compiled module, once loaded
_error: str | None = None  # why it is not available, for `bench`


def build_dir() -> Path:
    """One folder per kernel source and torch version, so an upgrade rebuilds."""
    text = b"".join(p.read_bytes() for p in sorted(FOLDER.glob("*.[ch]*")))  # sources and headers
    tag = hashlib.sha256(text + torch.__version__.encode()).hexdigest()[:12]
    root = Path(os.environ.get("DOJO_KERNEL_DIR", Path.home() / ".cache" / "inference-dojo" / "kernels"))
    return root / f"decode_kernels_{tag}"


STALE_LOCK_S = 300  # a build takes about a minute here; a lock this old was left by a killed one
LOAD_WAIT_S = 30.0  # how long loading (not building) waits for another process's lock


def wait_for_lock(lock: Path, timeout_s: float) -> bool:
    """True once `lock` is gone; False if it is still there after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while lock.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def clear_stale_lock(lock: Path, wait_s: float = STALE_LOCK_S) -> bool:
    """Wait while another build holds `lock`; a lock older than wait_s was left by a build
    that was interrupted (Ctrl-C, a killed job): remove it, and say so. True if removed."""
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age >= wait_s:
            lock.unlink(missing_ok=True)
            print(f"note: removed {lock}, left {age:.0f} s ago by an interrupted kernel build", file=sys.stderr)
            return True
        time.sleep(1.0)


def kernels(build: bool = False):
    """The compiled module (pack_weight, packed_linear, quant_linear, llama_block_decode), or None where
    unavailable. build=False loads a module built earlier and never compiles; build=True
    compiles it first if needed."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    if os.environ.get("DOJO_KERNELS", "1") == "0":
        _error = "turned off by DOJO_KERNELS=0"
        return None
    folder = build_dir()
    if not build and not (folder / "dojo_decode_kernels.so").exists():
        _error = "not built; run: python -m reference_engine build-kernels"
        return None
    lock = folder / "lock"
    if lock.exists():  # PyTorch's builder waits for this file to go, forever if its build was killed
        # Another process holds it for a moment to check that the module is up to date, or
        # for a minute to build it: loading waits a little, never for an abandoned lock.
        if not build and not wait_for_lock(lock, LOAD_WAIT_S):
            _error = (f"a build of them holds {lock} (in progress, or interrupted: run "
                      "python -m reference_engine build-kernels)")
            return None
        if build:
            clear_stale_lock(lock)
    try:
        from torch.utils.cpp_extension import load

        folder.mkdir(parents=True, exist_ok=True)
        _loaded = load("dojo_decode_kernels", sources=[str(p) for p in SOURCES], build_directory=str(folder),
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       verbose=False)
    except Exception as e:  # no compiler, no ninja, a compile error: fall back, and say why
        _error = f"could not be built ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"
        return None
    _error = None
    return _loaded


def status() -> str:
    """One line for reports: which code decodes."""
    if _loaded is not None:
        return ("compiled: Llama blocks fused, packed matmuls for 1-64 rows, integer matmuls on quantized weights"
                + ("" if _loaded.have_vnni() else " (no AVX-512 VNNI: their plain loop)"))
    return f"PyTorch blocks, oneDNN matmuls (compiled kernels {unavailable()})"


def unavailable() -> str:
    """Why the compiled kernels are not loaded, in words (for reports)."""
    return _error or "not loaded"
