"""The one rule for adapter names, for the library and the command line alike.

An adapter's name becomes a folder (save_adapters writes adapter NAME to DIR/NAME, the CLI to OUTPUT_DIR/NAME), a
ParameterDict key and part of parameter names, so it holds only letters, digits, '_' and '-': no path
separator, no '.', nothing that could name a folder outside the one it is saved in. "__base__" is PEFT's name
for base-model rows in a mixed batch.
"""
from __future__ import annotations

import re

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
BASE_ROWS = "__base__"
RULE = "only letters, digits, '_' and '-'"


def adapter_name_problem(name) -> str:
    """Why `name` is not a valid adapter name, or "" when it is."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if not ADAPTER_NAME.fullmatch(name):
        return f"may hold {RULE} (it names a folder and parameters)"
    if name == BASE_ROWS:
        return "'__base__' is PEFT's name for base-model rows"
    return ""


def check_adapter_name(name) -> str:
    """`name`, or a ValueError naming it and the rule."""
    problem = adapter_name_problem(name)
    if problem:
        raise ValueError(f"adapter_name {name!r}: {problem}")
    return name
