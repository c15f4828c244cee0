"""`lora-kernels bench`: forward+backward time of nn.Linear, FusedLoraLinear and PEFT's LoRA Linear, one shape.

Timed with the package's one timer (timing.Timer: CUDA events and a flushed L2 on a GPU), the cases
interleaved repetition by repetition. Without a GPU the numbers only show that the code runs.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from .backends import resolve_backend
from .layers import FusedLoraLinear
from .timing import Timer

BASE, FUSED, PEFT = "base nn.Linear", "FusedLoraLinear", "PEFT LoRA Linear"
MAX_REPS = 10_000


@dataclass
class LayerBench:
    device: torch.device
    device_name: str
    dtype: torch.dtype
    tokens: int
    in_features: int
    out_features: int
    r: int
    dropout: float
    backend: str
    timer: str                  # Timer.method
    reps: int
    median_ms: Dict[str, float]  # BASE, FUSED and, when peft is installed, PEFT
    peft_installed: bool


def bench_sizes(tokens=None, in_features=None, out_features=None, dtype=None, device=None):
    """(tokens, in_features, out_features, dtype, device) with the unset ones filled in: small on CPU, LLM-sized
    on a GPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    k = in_features or (4096 if gpu else 512)
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    return tokens or (8192 if gpu else 512), k, out_features or k, dtype, device


def check_bench_memory(tokens: int, k: int, n: int, dtype, device) -> None:
    """ValueError when the tensors the bench allocates cannot fit in this device's memory (before allocating)."""
    size = torch.empty((), dtype=dtype).element_size()
    need = size * (2 * tokens * k + 3 * tokens * n + 3 * k * n)  # x and grad x; dy, y, PEFT's y; three weights
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0]
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(f"--tokens {tokens} x --in-features {k} -> {n} needs about {need / 2**30:.1f} GiB, more than "
                         f"this {device.type}'s {have / 2**30:.1f} GiB: use fewer --tokens or smaller features")


def bench_layers(tokens: Optional[int] = None, in_features: Optional[int] = None,
                 out_features: Optional[int] = None, r: int = 16, dropout: float = 0.1,
                 dtype: Optional[torch.dtype] = None, device=None, min_time: float = 0.5) -> LayerBench:
    """Median fwd+bwd milliseconds per case. Unset sizes are small on CPU and LLM-sized on a GPU; the
    repetitions are chosen so that each case runs about `min_time` seconds."""
    tokens, k, n, dtype, device = bench_sizes(tokens, in_features, out_features, dtype, device)
    gpu = device.type == "cuda"
    check_bench_memory(tokens, k, n, dtype, device)
    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
    cases = {BASE: base, FUSED: FusedLoraLinear.from_linear(base, r=r, lora_alpha=2 * r, lora_dropout=dropout)}
    try:
        from peft import LoraConfig as PeftConfig, get_peft_model

        holder = nn.Sequential(nn.Linear(k, n, bias=False, device=device, dtype=dtype))
        cases[PEFT] = get_peft_model(holder, PeftConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                        target_modules=["0"]))
    except ImportError:
        pass
    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n, device=device, dtype=dtype)

    def fwd_bwd(module: nn.Module):
        return lambda _: module(x).backward(dy)

    runs = {}
    for name, module in cases.items():
        module.train()
        runs[name] = (fwd_bwd(module), None)
    # One untimed round compiles (and autotunes) the kernels; one timed round sizes the repetitions.
    probe = Timer(device, warmup=1, reps=1, flush_l2=False).compare(runs)
    per_case_s = sum(m["median_ms"] for m in probe.values()) / len(probe) / 1e3
    reps = max(3, min(MAX_REPS, math.ceil(min_time / max(per_case_s, 1e-9))))
    timer = Timer(device, warmup=1, reps=reps)
    times = timer.compare(runs)
    return LayerBench(device=device, device_name=torch.cuda.get_device_name(device) if gpu else "cpu", dtype=dtype,
                      tokens=tokens, in_features=k, out_features=n, r=r, dropout=dropout,
                      backend=resolve_backend(x), timer=timer.method, reps=reps,
                      median_ms={name: t["median_ms"] for name, t in times.items()}, peft_installed=PEFT in cases)
