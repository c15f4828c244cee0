"""Autotune configs: Hopper/Ampere-sized tiles on a GPU, one small tile under the interpreter."""
import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gemm_configs():
    """For the two GEMM-shaped kernels (forward y, backward grad_x)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    shapes = [
        # BM, BN, BK, warps, stages
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 5),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def rowblock_configs(col_block: str):
    """For the skinny kernels that stream a row block against r columns (shrink, dy·B)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, col_block: 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, col_block: bc}, num_warps=w, num_stages=s)
        for bm, bc, w, s in [(64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3), (32, 256, 4, 3), (64, 64, 4, 4)]
    ]


def lora_block_r(r: int) -> int:
    """Tile width over the rank dim: tl.dot wants >= 16; ranks above 64 are looped in 64-wide chunks."""
    return max(16, min(64, triton.next_power_of_2(r)))
