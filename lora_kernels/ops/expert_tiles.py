"""MoE experts: which rows of the sorted token–expert pairs each program of a grouped launch owns.

The pairs arrive sorted by expert, so expert e's rows are one run [offsets[e], offsets[e+1]). The row-tiled
kernels (grouped_lora_shrink, grouped_lora_gemm) take a tile table: one entry per BLOCK_M-row tile of a run,
(expert, first row, end row), tiles never spanning two experts. Their grid is (tiles, column blocks), so its
size follows the rows (at most S / BLOCK_M + experts hit tiles) and not E; an expert without rows has no tile.
BLOCK_M is fixed per table (chosen from the rows per expert hit, not autotuned), which is what lets one table
serve every row-tiled launch of a forward and backward: both projections (gate_up, down), their shrinks and
dy·B. The per-expert gradient kernel (grouped_lora_grad) reads the run offsets and the list of experts hit
instead (one program per expert hit and column block).
"""
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from ..settings import interpreting
from .transfer import host_to_device


class ExpertTiles(NamedTuple):
    """One forward's tile table and run offsets, on the device of the rows."""
    table: torch.Tensor    # (tiles, 3) int32: expert, first row, end row (exclusive) of each tile
    offsets: torch.Tensor  # (E + 1,) int32: expert e's rows are offsets[e] .. offsets[e + 1] - 1
    hit: torch.Tensor      # (experts hit,) int32: the experts that have rows, in order
    block_m: int
    num_tiles: int
    routed: int            # sum of the counts: rows past it (pairs routed to no local expert) are in no tile


def tile_block_m(counts: Sequence[int]) -> int:
    """BLOCK_M of a forward's tile table: the power of two (16..128) nearest above the mean rows per expert hit,
    so a few-token expert does not pad a 128-row tile, and a busy one is not cut into 16-row slivers. Under
    the interpreter 16 (the small tile every interpreted config uses)."""
    hit = [c for c in counts if c]
    if interpreting() or not hit:
        return 16
    return max(16, min(128, triton.next_power_of_2(-(-sum(hit) // len(hit)))))


def expert_tiles(counts: Sequence[int], block_m: int, device) -> ExpertTiles:
    """The table for rows grouped by expert with `counts` rows each (host ints), built on the host from them
    (no device sync) and copied once."""
    counts_t = torch.tensor(list(counts), dtype=torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    torch.cumsum(counts_t, 0, out=offsets[1:])
    per_expert = (counts_t + block_m - 1) // block_m
    expert = torch.repeat_interleave(torch.arange(len(counts)), per_expert)
    # the tile's index within its expert's run
    within = torch.arange(len(expert)) - torch.repeat_interleave(torch.cumsum(per_expert, 0) - per_expert,
                                                                 per_expert)
    start = offsets[expert] + within * block_m
    end = torch.minimum(start + block_m, offsets[expert + 1])
    table = torch.stack([expert, start, end], dim=1).to(torch.int32)
    hit = torch.nonzero(counts_t).reshape(-1).to(torch.int32)
    n, E = table.shape[0], len(counts)
    # one copy for the three
    flat = host_to_device(torch.cat([table.reshape(-1), offsets.to(torch.int32), hit]), device)
    return ExpertTiles(flat[:3 * n].view(n, 3), flat[3 * n:3 * n + E + 1], flat[3 * n + E + 1:], block_m, n,
                       int(offsets[-1]))


@triton.jit
def tile_rows(table_ptr, BLOCK_M: tl.constexpr):
    """(expert as int64, rows, row mask) of this program's tile (program_id(0))."""
    entry = table_ptr + tl.program_id(0) * 3
    expert = tl.load(entry).to(tl.int64)
    start = tl.load(entry + 1)
    end = tl.load(entry + 2)
    rows = start + tl.arange(0, BLOCK_M)
    return expert, rows, rows < end
