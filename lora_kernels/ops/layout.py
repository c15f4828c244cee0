"""Where a program's data is: rows of activations of any shape and strides (no copies), and tile order.

Kernels see an activation of shape (*lead, C) as M = prod(lead) logical rows. Leading dims that
can be merged are merged; at most two groups remain (e.g. a transposed (T, B, C) view of a (B, T, C)
tensor), and row m lives at (m // inner) * stride_outer + (m % inner) * stride_inner.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


class Rows(NamedTuple):
    M: int
    inner: int
    stride_outer: int
    stride_inner: int
    stride_col: int


def rows_of(t: torch.Tensor) -> Optional[Rows]:
    """The two-level row layout of `t`, or None when its leading dims need more than two groups."""
    groups = []
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = (groups[-1][0] * size, stride)
        else:
            groups.append((size, stride))
    if len(groups) > 2:
        return None
    M = 1
    for size, _ in groups:
        M *= size
    stride_col = t.stride(-1)
    if not groups:
        return Rows(M, 1, 0, 0, stride_col)
    if len(groups) == 1:
        return Rows(M, M, 0, groups[0][1], stride_col)
    return Rows(M, groups[1][0], groups[0][1], groups[1][1], stride_col)


def check_int32_offsets(name: str, t: torch.Tensor) -> None:
    """The GEMM kernels address a dense weight's tile with int32 offsets (row·stride + col·stride, computed per
    element in the loop): refuse a weight whose last element lies past 2**31 - 1 rather than read wrong memory."""
    last = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    if last >= 2**31:
        raise ValueError(f"{name} of shape {tuple(t.shape)} and strides {t.stride()} spans {last + 1} elements; "
                         "the Triton GEMM kernels index a dense weight with int32 offsets (at most 2**31 - 1)")


@triton.jit
def row_offsets(rows, inner, stride_outer, stride_inner):
    """int64 element offsets of logical rows `rows` (see module docstring)."""
    rows = rows.to(tl.int64)
    return (rows // inner) * stride_outer + (rows % inner) * stride_inner


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) for program `pid`, in GROUP_M-row bands so neighbours share operands in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % group_rows)
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n
