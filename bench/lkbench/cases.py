"""The benchmark grids: which (shape, M, r, dropout, dtype, adapter dtype) combinations run.

Grids, chosen with LORA_BENCH_GRID (or a script's --grid); the default is `headline` on a CUDA
machine and `smoke` without one, so a CPU run never tries a 4096-wide GEMM under the interpreter.

    smoke     tiny shapes that the Triton interpreter runs in well under a second (CPU CI)
    headline  the target cases: K→N 4096→4096, 4096→14336, 14336→4096 at M=8192, r=16,
              bf16, dropout 0 and 0.1, adapters in PEFT's default fp32 and in bf16
    full      every Llama-7B/8B/70B projection shape × M {2048, 8192, 16384} × r {8, 16, 64}
              × dropout {0, 0.1} × {bf16, fp16}, adapters fp32; ordered so the cases closest to
              the headline run first (a time budget that cuts the run short keeps the useful ones)

LORA_BENCH_MATCH (a regex searched in the case name) narrows any grid.
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import torch

from . import HAS_CUDA

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRIDS = ("smoke", "headline", "full")


@dataclass(frozen=True)
class Shape:
    """One projection: `name` says where it comes from, K = in_features, N = out_features."""
    name: str
    K: int
    N: int


# Deduplicated by (K, N); the name is the first model that has the shape (see the comments for others).
LLAMA_SHAPES = [
    Shape("7b.q_proj", 4096, 4096),       # Llama-2-7B q/k/v/o, Llama-3-8B q/o
    Shape("7b.up_proj", 4096, 11008),     # Llama-2-7B gate/up
    Shape("7b.down_proj", 11008, 4096),   # Llama-2-7B down
    Shape("8b.k_proj", 4096, 1024),       # Llama-3-8B k/v (grouped-query attention)
    Shape("8b.up_proj", 4096, 14336),     # Llama-3-8B gate/up
    Shape("8b.down_proj", 14336, 4096),   # Llama-3-8B down
    Shape("70b.q_proj", 8192, 8192),      # Llama-3-70B q/o
    Shape("70b.k_proj", 8192, 1024),      # Llama-3-70B k/v
    Shape("70b.up_proj", 8192, 28672),    # Llama-3-70B gate/up
    Shape("70b.down_proj", 28672, 8192),  # Llama-3-70B down
]
HEADLINE_SHAPES = [s for s in LLAMA_SHAPES if (s.K, s.N) in {(4096, 4096), (4096, 14336), (14336, 4096)}]
# Not multiples of any block size, so the smoke run goes through the kernels' edge masks too.
SMOKE_SHAPES = [Shape("tiny", 48, 40)]


@dataclass(frozen=True)
class Case:
    shape: Shape
    M: int
    r: int
    dropout: float
    dtype: str          # activation and base-weight dtype: a key of DTYPES
    adapter_dtype: str  # "fp32" (PEFT's default for a half-precision base) or the activation dtype

    @property
    def K(self) -> int:
        return self.shape.K

    @property
    def N(self) -> int:
        return self.shape.N

    @property
    def lora_alpha(self) -> int:
        # alpha = 2r, the common choice (r=16, alpha=32): scaling 2 in every case.
        return 2 * self.r

    @property
    def name(self) -> str:
        return f"{self.shape.name}/M{self.M}/r{self.r}/p{self.dropout:g}/{self.dtype}/A{self.adapter_dtype}"

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def torch_adapter_dtype(self) -> torch.dtype:
        return DTYPES[self.adapter_dtype]

    def fields(self) -> dict:
        """The case's identity as it appears in a results file."""
        return {"name": self.name, "shape": self.shape.name, "M": self.M, "K": self.K, "N": self.N, "r": self.r,
                "lora_alpha": self.lora_alpha, "dropout": self.dropout, "dtype": self.dtype,
                "adapter_dtype": self.adapter_dtype}


def _smoke() -> List[Case]:
    s = SMOKE_SHAPES[0]
    # fp32 and fp16 only: the interpreter cannot run bfloat16 tl.dot (DESIGN.md), bf16 is GPU-only.
    # PEFT's default mix (half-precision x, fp32 adapters) with dropout, and plain fp32 without.
    return [Case(s, 32, 4, 0.0, "fp32", "fp32"),
            Case(s, 32, 4, 0.1, "fp16", "fp32")]


def _headline() -> List[Case]:
    return [Case(s, 8192, 16, p, "bf16", a)
            for a in ("fp32", "bf16") for p in (0.1, 0.0) for s in HEADLINE_SHAPES]


def _full() -> List[Case]:
    cases = [Case(s, M, r, p, dt, "fp32")
             for s, M, r, p, dt in itertools.product(LLAMA_SHAPES, (2048, 8192, 16384), (8, 16, 64), (0.1, 0.0),
                                                     ("bf16", "fp16"))]
    order = {s: i for i, s in enumerate(LLAMA_SHAPES)}
    # Closest to the headline first: bf16, M=8192, r=16, p=0.1, then everything else.
    return sorted(cases, key=lambda c: (c.dtype != "bf16", c.M != 8192, c.r != 16, c.dropout != 0.1,
                                        c.M, c.r, order[c.shape]))


def default_grid() -> str:
    return os.environ.get("LORA_BENCH_GRID") or ("headline" if HAS_CUDA else "smoke")


def select(grid: Optional[str] = None, match: Optional[str] = None, require_cuda: bool = True) -> List[Case]:
    """The cases of `grid` whose name matches the regex `match` (default: LORA_BENCH_MATCH).

    require_cuda=False lists a GPU grid on a CPU, for checking a script's arguments without running them."""
    grid = grid or default_grid()
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r} is not one of {', '.join(GRIDS)}")
    if grid != "smoke" and require_cuda and not HAS_CUDA:
        raise RuntimeError(f"grid={grid!r} needs a CUDA GPU; on CPU use the smoke grid")
    cases = {"smoke": _smoke, "headline": _headline, "full": _full}[grid]()
    match = match if match is not None else os.environ.get("LORA_BENCH_MATCH")
    if match:
        pattern = re.compile(match)
        cases = [c for c in cases if pattern.search(c.name)]
    return cases
