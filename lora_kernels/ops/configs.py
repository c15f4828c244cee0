"""Autotune configs: Hopper/Ampere-sized tiles on a GPU, one small tile under the interpreter.

Each kernel's autotuner prunes its list per launch (`prune_configs_by`) to the tiles that compile for sm_90 without
register spills and within 227 KB of shared memory for that variant (dropout, 4-bit W, fp32 without TF32):
tests/test_sm90_budget.py and tools/sm90_budget.py compile every kept config at the headline shapes and check it.
"""
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
    dropout mask, 64 (32 with fp32 activations); fp32 without TF32 (an FMA dot), 32. A 4-bit W tile spans at most
    one quantization block along K (wider ones, scaled block by block, spilled in the backward with dropout). A
    dense W's pipeline holds `num_stages` (rows + out) x reduce tiles of the activation dtype in shared memory
    (what Triton allocated for every dense config measured)."""
    def prune(configs, named_args, **kwargs):
        heavy = kwargs.get("W_4BIT") or kwargs.get("HAS_DROPOUT")  # the backward's mask and x tile
        itemsize = named_args["x_ptr"].dtype.itemsize
        limit = 32 if _fp32_ieee(named_args, kwargs) or (heavy and itemsize == 4) else 64 if heavy else 128

        def fits(c):
            kw = c.kwargs
            smem = c.num_stages * (kw["BLOCK_M"] + kw[out_block]) * kw[reduce_block] * itemsize
            if kwargs.get("W_4BIT"):
                return _per_thread(c, "BLOCK_M", out_block) <= limit and kw["BLOCK_K"] <= kwargs["Q_BLOCK"]
            if kwargs.get("SEGMENTED") and heavy and c.num_warps < 8 and kw[out_block] > 64:
                return False  # per-row thresholds and scales too: 4 warps spilled on a 128-wide tile
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


def min_block_m(kernel) -> int:
    """The smallest BLOCK_M among an autotuned kernel's configs: sizes per-row-block partial buffers so they
    fit whichever config the autotuner picks."""
    return min(cfg.kwargs["BLOCK_M"] for cfg in kernel.configs)
