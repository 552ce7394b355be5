"""Learner code in: notebook or module -> cells, and a static scan of each cell.

The scan is the readable first wall (the child's audit hooks and the profiler are the
ones that hold): a cell that imports a module outside the allowed list, reaches for
interpreter internals, or monkeypatches torch is not run, and the report says why.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DojoError

ALLOWED_IMPORTS = frozenset({
    "torch", "math", "numpy", "typing", "functools", "itertools", "collections", "dataclasses",
    "einops", "time", "random", "statistics", "matplotlib", "__future__",
})
BLOCKED_TORCH = frozenset({  # torch submodules/attributes that reach past the dispatcher or load code
    "_C", "ops", "library", "overrides", "profiler", "utils", "_dynamo", "jit", "hub", "load",
    "_ops", "_prims", "_refs", "_decomp", "autograd", "compile", "_inductor", "testing",
})
BLOCKED_NAMES = frozenset({
    "exec", "eval", "compile", "open", "__import__", "globals", "locals", "vars", "getattr",
    "setattr", "delattr", "breakpoint", "input", "get_ipython", "__builtins__", "memoryview",
})
# torch.distributed's process-group objects and internals: collectives called through them
# are invisible to chapter 8's recorder (dist.all_reduce and friends are the way)
DIST_INTERNALS = frozenset({"distributed_c10d", "group", "GroupMember", "new_group", "new_subgroups",
                            "ProcessGroup", "ProcessGroupGloo", "Backend", "Store", "FileStore", "TCPStore",
                            "init_process_group", "destroy_process_group", "rendezvous"})
ALLOWED_DUNDERS = frozenset({"__init__", "__call__", "__name__", "__doc__", "__repr__", "__len__"})


@dataclass
class Cell:
    number: int  # 1-based position among the notebook's code cells
    source: str
    problem: str | None = None  # why the scan refused it (then it is not run)


def read_cells(path: str | Path) -> list[Cell]:
    """Code cells of a notebook (nbgrader test cells left out) or a .py module (one cell)."""
    path = Path(path)
    if not path.is_file():
        raise DojoError(f"{path}: no such file. Pass the path of your exercise notebook (.ipynb) or a .py module.")
    if path.suffix == ".py":
        return [Cell(1, path.read_text(encoding="utf-8", errors="replace"))]
    if path.suffix != ".ipynb":
        raise DojoError(f"{path}: expected a .ipynb notebook or a .py module")
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        raw_cells = nb["cells"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DojoError(f"{path} is not a valid notebook ({type(e).__name__}: {e}). If it was edited by "
                        "hand, open it in Jupyter and save it again, or restore it from exercises/.") from None
    cells = []
    for cell in raw_cells:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade") and not meta.get("solution"):
            continue  # a test cell: graders run their own copy of the checks
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        cells.append(Cell(len(cells) + 1, strip_magics(source)))
    return cells


def strip_magics(source: str) -> str:
    """IPython-only lines (%magic, !shell) become comments: plain Python runs the rest."""
    return "\n".join("# " + line if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def scan(cell: Cell, blocked_modules: tuple[str, ...] = (), allowed: tuple[str, ...] = ()) -> str | None:
    """The first reason this cell may not run in the grader, or None.

    allowed: dotted names a task may use although they sit under a blocked part of torch,
    for example "torch.nn.utils.clip_grad_norm_" or "torch.autograd.grad" for a training
    step; only those names, not the rest of torch.nn.utils or torch.autograd. A module
    name ("triton", "triton.language") allows `import` of exactly that module."""
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as e:
        return f"syntax error in cell {cell.number}, line {e.lineno}: {e.msg}"
    exempt = _allowed_nodes(tree, allowed)
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        problem = _node_problem(node, blocked_modules)
        if problem:
            line = getattr(node, "lineno", "?")
            return f"cell {cell.number}, line {line}: {problem}"
    return None


def _node_problem(node: ast.AST, blocked_modules: tuple[str, ...]) -> str | None:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            root = name.split(".")[0]
            if any(name == b or name.startswith(b + ".") for b in blocked_modules):
                return f"imports {name}, which graded code may not use"
            if root not in ALLOWED_IMPORTS:
                return (f"imports {name}; graded code may import only "
                        f"{', '.join(sorted(ALLOWED_IMPORTS - {'__future__'}))}")
            parts = name.split(".")
            if root == "torch" and any(p in BLOCKED_TORCH for p in parts[1:]):
                return f"imports {name}, which reaches past torch's public operators"
            inner = parts[1:] + ([a.name for a in node.names] if isinstance(node, ast.ImportFrom) else [])
            if parts[:2] == ["torch", "distributed"] and any(p in DIST_INTERNALS for p in inner):
                return f"imports {name} internals; call dist.all_reduce, dist.send and the other collectives"
            if isinstance(node, ast.ImportFrom) and root == "torch" and any(a.name in BLOCKED_TORCH for a in node.names):
                return f"imports {', '.join(a.name for a in node.names)} from {name}, which graded code may not use"
    elif isinstance(node, ast.Name) and node.id in BLOCKED_NAMES:
        return f"uses {node.id}, which graded code may not use"
    elif isinstance(node, ast.Attribute):
        if node.attr.startswith("__") and node.attr.endswith("__") and node.attr not in ALLOWED_DUNDERS:
            return f"uses the attribute {node.attr}, which graded code may not use"
        if node.attr in BLOCKED_TORCH and _rooted_at(node.value, "torch"):
            return f"uses torch.{node.attr}, which graded code may not use"
        if node.attr in DIST_INTERNALS and _rooted_at(node.value, {"dist", "torch", "distributed"}):
            return f"uses {node.attr} of torch.distributed; call dist.all_reduce, dist.send and the other collectives"
        if node.attr in {"os", "sys", "subprocess", "builtins", "importlib", "ctypes", "gc", "inspect"}:
            return f"reaches the module {node.attr} through an attribute, which graded code may not do"
    elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and _rooted_at(target.value, {"torch", "F", "math", "time", "np", "numpy",
                                                                              "triton", "tl", "dist"}):
                return "assigns to an attribute of a library module (monkeypatching), which graded code may not do"
    return None


def _dotted(node: ast.AST) -> str | None:
    """"torch.nn.utils" for the expression torch.nn.utils, None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _allowed_nodes(tree: ast.AST, allowed: tuple[str, ...]) -> set[int]:
    """ids of the nodes that spell an allowed name (the whole chain torch.nn.utils.clip_grad_norm_
    and its inner parts), and of imports of exactly an allowed name."""
    exempt: set[int] = set()
    if not allowed:
        return exempt
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node) in allowed:
            inner = node
            while isinstance(inner, ast.Attribute):
                exempt.add(id(inner))
                inner = inner.value
        elif isinstance(node, ast.ImportFrom) and all(f"{node.module}.{a.name}" in allowed for a in node.names):
            exempt.add(id(node))
        elif isinstance(node, ast.Import) and all(a.name in allowed for a in node.names):
            exempt.add(id(node))  # exactly an allowed module (import triton, import triton.language as tl)
    return exempt


def _rooted_at(node: ast.AST, names) -> bool:
    names = {names} if isinstance(names, str) else names
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id in names
