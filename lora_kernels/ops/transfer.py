"""Small host-to-device copies the launches need (adapter ids, row order, per-adapter constants), made so they
neither stall the host nor break a CUDA graph capture. Plain PyTorch, no Triton (functional.py uses it)."""
from typing import Optional

import torch


def host_to_device(t: torch.Tensor, device, keep_alive: Optional[list] = None) -> torch.Tensor:
    """A small host tensor on `device`. To CUDA it is copied from pinned memory with non_blocking=True: the host
    does not wait for the copy (from pageable memory it would), and a CUDA graph can capture it. A captured copy
    re-reads its pinned source at every replay: the caller that may be captured keeps it in `keep_alive`."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    pinned = t.pin_memory()
    if keep_alive is not None:
        keep_alive.append(pinned)
    return pinned.to(device, non_blocking=True)


def capturing(device: torch.device) -> bool:
    """True inside a CUDA graph capture on the current stream (kernels are recorded there, not run)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
