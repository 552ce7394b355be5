"""Answers in a terminal: the banks are Markdown with LaTeX math, written for the book.
Math becomes readable text (pylatexenc: `$\\sqrt{d_k}$` -> √(d_k)), code blocks are left
alone, and rich lays out the Markdown (lists, code, emphasis) for the terminal.

Example: "Divide by $\\sqrt{d_k}$: $2 \\times 30 = 60$" -> "Divide by √(d_k): 2 × 30 = 60"
"""

from __future__ import annotations

import re

FENCE = re.compile(r"(```.*?```|`[^`\n]*`)", re.DOTALL)  # code: never touched
MATH = re.compile(r"\$\$(.+?)\$\$|(?<![\\$])\$(?!\s)(.+?)(?<![\\\s])\$", re.DOTALL)


def math_to_text(markdown: str) -> str:
    """Every $...$ and $$...$$ outside code turned into plain Unicode text."""
    from pylatexenc.latex2text import LatexNodes2Text

    converter = LatexNodes2Text(math_mode="text")

    def convert(match: re.Match) -> str:
        latex = match.group(1) or match.group(2)
        text = converter.latex_to_text(latex).strip()
        return re.sub(r"\s+", " ", text)

    parts = FENCE.split(markdown)
    return "".join(part if FENCE.fullmatch(part) else MATH.sub(convert, part) for part in parts)


def to_terminal(markdown: str, width: int = 88, color: bool = False) -> str:
    """The Markdown laid out for a terminal of `width` columns (ANSI styles only with color)."""
    from rich.console import Console
    from rich.markdown import Markdown

    console = Console(width=width, force_terminal=color, no_color=not color, highlight=False,
                      record=False, file=_Sink())
    with console.capture() as captured:
        console.print(Markdown(math_to_text(markdown), code_theme="ansi_dark" if color else "bw"))
    return "\n".join(line.rstrip() for line in captured.get().rstrip().splitlines()) + "\n"


class _Sink:
    """Console output goes to the capture, never to a real stream."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
