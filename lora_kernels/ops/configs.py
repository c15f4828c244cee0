"""Autotune configs: Hopper/Ampere-sized tiles on a GPU, one small tile under the interpreter."""
import triton

from ..settings import interpreting


def gemm_configs(out_block: str, reduce_block: str):
    """For the two GEMM-shaped kernels: forward y (output cols BLOCK_N, reduction BLOCK_K) and backward
    grad_x (output cols BLOCK_K, reduction BLOCK_N). Tiles are given as (rows, output cols, reduction)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, out_block: 32, reduce_block: 32, "GROUP_M": 4}, num_warps=4)]
    shapes = [
        # BM, B_out, B_red, warps, stages
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 5),
    ]
    return [
        triton.Config({"BLOCK_M": bm, out_block: bo, reduce_block: br, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bo, br, w, s in shapes
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


def min_block_m(kernel) -> int:
    """The smallest BLOCK_M among an autotuned kernel's configs: sizes per-row-block partial buffers so they
    fit whichever config the autotuner picks."""
    return min(cfg.kwargs["BLOCK_M"] for cfg in kernel.configs)
