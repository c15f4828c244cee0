"""Where a run computes: the device a user named, and how many CPU threads a model of a given width should use.

Threads: torch starts one intra-op thread per core. For a narrow model each matmul is too small to split
usefully, and on a machine where other processes hold cores the threads wait on each other at every op:
on a shared 2-core CPU the tiny default (width 128) took 12.6 s per step with 2 threads against 1.2 s with
1, and a 2-layer Llama at width 896 (a 0.5B model's) 27-28 s against 11-29 s (docs/finetune.md, "CPU threads"). So
below SMALL_MODEL_WIDTH we use one thread unless the user says otherwise (--threads, or OMP_NUM_THREADS,
which torch itself honours); wider models, unmeasured here, keep torch's default.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import torch

# Hidden widths below this train on one intra-op thread by default: the tiny default (128) and 0.5B-class
# models (896) were measured no slower, usually much faster, on one thread of a shared 2-core CPU.
SMALL_MODEL_WIDTH = 1024


def model_width(model) -> Optional[int]:
    """The hidden width of a transformers model (hidden_size, or GPT-2's n_embd); None when it has no config."""
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        width = getattr(config, attr, None)
        if isinstance(width, int):
            return width
    return None


def choose_threads(width: Optional[int], requested: Optional[int] = None,
                   env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """Intra-op threads for a CPU run, or None to leave torch's setting alone.

    requested (--threads) wins; then OMP_NUM_THREADS (torch has applied it already: leave it); then one thread
    for a model narrower than SMALL_MODEL_WIDTH; otherwise torch's default (one per core).
    """
    env = os.environ if env is None else env
    if requested:
        return requested
    if env.get("OMP_NUM_THREADS"):
        return None
    if width is not None and width < SMALL_MODEL_WIDTH:
        return 1
    return None


def resolve_device(spec: str, training: bool = False) -> torch.device:
    """torch.device(spec), checked to be usable here (to train on, with training=True); a ValueError that says
    why not."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec!r}: not a device name torch knows (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":  # tensors without data: shapes are traced, nothing is computed
        raise ValueError(f"--device {spec!r}: meta is not a training device (its tensors hold no data); "
                         "use cpu or cuda")
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"--device {spec!r}: {device.type} is not available on this machine "
                         f"(torch {torch.__version__}); use --device cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {spec!r}: this machine has {count} {device.type} device(s)")
    return device
