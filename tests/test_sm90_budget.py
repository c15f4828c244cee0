"""Every autotune config the kernels keep fits an H100 (sm_90): no register spills, at most 227 KB of shared memory.

The interpreter runs one small config and never compiles, so a config that spills or cannot launch on a GPU is
invisible to the rest of the suite. tools/sm90_budget.py calls each launcher at the headline shapes (M=8192,
K->N in 4096->4096, 4096->14336, 14336->4096, r=16, bf16, fp32 adapters, p=0.1; the MoE experts' grouped kernels
at Qwen3-30B-A3B's and gpt-oss-20b's projections) with meta tensors, binds the kernel to those arguments as
Triton's launcher does (runtime specialization), and compiles the configs the autotuner keeps after its
prune_configs_by, with Triton's frontend and ptxas for sm_90 (nothing runs, no GPU).

CI checks the subset `--subset ci` (a few heavy variants, the widest kept tile of each); the full matrix, every
kept config of every variant, is `python tools/sm90_budget.py --check` (minutes; docs/benchmarks.md holds its
table).
"""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile and run the kernels")
def test_kept_configs_fit_sm90_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "sm90_budget.py"), "--subset", "ci",
                           "--check", "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| lora_", "| grouped_lora_"))]
    kernels = {line.split("|")[1].strip() for line in rows}
    assert kernels == {"lora_shrink", "lora_linear_fwd", "lora_dy_b", "lora_linear_bwd_dx", "grouped_lora_shrink",
                       "grouped_lora_gemm", "grouped_lora_grad"}, proc.stdout
    assert not any("**no**" in line for line in rows), proc.stdout


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dense_weight_past_int32_offsets_is_refused(fan_in_fan_out):
    """The GEMM kernels address a dense W tile with int32 offsets: a weight spanning 2**31 elements or more is
    refused with a ValueError before any launch, instead of wrapping around (meta tensors: nothing allocated)."""
    from lora_kernels.ops.layout import rows_of
    from lora_kernels.ops.lora_linear_bwd_dx import lora_linear_bwd_dx
    from lora_kernels.ops.lora_linear_fwd import lora_linear_fwd

    meta = dict(device="meta", dtype=torch.float32)
    N, K, M, r = 2**16 + 16, 2**15, 4, 8  # N·K past 2**31
    w = torch.empty(K, N, **meta).t() if fan_in_fan_out else torch.empty(N, K, **meta)
    x, dy = torch.empty(M, K, **meta), torch.empty(M, N, **meta)
    xa, A, B = torch.empty(M, r, **meta), torch.empty(r, K, **meta), torch.empty(N, r, **meta)
    with pytest.raises(ValueError, match="int32 offsets"):
        lora_linear_fwd(x, rows_of(x), w, None, xa, B, 1.0, "ieee", "fused")
    with pytest.raises(ValueError, match="int32 offsets"):
        lora_linear_bwd_dx(dy, rows_of(dy), w, xa, A, x, rows_of(x), torch.empty(1, dtype=torch.int64, device="meta"),
                           1.0, 0.0, compute_dx=True, compute_grad_a=False, dot_precision="ieee")


def _kept_tiles(prune, configs, ptr, dtype=torch.bfloat16, **flags):
    """(tile sizes, warps, stages) of the configs a kernel's prune_configs_by keeps for a launch with these
    constexpr flags, its activations of `dtype` (meta: only the dtype is read)."""
    named = {ptr: torch.empty(0, dtype=dtype, device="meta")}
    return {(tuple(c.kwargs.values()), c.num_warps, c.num_stages)
            for c in prune["early_config_prune"](configs, named, **flags)}


def test_prune_drops_the_tiles_that_spilled_with_the_gpu_images_triton(monkeypatch):
    """The GPU image pairs torch 2.11 with triton 3.6, whose ptxas spilled four configs that triton 3.9 keeps
    just within 255 registers (python tools/sm90_budget.py --check under triton 3.6, every subset). The CI
    compile check runs triton 3.9 and its widest tiles only, so the prune rules that drop them are pinned here."""
    pytest.importorskip("triton")
    from lora_kernels.ops import configs as C

    monkeypatch.setattr(C, "interpreting", lambda: False)
    fwd, fwd_prune = C.gemm_configs("BLOCK_N", "BLOCK_K"), C.gemm_prune("BLOCK_N", "BLOCK_K")
    wide_w4 = ((128, 128, 64, 8), 4, 4)   # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M; 4 warps
    assert wide_w4 in _kept_tiles(fwd_prune, fwd, "x_ptr")   # one adapter, fused GEMM: 250 registers, no spill
    assert wide_w4 not in _kept_tiles(fwd_prune, fwd, "x_ptr", SEGMENTED=True)      # 4 adapters: 16 B
    assert wide_w4 not in _kept_tiles(fwd_prune, fwd, "x_ptr", BASE_IN_Y=True)      # split GEMM: 12 B
    assert ((128, 256, 64, 8), 8, 3) in _kept_tiles(fwd_prune, fwd, "x_ptr", SEGMENTED=True)

    shrink, shrink_prune = C.grouped_rowblock_configs("BLOCK_K"), C.grouped_rowblock_prune("BLOCK_K")
    assert ((256,), 4, 3) in _kept_tiles(shrink_prune, shrink, "x_ptr", BLOCK_M=16)
    assert ((256,), 4, 3) not in _kept_tiles(shrink_prune, shrink, "x_ptr", BLOCK_M=16, HAS_DROPOUT=True)  # 4 B

    gemm, gemm_prune = C.grouped_gemm_configs(), C.grouped_gemm_prune()
    fma = {((bc, br), w, s) for bc, br, w, s in C.FMA_DOT_TILES}
    for heavy in (False, True):   # fp32 without TF32: 128 x 32 x 32 on 4 warps spilled 16 B with dropout
        kept = _kept_tiles(gemm_prune, gemm, "a_ptr", torch.float32, BLOCK_M=128, HAS_DROPOUT=heavy,
                           DOT_PRECISION="ieee")
        assert kept & fma and all(w == 8 for _, w, _ in kept)
    bf16 = _kept_tiles(gemm_prune, gemm, "a_ptr", BLOCK_M=128, DOT_PRECISION="tf32")
    assert bf16 and not bf16 & fma   # the FMA tiles are tried for fp32 without TF32 only
