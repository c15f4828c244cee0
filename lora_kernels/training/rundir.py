"""A run's output directory: is it usable, does it hold a previous run, and clearing one on request.

A new run in a used directory must not silently delete the old run's checkpoints, metrics and adapter:
the caller either resumes it or asks for it to be replaced (--overwrite / TrainConfig.overwrite).
"""
from __future__ import annotations

import os
import shutil
import uuid
from typing import Iterable, List

from .checkpoint import CHECKPOINT_DIR
from .metrics import METRICS_FILE, PLOT_FILE

# What a run writes at the top of its output directory (the adapter's two files are PEFT's names).
RUN_OUTPUTS = (CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE, "adapter_config.json", "adapter_model.safetensors")


def check_writable(output_dir: str) -> None:
    """Create output_dir if needed and prove a file can be written there; ValueError naming it otherwise.

    A probe file rather than os.access: access() says yes to root on a read-only filesystem."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output-dir {output_dir!r} exists and is not a directory")
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{uuid.uuid4().hex[:8]}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--output-dir {output_dir!r} is not writable ({err.strerror or err})") from None


def previous_run(output_dir: str, extra: Iterable[str] = ()) -> List[str]:
    """The names of a previous run's outputs present in output_dir (an empty checkpoints/ does not count)."""
    found = []
    for name in (*RUN_OUTPUTS, *extra):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.listdir(path):
            continue
        if os.path.lexists(path):
            found.append(name)
    return found


def refuse_or_clear(output_dir: str, overwrite: bool, extra: Iterable[str] = (), clear: bool = True) -> None:
    """For a new (not resumed) run: ValueError if output_dir holds a previous run, unless overwrite, which
    deletes exactly those outputs (nothing else the user keeps there). clear=False: check only (every rank
    checks, so all raise together; one deletes)."""
    found = previous_run(output_dir, extra)
    if not found or (overwrite and not clear):
        return
    if not overwrite:
        raise ValueError(f"--output-dir {output_dir!r} holds a previous run ({', '.join(found)}): continue it "
                         "with --resume, or pass --overwrite to replace it")
    for name in found:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
