"""The layering of docs/architecture.md, checked: each part of the package imports only the parts below it, and
no module imports itself back through others (no import circle, lazy function-level imports included).

Data flows one way: module → functional (dispatch) → backends (autograd, custom ops) → ops (kernels).
A new import that breaks the order fails here with the file, the import and what that part may use; a circle
fails with the modules that form it.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PKG = Path(__file__).resolve().parent.parent / "lora_kernels"

# part -> the parts it may import (itself always allowed). A part is a top-level module or subpackage.
ALLOWED = {
    "settings": set(),
    "timing": set(),
    "reference": set(),
    "names": set(),
    "patterns": set(),
    "hooks": set(),
    "config": {"patterns"},
    "ops": {"settings"},
    "backends": {"settings", "timing", "ops", "_cuda"},  # _cuda: the compiled csrc/ extension, when built
    "adapter_segments": {"backends"},
    "functional": {"backends", "adapter_segments"},
    "layers": {"config", "functional", "names"},
    "layer": {"layers"},  # the import paths before layers/: re-exports only
    "layer_4bit": {"layers"},
    "targets": {"config", "layers", "patterns"},
    "inject": {"config", "hooks", "layers", "targets"},
    "trainability": {"inject"},
    "persistence": {"config", "inject", "layers"},
    "adapters": {"functional", "inject", "layers"},
    "data": set(),
    "models": {"data"},
    # training -> adapters, inject: multi.py trains several adapters in mixed batches (batch_adapters) and clips
    # each adapter's parameters on their own.
    "training": {"data", "adapters", "inject"},
    # integrations -> hooks: integrations/__init__.py registers what inject_lora does for a transformers model.
    "integrations": {"config", "functional", "hooks", "inject", "layers", "persistence", "training"},
    "parity_check": {"backends", "functional", "reference"},
    "layer_bench": {"backends", "layers", "timing"},
}
TOP = {"__init__", "cli"}  # the public surface and the command line (the cli/ package) may use everything


def _part(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(path: Path):
    """(line, part) for every import of a lora_kernels module in `path`, relative or absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg_parts = path.relative_to(PKG).parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[:len(pkg_parts) - (node.level - 1)])
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "lora_kernels":
                mod = node.module.split(".")[1:]
            else:
                continue
            if mod:
                yield node.lineno, mod[0]
            else:  # "from . import x" at the package top: x is the part
                for alias in node.names:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "lora_kernels" and len(names) > 1:
                    yield node.lineno, names[1]


FILES = sorted(p for p in PKG.rglob("*.py"))


def test_every_part_is_classified():
    parts = {_part(p) for p in FILES}
    assert parts <= set(ALLOWED) | TOP, f"add {sorted(parts - set(ALLOWED) - TOP)} to ALLOWED (and to docs/architecture.md)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_layering(path):
    part = _part(path)
    if part in TOP:
        return
    bad = [(line, other) for line, other in _imported_parts(path)
           if other != part and other not in ALLOWED[part]]
    assert not bad, (f"{path.relative_to(PKG)} ({part}) imports {bad}; {part} may import only "
                     f"{sorted(ALLOWED[part]) or 'nothing else in the package'}")


def test_ops_use_no_torch_nn():
    for path in (PKG / "ops").glob("*.py"):
        text = path.read_text()
        assert "torch.nn" not in text and "import nn" not in text, f"{path.name}: ops/ hold kernels only"


# -- no import circles ------------------------------------------------------------------------------------------
#
# Module by module, every import counts: at the top of a file or inside a function (a lazy import only hides a
# circle until the function runs, and the two modules still cannot be read or tested apart). Not counted: the
# implicit import of a package's __init__ before any of its submodules (a package's __init__ re-exporting its own
# submodules is the normal layout, not a circle). Where a lower module needs something only a higher one knows,
# the higher one hands it down when it is imported (inject.after_inject, layers/base.py's slot for the layer-type
# table) instead.

def _module_name(path: Path) -> str:
    parts = ("lora_kernels",) + path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in FILES}
EXTENSIONS = {"lora_kernels._cuda"}  # compiled (csrc/), not a Python file: it imports nothing of the package


def _imported_modules(path: Path) -> Set[str]:
    """The package modules `path` imports, each resolved to the module file it runs (a name imported from a
    package is its __init__; a submodule imported by name is that submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "lora_kernels":
                base = node.module.split(".")
            else:
                continue
            module = ".".join(base)
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub not in EXTENSIONS:
                    out.add(sub if sub in MODULES else module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lora_kernels":
                    out.add(alias.name)
    return {m for m in out if m in MODULES and m != _module_name(path)}


def _circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One circle per strongly connected component of more than one module (Tarjan), as a path that closes."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_path_through(graph, component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_through(graph: Dict[str, Set[str]], component: Set[str]) -> List[str]:
    """A closed walk start -> ... -> start inside the component (breadth-first from its first module)."""
    start = min(component)
    parent, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return list(reversed(path)) + [start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return sorted(component)


def test_the_allowed_table_has_no_circle():
    circles = _circles({part: set(allowed) & set(ALLOWED) for part, allowed in ALLOWED.items()})
    assert not circles, f"ALLOWED lets parts import each other in a circle: {circles}"


def test_no_import_circle_between_modules():
    graph = {name: _imported_modules(path) for name, path in MODULES.items()}
    circles = _circles(graph)
    assert not circles, "import circles (lazy imports included): " + "; ".join(" -> ".join(c) for c in circles)


def test_the_circle_check_finds_a_lazy_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c", "a"]]
