"""Triton kernels: the GPU versions of the engine's hot operations, one file per idea.

    softmax.py          row softmax (one program per row, masked for any width)
    rmsnorm.py          fused RMSNorm: one read of x, one write of y
    rope.py             rotary embeddings applied to Q and K heads in place of four PyTorch ops
    matmul.py           tiled matmul with a float32 accumulator; int4 dequantize-and-multiply
    flash_attention.py  FlashAttention forward: online softmax, causal, grouped-query, decode

On a machine with a CUDA GPU they compile to GPU code. Without one, Triton's interpreter
runs them on the CPU, program after program, with numpy: slow, but the same indexing,
masks and arithmetic, which is what the tests and the graded exercise check. Importing
this package requires triton (`pip install triton`); importing the engine does not.

subtle: the interpreter is chosen when a kernel is defined (`@triton.jit` reads
TRITON_INTERPRET then), triton's own library functions (tl.max, tl.sum) included, which
are defined when triton is first imported; torch.compile imports triton early. So the
engine's package sets TRITON_INTERPRET on a machine without a GPU as soon as it is imported
(`choose_triton_mode`), and `load_triton` refuses, with the fix, a triton imported too soon.
"""

from __future__ import annotations

import os
import sys

from ..errors import DojoError


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_triton_mode() -> None:
    """Without a CUDA GPU, Triton can only interpret: say so before triton is imported."""
    if "triton" not in sys.modules and not gpu_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def load_triton():
    """Import triton, in interpreter mode where there is no GPU. A DojoError says how to
    install it when it is missing."""
    choose_triton_mode()
    try:
        import triton
    except ImportError:
        raise DojoError("the Triton kernels need triton: pip install triton (on a CPU machine they run "
                        "in Triton's interpreter)") from None
    if not gpu_available() and not isinstance(triton.language.standard.max, _interpreted_class()):
        raise DojoError("triton was imported before its interpreter was turned on (torch.compile imports it), "
                        "and there is no GPU to compile for: import reference_engine before anything else, or "
                        "start Python with TRITON_INTERPRET=1 in the environment")
    return triton


def _interpreted_class():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


def interpreted() -> bool:
    """True when kernels defined now run in Triton's interpreter (no GPU, or asked for)."""
    load_triton()
    from triton import knobs

    return bool(knobs.runtime.interpret)
