"""Command line: `python -m reference_engine COMMAND` (or the `inference-dojo` script).

Every problem a user can fix is reported as one line starting with "error:" and exit
code 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from .commands import classroom, compress, measure, practice, run, serving
from .errors import DojoError

MODULES = (run, measure, compress, serving, classroom, practice)  # one module per family of commands, in --help's order
COMMANDS = {name: fn for module in MODULES for name, fn in module.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reference_engine",
        description="Inference Dojo's reference engine: run, chat with and benchmark SmolLM2-135M "
                    "(or another Llama-architecture GGUF file) in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in MODULES:
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DojoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
