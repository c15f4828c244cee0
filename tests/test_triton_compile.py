"""The Triton kernels compile for an H100 (sm_90) here, on a CPU, without a GPU.

The interpreter runs a kernel's body as Python, so it accepts code Triton's compiler rejects (a Python
conditional on a traced value, a dtype passed where a tensor is expected, a loop bound it cannot type). This
compiles the most-featured variant of each kernel (several adapters, 4-bit W with double quantization,
dropout, every gradient), the dense GEMMs, the MoE experts' grouped kernels and the dequantization kernel
through Triton's own frontend and ptxas for sm_90, in a subprocess without TRITON_INTERPRET (under the
interpreter `triton.jit` gives interpreted functions, which the compiler cannot take). Nothing runs: launching
needs a GPU.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lora_kernels.ops import (dequant_4bit, dora_linear_bwd_dx, dora_linear_fwd, grouped_lora_gemm,
                                  grouped_lora_grad, grouped_lora_shrink, lora_dy_b, lora_linear_bwd_dx,
                                  lora_linear_fwd, lora_shrink)

    # Pointer element types as the launchers pass them: bf16 activations, float32 adapters and buffers, a
    # packed uint8 W, int32 adapter tables, an int64 seed; with double quantization the absmax are uint8 codes.
    POINTERS = {"x_ptr": "*bf16", "y_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", "bias_ptr": "*bf16",
                "out_ptr": "*bf16", "w_ptr": "*u8", "packed_ptr": "*u8", "aid_ptr": "*i32", "order_ptr": "*i32",
                "rank_ptr": "*i32", "threshold_ptr": "*i32", "seed_ptr": "*i64", "table_ptr": "*i32",
                "offsets_ptr": "*i32", "hit_ptr": "*i32"}
    DQ_ABSMAX = {"q_absmax_ptr": "*u8", "absmax_ptr": "*u8"}
    DENSE_W = {"w_ptr": "*bf16"}
    FLOATS = ("scaling", "keep_scale")
    Q = dict(W_4BIT=True, Q_BLOCK=64, Q_BLOCK2=256, Q_DOUBLE=True, Q_ALIGNED=True)
    DENSE = dict(W_4BIT=False, Q_BLOCK=1, Q_BLOCK2=1, Q_DOUBLE=False, Q_ALIGNED=False)
    SEG = dict(SEGMENTED=True, DOT_PRECISION="ieee")
    ONE = dict(SEGMENTED=False, DOT_PRECISION="tf32")
    FWD = dict(HAS_BIAS=True, BLOCK_R=16, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    BWD = dict(COMPUTE_DX=True, COMPUTE_GRAD_A=True, HAS_DROPOUT=True, BLOCK_R=16, BLOCK_M=64, BLOCK_N=64,
               BLOCK_K=64, GROUP_M=8)
    # (label, kernel, constexprs, pointer types beyond POINTERS): the most-featured variant of each kernel, and
    # the dense single-adapter GEMMs on both paths.
    CASES = [
        ("lora_linear_fwd 4-bit double quant, several adapters", lora_linear_fwd._lora_linear_fwd_kernel,
         dict(BASE_IN_Y=False, **FWD, **Q, **SEG), DQ_ABSMAX),
        ("lora_linear_fwd dense, split path", lora_linear_fwd._lora_linear_fwd_kernel,
         dict(BASE_IN_Y=True, **FWD, **DENSE, **ONE), DENSE_W),
        ("lora_linear_bwd_dx 4-bit double quant, several adapters", lora_linear_bwd_dx._lora_linear_bwd_dx_kernel,
         dict(BASE_IN_DX=False, DETERMINISTIC=False, **BWD, **Q, **SEG), DQ_ABSMAX),
        ("lora_linear_bwd_dx dense, deterministic", lora_linear_bwd_dx._lora_linear_bwd_dx_kernel,
         dict(BASE_IN_DX=False, DETERMINISTIC=True, **BWD, **DENSE, **ONE), DENSE_W),
        ("lora_dy_b several adapters, deterministic", lora_dy_b._lora_dy_b_kernel,
         dict(COMPUTE_DYB=True, COMPUTE_GRAD_B=True, DETERMINISTIC=True, BLOCK_M=64, BLOCK_N=64, BLOCK_R=16, **SEG),
         {}),
        ("lora_shrink several adapters, dropout", lora_shrink._lora_shrink_kernel,
         dict(HAS_DROPOUT=True, BLOCK_M=64, BLOCK_K=64, BLOCK_R=16, **SEG), {}),
        ("dequant_4bit double quant", dequant_4bit._dequant_4bit_kernel,
         dict(BLOCKSIZE=64, BLOCKSIZE2=256, DOUBLE_QUANT=True, BLOCK=1024), DQ_ABSMAX),
        ("dequant_4bit", dequant_4bit._dequant_4bit_kernel,
         dict(BLOCKSIZE=64, BLOCKSIZE2=1, DOUBLE_QUANT=False, BLOCK=1024), {}),
        ("dora_linear_fwd dropout (two MMAs per k-step)", dora_linear_fwd._dora_linear_fwd_kernel,
         dict(DROPOUT=True, DOT_PRECISION="tf32", **FWD, **DENSE), {**DENSE_W, "v_ptr": "*bf16"}),
        ("dora_linear_fwd without dropout", dora_linear_fwd._dora_linear_fwd_kernel,
         dict(DROPOUT=False, DOT_PRECISION="tf32", **FWD, **DENSE), {**DENSE_W, "v_ptr": "*bf16"}),
        ("dora_linear_fwd 4-bit double quant, dropout", dora_linear_fwd._dora_linear_fwd_kernel,
         dict(DROPOUT=True, DOT_PRECISION="tf32", **FWD, **Q), {**DQ_ABSMAX, "v_ptr": "*bf16"}),
        ("dora_linear_fwd 4-bit, blocks across rows", dora_linear_fwd._dora_linear_fwd_kernel,
         dict(DROPOUT=False, DOT_PRECISION="tf32", **FWD, **dict(Q, Q_DOUBLE=False, Q_ALIGNED=False)),
         {"v_ptr": "*bf16"}),
        ("dora_linear_bwd_dx (two MMAs per n-step)", dora_linear_bwd_dx._dora_bwd_dx_kernel,
         dict(DOT_PRECISION="tf32", BLOCK_R=16, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, GROUP_M=8, **DENSE), DENSE_W),
        ("dora_linear_bwd_dx 4-bit double quant", dora_linear_bwd_dx._dora_bwd_dx_kernel,
         dict(DOT_PRECISION="tf32", BLOCK_R=16, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, GROUP_M=8, **Q), DQ_ABSMAX),
        # MoE experts: the grouped kernels (tile table, strided expert slices), with dropout and a bias.
        ("grouped_lora_gemm dropout, bias (MoE experts)", grouped_lora_gemm._grouped_lora_gemm_kernel,
         dict(HAS_BIAS=True, HAS_DROPOUT=True, BASE_IN_OUT=False, DOT_PRECISION="tf32", BLOCK_R=16, BLOCK_M=64,
              BLOCK_C=64, BLOCK_RED=64), {**DENSE_W, "a_ptr": "*bf16"}),
        ("grouped_lora_gemm split: base from grouped_mm, dropout, bias (MoE experts)",
         grouped_lora_gemm._grouped_lora_gemm_kernel,
         dict(HAS_BIAS=True, HAS_DROPOUT=True, BASE_IN_OUT=True, DOT_PRECISION="tf32", BLOCK_R=16, BLOCK_M=64,
              BLOCK_C=64, BLOCK_RED=64), {**DENSE_W, "a_ptr": "*bf16"}),
        ("grouped_lora_shrink dropout (MoE experts)", grouped_lora_shrink._grouped_lora_shrink_kernel,
         dict(HAS_DROPOUT=True, DOT_PRECISION="tf32", BLOCK_M=64, BLOCK_K=64, BLOCK_R=16), {"out_ptr": "*fp32"}),
        ("grouped_lora_grad dropout (MoE experts)", grouped_lora_grad._grouped_lora_grad_kernel,
         dict(HAS_DROPOUT=True, DOT_PRECISION="tf32", BLOCK_M=64, BLOCK_C=64, BLOCK_R=16),
         {"out_ptr": "*fp32", "d_ptr": "*bf16"}),
    ]
    failed = 0
    for name, kernel, constexprs, pointers in CASES:
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # the JITFunction itself
        signature = {}
        for arg, param in zip(fn.arg_names, fn.params):
            if param.is_constexpr:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = {**POINTERS, **pointers}.get(arg, "*fp32")
            else:
                signature[arg] = "fp32" if arg in FLOATS else "i32"
        try:
            # enable_fp_fusion=False: what launch_options asks for a double-quantized W (harmless elsewhere)
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False})
            assert ".target sm_90" in compiled.asm["ptx"]
            print(f"compiled: {name}")
        except Exception as err:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAILED {name}: {type(err).__name__}: {err}")
    sys.exit(1 if failed else 0)
''')


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and run by the gpu tests")
def test_kernels_compile_for_sm90_without_a_gpu():
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("compiled: ") == 18, proc.stdout
