"""Autotune configs: Hopper/Ampere-sized tiles on a GPU, one small tile under the interpreter; the autotuner's
hooks, and the pinned config of deterministic mode.

Each kernel's autotuner prunes its list per launch (`prune_configs_by`) to the tiles that compile for sm_90 without
register spills and within 227 KB of shared memory for that variant (dropout, 4-bit W, fp32 without TF32):
tests/test_sm90_budget.py and tools/sm90_budget.py compile every kept config at the headline shapes and check it.
"""
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
    """For the skinny kernels that stream a row block against r columns (shrink, dy·B). The grid is one program per
    row block, so 32- and 64-row blocks are what fill an H100's 132 SMs at M = 8192 (128-row blocks give 64)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, col_block: 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, col_block: bc}, num_warps=w, num_stages=s)
        for bm, bc, w, s in [(64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3), (32, 256, 4, 3), (64, 64, 4, 4),
                             (32, 128, 4, 4)]
    ]


def _per_thread(config, rows: str, cols: str) -> int:
    """Elements of a (rows, cols) float32 tile each thread holds: the accumulator's share of the register file."""
    return config.kwargs[rows] * config.kwargs[cols] // (32 * config.num_warps)


def _fp32_ieee(named_args, kwargs) -> bool:
    """float32 activations with TF32 off: tl.dot runs as FMAs on CUDA cores, its operands held in registers."""
    return kwargs.get("DOT_PRECISION") == "ieee" and named_args["x_ptr" if "x_ptr" in named_args
                                                               else "dy_ptr"].dtype.itemsize == 4


def _kept(configs, fits):
    # The smallest tile always fits: never leave the autotuner without a config.
    return [c for c in configs if fits(c)] or configs[-1:]


SM90_SHARED_BYTES = 232448  # 227 KB: the most shared memory one program may use on an H100


def gemm_prune(out_block: str, reduce_block: str):
    """prune_configs_by for the GEMM kernels (fwd: out_block BLOCK_N, reduce_block BLOCK_K; bwd: BLOCK_K, BLOCK_N).
    Limits measured on sm_90 at the headline shapes (tools/sm90_budget.py): a plain GEMM fits up to 128 float32
    accumulator elements per thread; a W dequantized in the loop (4-bit), or the backward's LoRA prologue with its
    dropout mask, 64 (32 with fp32 activations, or both together); fp32 without TF32 (an FMA dot), 32. A 4-bit W tile spans at most
    one quantization block along K (wider ones, scaled block by block, spilled in the backward with dropout). A
    dense W's pipeline holds `num_stages` (rows + out) x reduce tiles of the activation dtype in shared memory
    (what Triton allocated for every dense config measured)."""
    def prune(configs, named_args, **kwargs):
        heavy = kwargs.get("W_4BIT") or kwargs.get("HAS_DROPOUT")  # the backward's mask and x tile
        itemsize = named_args["x_ptr"].dtype.itemsize
        # A 4-bit W with the backward's dropout prologue: 64 per thread sat at 255 registers and spilled 8 B once
        # the deterministic waves' row offset joined the kernel (tests/test_sm90_budget.py), so 32.
        both = kwargs.get("W_4BIT") and kwargs.get("HAS_DROPOUT")
        limit = 32 if _fp32_ieee(named_args, kwargs) or (heavy and itemsize == 4) or both else 64 if heavy else 128

        def fits(c):
            kw = c.kwargs
            smem = c.num_stages * (kw["BLOCK_M"] + kw[out_block]) * kw[reduce_block] * itemsize
            if kwargs.get("W_4BIT"):
                return _per_thread(c, "BLOCK_M", out_block) <= limit and kw["BLOCK_K"] <= kwargs["Q_BLOCK"]
            if c.num_warps < 8 and (kwargs.get("SEGMENTED") or kwargs.get("BASE_IN_Y")) and (
                    _per_thread(c, "BLOCK_M", out_block) > 64 or (heavy and kw[out_block] > 64)):
                # Per-row adapter index and scales (4 adapters), or the split path's y tile read back beside the
                # accumulator: with 4 warps, 128 x 128 sat at 250-255 registers with triton 3.9 and spilled
                # 12-16 B with triton 3.6. The segmented backward's 128-wide tile spilled too (thresholds).
                return False
            return _per_thread(c, "BLOCK_M", out_block) <= limit and smem <= SM90_SHARED_BYTES
        return _kept(configs, fits)
    return {"early_config_prune": prune}


def rowblock_prune(col_block: str):
    """prune_configs_by for shrink and dy·B: with fp32 and TF32 off the (BLOCK_M, col_block) operand tile is held
    in registers by the FMA dot, and more than 32 elements of it per thread spill (tools/sm90_budget.py)."""
    def prune(configs, named_args, **kwargs):
        if not _fp32_ieee(named_args, kwargs):
            return configs
        return _kept(configs, lambda c: _per_thread(c, "BLOCK_M", col_block) <= 32)
    return {"early_config_prune": prune}


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


