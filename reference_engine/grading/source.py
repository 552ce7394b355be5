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
# What graded code may use of torch.distributed: the rank, the world size and the
# collectives, which chapter 8's harness records. Process-group objects, device meshes and
# the internals reach the same transport without being seen.
DIST_ALLOWED = frozenset({
    "get_rank", "get_world_size", "is_initialized", "ReduceOp", "P2POp", "all_reduce", "all_gather",
    "all_gather_into_tensor", "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "broadcast_object_list", "reduce", "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all",
    "all_to_all_single", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
})
# A module imported under another name escapes the checks that look for torch, F or dist;
# these are the names the notebooks use.
MODULE_ALIASES = {"torch.nn.functional": "F", "torch.nn": "nn", "torch.distributed": "dist", "triton.language": "tl",
                  "numpy": "np", "matplotlib.pyplot": "plt"}
MODULE_NAMES = frozenset({"torch", "math", "triton", "numpy", *MODULE_ALIASES.values()})
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
    as_value = module_used_as_value(tree)
    if as_value:
        return f"cell {cell.number}, {as_value}"
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
            imported = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            if parts[:2] == ["torch", "distributed"] and (len(parts) > 2 or any(n not in DIST_ALLOWED for n in imported)):
                return (f"imports {name} {', '.join(imported)}; graded code uses torch.distributed as dist, and "
                        "only the rank, the world size and the collectives (dist.all_reduce, dist.send, ...)")
            renamed = _renamed(node)
            if renamed:
                return renamed
            if isinstance(node, ast.ImportFrom) and root == "torch" and any(a.name in BLOCKED_TORCH for a in node.names):
                return f"imports {', '.join(a.name for a in node.names)} from {name}, which graded code may not use"
    elif isinstance(node, ast.Name) and node.id in BLOCKED_NAMES:
        return f"uses {node.id}, which graded code may not use"
    elif isinstance(node, ast.Attribute):
        if node.attr.startswith("__") and node.attr.endswith("__") and node.attr not in ALLOWED_DUNDERS:
            return f"uses the attribute {node.attr}, which graded code may not use"
        if node.attr in BLOCKED_TORCH and _rooted_at(node.value, "torch"):
            return f"uses torch.{node.attr}, which graded code may not use"
        if node.attr.startswith("_") and _rooted_at(node.value, MODULE_NAMES):
            return f"uses the private name {node.attr}, which graded code may not use"
        if _dotted(node.value) in ("dist", "torch.distributed") and node.attr not in DIST_ALLOWED:
            return (f"uses dist.{node.attr}; graded code uses only the rank, the world size and the collectives "
                    "(dist.all_reduce, dist.send, ...), which the grader records")
        if node.attr in {"os", "sys", "subprocess", "builtins", "importlib", "ctypes", "gc", "inspect"}:
            return f"reaches the module {node.attr} through an attribute, which graded code may not do"
    elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and _rooted_at(target.value, {"torch", "F", "math", "time", "np", "numpy",
                                                                              "triton", "tl", "dist"}):
                return "assigns to an attribute of a library module (monkeypatching), which graded code may not do"
    return None


def _renamed(node: ast.Import | ast.ImportFrom) -> str | None:
    """Why an import binds a module of torch or triton under an unusual name, or None."""
    for a in node.names:
        full = a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}"
        if a.asname is None or a.asname == a.name.split(".")[-1] and isinstance(node, ast.ImportFrom):
            continue
        if full.split(".")[0] in ("torch", "triton", "numpy") and MODULE_ALIASES.get(full) != a.asname:
            usual = MODULE_ALIASES.get(full, full.split(".")[-1] if isinstance(node, ast.ImportFrom) else full)
            return f"imports {full} as {a.asname}; use its usual name ({usual})"
    return None


def module_used_as_value(tree: ast.AST) -> str | None:
    """A module name used other than to reach one of its attributes (m = torch, f(dist)):
    the alias would escape the checks on torch's and dist's names."""
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in MODULE_NAMES:
            parent = parents.get(id(node))
            if not (isinstance(parent, ast.Attribute) and parent.value is node):
                return f"line {node.lineno}: uses the module name {node.id} as a value; use it only as {node.id}.name"
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
