"""Autotune configs: Hopper/Ampere-sized tiles on a GPU, one small tile under the interpreter; the autotuner's
hooks, and the pinned config of deterministic mode."""
import inspect

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


def output_hooks(zero=(), restore=()):
    """(pre_hook, post_hook) for triton.autotune: what a benchmark run changes is put back, and nothing else.

    zero and restore hold (argument, flag) pairs: the argument is zeroed before each run (accumulated with
    atomics), or copied before and written back after it (updated in place), only in launches whose constexpr
    `flag` is true, the flag under which the kernel writes that argument. Where the flag is false the launcher
    passes a stand-in (often a view of a live tensor: dyB, xa) that no hook may touch, and on the fused GEMM
    path, which overwrites its output, no copy of the output is made. After benchmarking Triton calls
    pre_hook(reset_only=True) once more before the real launch: outputs zeroed again, nothing copied.
    """
    saved = {}

    def pre_hook(nargs, reset_only=False):
        for name, flag in zero:
            if nargs[flag]:
                nargs[name].zero_()
        if not reset_only:
            saved.clear()
            saved.update({name: nargs[name].clone() for name, flag in restore if nargs[flag]})

    def post_hook(nargs, exception):
        for name, value in saved.items():
            nargs[name].copy_(value)
        saved.clear()

    return pre_hook, post_hook


def autotune(configs, key, zero=(), restore=(), **kwargs):
    """triton.autotune with output_hooks(zero, restore), and tuning results cached on disk across processes
    where this Triton supports it (cache_results, Triton >= 3.4; Triton skips it under the interpreter)."""
    pre_hook, post_hook = output_hooks(zero, restore)
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=key, pre_hook=pre_hook, post_hook=post_hook, **kwargs)


# Deterministic mode (torch.use_deterministic_algorithms): grad_A / grad_B are summed in partial buffers, one
# slot per row block of a launch, DETERMINISTIC_SLOTS slots at most; rows past DETERMINISTIC_SLOTS·BLOCK_M run in
# further launches (waves) that add to the same slots in launch order, and torch sums the slots. The grouping is
# a function of M alone (pinned BLOCK_M, fixed slot count), and the partials take at most DETERMINISTIC_SLOTS ×
# (adapters × r × K) (grad_A) or × (adapters × N × r) (grad_B) float32 values, whatever M is.
DETERMINISTIC_SLOTS = 128


def pinned_config(kernel):
    """The one config deterministic mode launches `kernel` with, chosen without timing: the smallest tile (the
    fewest registers and the least shared memory, so every build keeps it)."""
    def size(cfg):
        tile = 1
        for name, value in cfg.kwargs.items():
            tile *= value if name.startswith("BLOCK_") else 1
        return tile, cfg.num_stages, cfg.num_warps
    return min(kernel.configs, key=size)


def row_waves(M: int, block_m: int, deterministic: bool):
    """(slots, [(first row, end row) of each launch]): one launch over all M rows, or deterministic mode's
    waves of at most DETERMINISTIC_SLOTS row blocks."""
    if not deterministic:
        return 1, [(0, M)]
    slots = min(triton.cdiv(M, block_m), DETERMINISTIC_SLOTS)
    wave = slots * block_m
    return slots, [(row0, min(M, row0 + wave)) for row0 in range(0, M, wave)]
