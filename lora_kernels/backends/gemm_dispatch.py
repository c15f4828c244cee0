"""Which path runs the base GEMM on the Triton backend, chosen per shape: fused or split.

    fused  the Triton GEMM with the LoRA term folded into its epilogue (ops/lora_linear_fwd.py for y,
           ops/lora_linear_bwd_dx.py for grad_x): the output is written once.
    split  torch's matmul (cuBLAS on a GPU) writes the base product, then the same Triton kernel, without
           its k-loop, adds the LoRA term (and bias) in place: one more read and write of the output,
           but the GEMM is cuBLAS's.

MoE experts (backends/triton_experts.py) choose the same way between ops/grouped_lora_gemm.py with and without
its reduction loop, torch's grouped_mm writing the base product for the split path (passes "experts_fwd",
"experts_bwd"; the key also holds E).

The base GEMM is about 98 % of a LoRA layer's FLOPs, so whichever GEMM is faster for a shape decides the
layer's speed, and neither wins everywhere. LORA_KERNELS_GEMM = auto (default) | fused | split.

auto measures both paths the first time a shape key is seen (GemmKey: pass, device, dtype, M rounded up to
a power of two, K, N, r, bias / dropout / grad_A), on the real operands, with CUDA events, and keeps the
faster for the rest of the process, as Triton's autotuner does for tile sizes; `gemm_choices()` lists what
was chosen.
auto takes fused without measuring where a measurement would mean nothing or do harm:
  - off CUDA (the CPU under TRITON_INTERPRET=1): interpreter timings say nothing about a GPU;
  - while a CUDA graph is being captured (timing synchronises); a key measured before capture keeps its choice;
  - under torch.use_deterministic_algorithms(True): the two paths round differently, and a timing-based
    choice could differ between two runs.
"""
import logging
from typing import Callable, Dict, NamedTuple, Tuple

import torch

from ..settings import GEMM_PATHS, requested_gemm
from ..timing import Timer

# First calls compile and autotune the kernels (and warm cuBLAS's heuristics): never timed.
WARMUP = 2
REPS = 5


class GemmKey(NamedTuple):
    """What a choice is made for: one pass of one layer shape. Row counts share a choice within a power of two."""
    pass_name: str      # "fwd" (y = x·Wᵀ + ...) or "bwd" (grad_x = dy·W + ...); "experts_fwd" / "experts_bwd"
    device: str
    dtype: str
    m_bucket: int       # the row count rounded up to a power of two
    in_features: int    # K
    out_features: int   # N
    r: int
    flags: str          # what else changes the kernel: "bias" (fwd), "dropout" and "grad_A" (bwd), comma-joined
    experts: int = 0    # E of an experts pass (its rows are the routed token–expert pairs), else 0

    def describe(self) -> str:
        return (f"{self.pass_name} {self.dtype} " + (f"E{self.experts} " if self.experts else "")
                + f"M<={self.m_bucket} {self.in_features}->{self.out_features} r{self.r}"
                + (f" {self.flags}" if self.flags else ""))


def gemm_key(pass_name: str, x: "torch.Tensor", rows: int, in_features: int, out_features: int, r: int,
             experts: int = 0, **flags: bool) -> GemmKey:
    m_bucket = 1 << max(rows - 1, 0).bit_length()
    return GemmKey(pass_name, str(x.device), str(x.dtype).replace("torch.", ""), m_bucket, in_features,
                   out_features, r, ",".join(name for name, on in flags.items() if on), experts)


_log = logging.getLogger(__name__)
_chosen: Dict[GemmKey, Tuple[str, Dict[str, float]]] = {}


def measure(run: Callable[[str], object], device: torch.device) -> Dict[str, float]:
    """Median milliseconds of run(path) for each path (the timer interleaves the paths' repetitions)."""
    timer = Timer(device, WARMUP, REPS, flush_l2=False)
    stats = timer.compare({path: (lambda _, path=path: run(path), None) for path in GEMM_PATHS})
    return {path: stats[path]["median_ms"] for path in GEMM_PATHS}


def _measurable(device: torch.device) -> bool:
    if device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return False
    return not torch.cuda.is_current_stream_capturing()


def choose(key: GemmKey, device: torch.device, run: Callable[[str], object]) -> str:
    """The path for shape `key`: LORA_KERNELS_GEMM when it names one, else the cached or measured faster one.

    run(path) must compute the pass on the real operands without side effects beyond its own outputs.
    """
    requested = requested_gemm()
    if requested != "auto":
        return requested
    if key in _chosen:
        return _chosen[key][0]
    if not _measurable(device):
        return "fused"
    times = measure(run, device)
    path = min(GEMM_PATHS, key=lambda p: (times[p], p != "fused"))  # a tie keeps fused: one pass over the output
    _chosen[key] = (path, times)
    _log.info("lora_kernels: %s -> %s gemm (fused %.3f ms, split %.3f ms)", key.describe(), path, times["fused"],
              times["split"])
    return path


def gemm_choices() -> Dict[GemmKey, Tuple[str, Dict[str, float]]]:
    """{shape key: (path, {path: median ms})} for every key auto has measured in this process."""
    return dict(_chosen)


def clear_gemm_choices() -> None:
    """Forget the measured choices (e.g. after changing GPU clocks); the next call of each shape re-measures."""
    _chosen.clear()