# MoE experts (ops/grouped_lora_*.py). The row-tiled kernels take BLOCK_M from the forward's tile table
# (ops/expert_tiles.py: fixed per launch, so one table serves every launch), and autotune the rest; the
# per-expert gradient kernel tunes its row step freely. Same sm_90 limits as the dense kernels above.

def _ieee_fp32(named_args, ptr: str, kwargs) -> bool:
    return kwargs.get("DOT_PRECISION") == "ieee" and named_args[ptr].dtype.itemsize == 4


# For fp32 without TF32 only (tl.dot as FMAs, its operands in registers): 8 warps over a narrow tile. With 4 warps
# the 128 x 32 x 32 tile spilled 16 B in the backward with dropout (triton 3.6, tools/sm90_budget.py).
FMA_DOT_TILES = ((64, 32, 8, 3), (32, 32, 8, 3))


def grouped_gemm_configs():
    """(output cols BLOCK_C, reduction BLOCK_RED) for grouped_lora_gemm; BLOCK_M comes with the launch."""
    if interpreting():
        return [triton.Config({"BLOCK_C": 32, "BLOCK_RED": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_C": bc, "BLOCK_RED": br}, num_warps=w, num_stages=s)
            for bc, br, w, s in [(256, 64, 8, 3), (128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (128, 32, 4, 4),
                                 (64, 32, 4, 4), *FMA_DOT_TILES, (32, 32, 4, 4)]]


def grouped_gemm_prune():
    """As gemm_prune: 128 float32 accumulator elements per thread; 64 with the backward's dropout mask on the
    LoRA term (32 with fp32 activations); 32 for fp32 without TF32, on 8 warps only (FMA_DOT_TILES, which no other
    precision tries); the pipeline's (BLOCK_M + BLOCK_C) x BLOCK_RED tiles within 227 KB."""
    def prune(configs, named_args, **kwargs):
        itemsize = named_args["a_ptr"].dtype.itemsize
        heavy = kwargs.get("HAS_DROPOUT")
        fma = _ieee_fp32(named_args, "a_ptr", kwargs)
        limit = 32 if fma or (heavy and itemsize == 4) else 64 if heavy else 128
        bm = kwargs["BLOCK_M"]

        def fits(c):
            kw = c.kwargs
            if fma and c.num_warps < 8:
                return False
            if not fma and (kw["BLOCK_C"], kw["BLOCK_RED"], c.num_warps, c.num_stages) in FMA_DOT_TILES:
                return False
            per_thread = bm * kw["BLOCK_C"] // (32 * c.num_warps)
            return per_thread <= limit and c.num_stages * (bm + kw["BLOCK_C"]) * kw["BLOCK_RED"] * itemsize \
                <= SM90_SHARED_BYTES
        return _kept(configs, fits)
    return {"early_config_prune": prune}


def grouped_rowblock_configs(col_block: str):
    """For grouped_lora_shrink (xa and dy·B): the reduction step; BLOCK_M comes with the launch."""
    if interpreting():
        return [triton.Config({col_block: 32}, num_warps=4)]
    return [triton.Config({col_block: bc}, num_warps=w, num_stages=s)
            for bc, w, s in [(128, 4, 4), (64, 4, 4), (256, 4, 3), (128, 8, 3), (32, 4, 4)]]


def grouped_rowblock_prune(col_block: str):
    """The (BLOCK_M, col_block) activation tile within what rowblock_configs' tiles hold: 64 elements per thread
    (128 x 256 with 4 warps, 256 per thread, spilled 4 KB on sm_90 with dropout: tools/sm90_budget.py); 32 for
    fp32 without TF32, as rowblock_prune. With dropout, no 256-wide step on 4 warps: even 16 x 256 spilled 4 B
    with triton 3.6 (the mask's Philox state for 256 columns)."""
    def prune(configs, named_args, **kwargs):
        limit = 32 if _ieee_fp32(named_args, "x_ptr", kwargs) else 64

        def fits(c):
            if kwargs.get("HAS_DROPOUT") and c.num_warps < 8 and c.kwargs[col_block] > 128:
                return False
            return kwargs["BLOCK_M"] * c.kwargs[col_block] // (32 * c.num_warps) <= limit
        return _kept(configs, fits)
    return {"early_config_prune": prune}


def grouped_grad_configs():
    """For grouped_lora_grad: the row step BLOCK_M of each expert's loop and the output block BLOCK_C."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_C": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w, num_stages=s)
            for bm, bc, w, s in [(64, 128, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4), (32, 256, 8, 3), (128, 64, 8, 3),
                                 (32, 64, 4, 4)]]


def grouped_grad_prune():
    """The (BLOCK_M, BLOCK_C) operand tile: 32 elements per thread at most with the dropout mask drawn over it
    (64 x 128 with 4 warps spilled 16 B on sm_90, tools/sm90_budget.py), or with fp32 without TF32."""
    def prune(configs, named_args, **kwargs):
        if not (kwargs.get("HAS_DROPOUT") or _ieee_fp32(named_args, "d_ptr", kwargs)):
            return configs
        return _kept(configs, lambda c: _per_thread(c, "BLOCK_M", "BLOCK_C") <= 32)
    return {"early_config_prune": prune}
