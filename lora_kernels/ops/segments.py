"""Multi-adapter (segmented) LoRA: what the kernels read about which adapter each row uses.

In a mixed batch every logical row m of x has an adapter a(m) in 0..n-1 of the layer, or -1 (base only).
The layer's adapters arrive stacked and zero-padded to the largest rank: A (n, r_max, K), B (n, N, r_max).

Row tiles walk the rows sorted by adapter (SGMV-style grouping). The order is a permutation of the logical
rows, a stable sort by the model's adapter index with base-only rows first, built once per forward from the
per-sample list (functional.AdapterSegments.row_order) and shared by every layer: a layer's own slot numbering
keeps the model's order, so the sorted order groups its slots too (rows of an adapter it lacks become a run
of base-only rows). Tile position i holds logical row order[i]; every M-indexed tensor (x, y, dy, dx, xa,
dyB) stays in logical order and is read and written through the permutation (`logical_rows`), and the
dropout mask stays a function of (seed, logical row, column). The four LoRA kernels take a SEGMENTED
constexpr; with it, a program that owns a row tile

    - maps its positions to logical rows through the order,
    - loads the tile's adapter ids (one int32 per row) and takes first..last of the ids present,
    - loops over those adapters, skipping ids absent from the tile, and multiplies only the rows of adapter
      a with A[a] / B[a] (row masks; other rows read as 0), up to a's own rank (padding chunks are skipped),
    - reads its scaling, dropout threshold and 1/(1-p) from per-adapter tables.

Sorted, a tile spans a contiguous run of adapter ids: one iteration inside an adapter's run, one more for
each boundary between runs inside the tile, so a launch's row tiles do at most (row tiles + adapters - 1)
adapter iterations between them (per column block), whatever order the batch's rows come in (a decode batch
of one-token samples in random order included; in batch order that could be row tiles × adapters). Adapters
with fewer rows than a tile still share tiles: many adapters of a few rows each keep a long loop per tile. One launch serves all adapters, and the autotuned tiles, the grouped tile order and the
base GEMM are the single-adapter kernels' (the GEMM's row loads and stores are gathered and scattered
through the order, whole rows at a time).
"""
from typing import Dict, NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .dropout import drop_threshold
from .transfer import capturing, host_to_device

# Larger than any adapter id: the "first id" of a tile whose rows are all base-only (the adapter loop is empty).
_NO_ADAPTER = tl.constexpr(2**31 - 1)


class AdapterTable(NamedTuple):
    """The per-row ids and per-adapter constants of one segmented call, on the device of x."""
    row_adapter: torch.Tensor   # (M,) int32: adapter slot of each logical row, -1 for base-only rows
    row_order: torch.Tensor     # (M,) int32: the logical rows sorted by adapter; tile position i holds row_order[i]
    rank: torch.Tensor          # (n,) int32: each adapter's own rank (<= r_max); rank chunks past it are skipped
    scaling: torch.Tensor       # (n,) float32
    threshold: torch.Tensor     # (n,) int32: drop_threshold(p_a), 0 for p_a = 0 (every element kept)
    keep_scale: torch.Tensor    # (n,) float32: 1 / (1 - p_a)
    has_dropout: bool           # any p_a > 0: the kernels generate the Philox mask at all


# Scalings, ranks and dropout rates are fixed per adapter: their device copies are cached so a forward pays no
# host-to-device copy per layer once the model's few distinct combinations have been seen.
_CONSTANTS: Dict[tuple, tuple] = {}
_MAX_CACHED = 256


def _filled(device: torch.device, values):
    """The constants written by fill kernels, one per value, without host memory: inside a CUDA graph capture
    the graph replays the fills, where a tensor cached during capture would hold nothing until the first replay
    (kernels are recorded, not run) and a pageable copy is not allowed."""
    out = []
    for vals, dtype in values:
        t = torch.empty(len(vals), dtype=dtype, device=device)
        for i, v in enumerate(vals):
            t.narrow(0, i, 1).fill_(v)
        out.append(t)
    return tuple(out)


def adapter_table(row_adapter: torch.Tensor, row_order: torch.Tensor, ranks: Sequence[int],
                  scalings: Sequence[float], dropout_ps: Sequence[float]) -> AdapterTable:
    device = row_adapter.device
    ranks, scalings, ps = tuple(int(r) for r in ranks), tuple(float(s) for s in scalings), \
        tuple(float(p) for p in dropout_ps)
    key = (str(device), ranks, scalings, ps)
    values = ((ranks, torch.int32), (scalings, torch.float32), ([drop_threshold(p) for p in ps], torch.int32),
              ([1.0 / (1.0 - p) for p in ps], torch.float32))
    constants = _CONSTANTS.get(key)
    if constants is None and capturing(device):
        # First seen inside a capture: built for the graph only. One seen before (the usual warm-up step before
        # capture) comes from the cache, made eagerly.
        constants = _filled(device, values)
    elif constants is None:
        if len(_CONSTANTS) >= _MAX_CACHED:
            _CONSTANTS.clear()
        constants = _CONSTANTS[key] = tuple(host_to_device(torch.tensor(v, dtype=dt), device) for v, dt in values)
    rank, scaling, threshold, keep_scale = constants
    return AdapterTable(row_adapter, row_order, rank, scaling, threshold, keep_scale, any(p > 0.0 for p in ps))


@triton.jit
def logical_rows(order_ptr, pos, pos_ok):
    """The logical rows at sorted positions `pos` of a tile (0 where out of range: those are masked anyway)."""
    return tl.load(order_ptr + pos, mask=pos_ok, other=0)


@triton.jit
def tile_adapters(aid_ptr, rm, row_ok):
    """(adapter id of each row of the tile, -1 for base-only and out-of-range rows; first id; last id).
    `for a in range(first, last + 1)` is empty when no row of the tile has an adapter."""
    aid = tl.load(aid_ptr + rm, mask=row_ok, other=-1)
    first = tl.min(tl.where(aid >= 0, aid, _NO_ADAPTER), axis=0)
    last = tl.max(aid, axis=0)
    return aid, first, last


@triton.jit
def any_row(sel):
    """True when the boolean row mask `sel` selects at least one row (skips ids between first and last that
    the tile does not use)."""
    return tl.max(sel.to(tl.int32), axis=0) > 0
