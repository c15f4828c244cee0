"""Memory: peak CUDA memory of one forward+backward, and bytes saved for backward.

Saved bytes are counted with saved_tensors_hooks during the forward: every distinct storage that
autograd keeps for backward, except the parameters (W, A, B exist anyway), so x, the dropout mask,
dropped or cast copies of x and x·Aᵀ are what gets counted. Works on CPU too.
"""
from __future__ import annotations

import gc
from typing import Callable, Iterable, Optional, Tuple

import torch

MB = 2**20


def saved_bytes(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor]) -> Tuple[int, torch.Tensor]:
    """(bytes of the distinct storages autograd saves during forward(), its output)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in excluded:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(seen.values()), out


def peak_bytes(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """Peak CUDA memory allocated during step() above what was allocated before it; None off-GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def free(device: torch.device) -> None:
    """Return the last implementation's CUDA memory before the next one is measured. Off CUDA there is no peak to
    protect, and a full collection of a heap holding transformers and peft costs about half a second."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
