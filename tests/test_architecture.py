"""The layering of docs/architecture.md, checked: each part of the package imports only the parts below it.

Data flows one way: module → functional (dispatch) → backends (autograd, custom ops) → ops (kernels).
A new import that breaks the order fails here with the file, the import and what that part may use.
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "lora_kernels"

# part -> the parts it may import (itself always allowed). A part is a top-level module or subpackage.
ALLOWED = {
    "settings": set(),
    "timing": set(),
    "reference": set(),
    "names": set(),
    "patterns": set(),
    "config": {"patterns"},
    "ops": {"settings"},
    "backends": {"settings", "timing", "ops", "_cuda"},  # _cuda: the compiled csrc/ extension, when built
    "functional": {"backends"},
    "layer": {"config", "functional", "layer_4bit", "names"},  # layer_4bit: from_linear hands a 4-bit base to its sibling
    "layer_4bit": {"functional", "layer"},
    # inject -> integrations: inject_lora on a transformers model that is already imported installs the adapter-only
    # checkpoint hooks (a lazy, conditional import; the integration never loads transformers for anyone else).
    "inject": {"config", "layer", "integrations", "patterns"},
    "trainability": {"inject"},
    "persistence": {"config", "inject", "layer"},
    "adapters": {"functional", "inject", "layer"},
    "data": set(),
    "models": {"data"},
    # training -> adapters, inject: multi.py trains several adapters in mixed batches (batch_adapters) and clips
    # each adapter's parameters on their own.
    "training": {"data", "adapters", "inject"},
    "integrations": {"config", "functional", "inject", "layer", "persistence", "training"},
    "parity_check": {"backends", "functional", "reference"},
    "layer_bench": {"backends", "layer", "timing"},
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
