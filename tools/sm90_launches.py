"""What tools/sm90_budget.py compiles: each op's launcher called at the headline shapes on meta tensors, its kernel
launches recorded instead of run (no GPU), for each variant (dtype, weight format, adapters, dropout, GEMM path,
MoE experts layout). sm90_budget.py binds and compiles what is recorded here.
"""
import contextlib
import os
import sys
from typing import List, NamedTuple

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from lora_kernels.backends.triton_experts import _lora_a_strides, _lora_bt_strides, _weight_strides  # noqa: E402
from lora_kernels.ops.expert_tiles import expert_tiles, tile_block_m  # noqa: E402
from lora_kernels.ops.format_4bit import QuantizedWeight  # noqa: E402
from lora_kernels.ops.grouped_lora_gemm import grouped_lora_gemm  # noqa: E402
from lora_kernels.ops.grouped_lora_grad import grouped_lora_grad  # noqa: E402
from lora_kernels.ops.grouped_lora_shrink import grouped_lora_shrink  # noqa: E402
from lora_kernels.ops.layout import rows_of  # noqa: E402
from lora_kernels.ops.lora_dy_b import lora_dy_b  # noqa: E402
from lora_kernels.ops.lora_linear_bwd_dx import lora_linear_bwd_dx  # noqa: E402
from lora_kernels.ops.lora_linear_fwd import lora_linear_fwd  # noqa: E402
from lora_kernels.ops.lora_shrink import lora_shrink  # noqa: E402
from lora_kernels.ops.segments import adapter_table  # noqa: E402

M, R, P = 8192, 16, 0.1
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N): in -> out features
N_ADAPTERS = 4
META = torch.device("meta")


class Launch(NamedTuple):
    """One intercepted kernel launch: the kernel (autotuned or plain) and the arguments its launcher passed."""
    kernel: object
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def intercepted(launches: List[Launch]):
    """Record kernel launches instead of running them (meta tensors, no GPU)."""
    def autotuned(self, *args, **kwargs):
        launches.append(Launch(self, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}))

    def plain(self, *args, **kwargs):
        launches.append(Launch(self, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}))

    saved = Autotuner.run, JITFunction.run
    Autotuner.run, JITFunction.run = autotuned, plain
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run = saved


# --- the headline tensors, on the meta device ------------------------------------------------------------------

def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device=META)


def _nf4(N, K):
    """A (N, K) NF4 weight with double quantization, bitsandbytes' default blocksizes (64, 256)."""
    blocks = N * K // 64
    return QuantizedWeight(packed=_t(N * K // 2, 1, dtype=torch.uint8), absmax=_t(blocks, dtype=torch.uint8),
                           quant_type="nf4", blocksize=64, shape=(N, K),
                           nested_absmax=_t(triton.cdiv(blocks, 256), dtype=torch.float32),
                           nested_code=_t(256, dtype=torch.float32), offset=_t(dtype=torch.float32),
                           nested_blocksize=256)


def _adapters(p):
    """A mixed batch over N_ADAPTERS adapters of rank R (segmented kernels)."""
    return adapter_table(_t(M, dtype=torch.int32), _t(M, dtype=torch.int32), [R] * N_ADAPTERS,
                         [2.0] * N_ADAPTERS, [p] * N_ADAPTERS)


class Variant(NamedTuple):
    name: str
    dtype: torch.dtype = torch.bfloat16
    precision: str = "tf32"      # the launchers' dot_precision: "ieee" is fp32 with TF32 off
    weight: str = "dense"        # dense | nf4 | fan_in_fan_out (W stored (in, out), as GPT-2's Conv1D)
    segmented: bool = False
    p: float = P
    gemm: str = "fused"
    grads: str = "all"           # bwd: all | dx (frozen adapter) | grad_a (first layer: x needs no gradient)
    experts: str = ""            # the MoE experts' grouped kernels at EXPERT_SHAPES[experts], not the dense ones
    expert_rows: int = 256       # rows per expert (the tile table's BLOCK_M follows: 256 -> 128, 16 -> 16)


def _weight(v: Variant, N, K):
    if v.weight == "nf4":
        return _nf4(N, K)
    if v.weight == "fan_in_fan_out":
        return _t(K, N, dtype=v.dtype).t()
    return _t(N, K, dtype=v.dtype)


def launch_fwd(v: Variant, K, N):
    """Forward: the shrink (xa) and the GEMM with the LoRA epilogue."""
    x = _t(M, K, dtype=v.dtype)
    seg = _adapters(v.p) if v.segmented else None
    A = _t(N_ADAPTERS, R, K, dtype=torch.float32) if seg else _t(R, K, dtype=torch.float32)
    B = _t(N_ADAPTERS, N, R, dtype=torch.float32) if seg else _t(N, R, dtype=torch.float32)
    seed = _t(1, dtype=torch.int64)
    xa = lora_shrink(x, rows_of(x), A, seed, v.p, v.precision, adapters=seg)
    lora_linear_fwd(x, rows_of(x), _weight(v, N, K), None, xa, B, 2.0, v.precision, v.gemm, adapters=seg)


def launch_bwd(v: Variant, K, N):
    """Backward: dyB / grad_B, then grad_x / grad_A."""
    x, dy = _t(M, K, dtype=v.dtype), _t(M, N, dtype=v.dtype)
    seg = _adapters(v.p) if v.segmented else None
    A = _t(N_ADAPTERS, R, K, dtype=torch.float32) if seg else _t(R, K, dtype=torch.float32)
    B = _t(N_ADAPTERS, N, R, dtype=torch.float32) if seg else _t(N, R, dtype=torch.float32)
    xa, seed = _t(M, R, dtype=torch.float32), _t(1, dtype=torch.int64)
    need_x, need_a = v.grads in ("all", "dx"), v.grads in ("all", "grad_a")
    dyb, _ = lora_dy_b(dy, rows_of(dy), B, xa, 2.0, compute_dyb=True, compute_grad_b=v.grads != "dx",
                       dot_precision=v.precision, adapters=seg)
    lora_linear_bwd_dx(dy, rows_of(dy), _weight(v, N, K), dyb, A, x, rows_of(x), seed, 2.0, v.p, compute_dx=need_x,
                       compute_grad_a=need_a, dot_precision=v.precision, gemm=v.gemm, adapters=seg)


# MoE experts: Qwen3-30B-A3B's layer (E=128, top-8, H=2048, I=768: gate_up 2048 -> 1536, down 768 -> 2048, 4096
# tokens) and gpt-oss-20b's projections (H = I = 2880: 2880 -> 5760, 2880 -> 2880; transposed (E, in, out), biases).
EXPERTS_E = 128  # 4096 tokens x top-8 = 256 rows per expert
EXPERT_SHAPES = {"qwen3": [(2048, 1536, False), (768, 2048, False)],
                 "gpt-oss": [(2880, 5760, True), (2880, 2880, True)]}  # (in, out, transposed + bias)


def launch_experts(v: Variant, K, N, transposed):
    """One grouped projection forward and backward, rows spread evenly over the experts."""
    counts = [v.expert_rows] * EXPERTS_E
    tiles = expert_tiles(counts, tile_block_m(counts), META)
    x, dy = _t(sum(counts), K, dtype=v.dtype), _t(sum(counts), N, dtype=v.dtype)
    w = _t(EXPERTS_E, K, N, dtype=v.dtype) if transposed else _t(EXPERTS_E, N, K, dtype=v.dtype)
    bias = _t(EXPERTS_E, N, dtype=v.dtype) if transposed else None
    A, B = _t(R * EXPERTS_E, K, dtype=torch.float32), _t(N, R * EXPERTS_E, dtype=torch.float32)
    seed, a_s, bt_s = _t(1, dtype=torch.int64), _lora_a_strides(A, R), _lora_bt_strides(B, EXPERTS_E)
    xa = grouped_lora_shrink(x, tiles, A, a_s, R, seed, v.p, v.precision)
    grouped_lora_gemm(x, tiles, w, _weight_strides(w, transposed, False), bias, (xa, B, bt_s, R), 2.0, seed, 0.0, N,
                      v.precision, v.gemm)
    dyb = grouped_lora_shrink(dy, tiles, B, bt_s, R, seed, 0.0, v.precision)
    grouped_lora_gemm(dy, tiles, w, _weight_strides(w, transposed, True), None, (dyb, A, a_s, R), 2.0, seed, v.p, K,
                      v.precision, v.gemm)
    grouped_lora_grad(dyb, x, tiles, A, a_s, 2.0, seed, v.p, v.precision)
    grouped_lora_grad(xa, dy, tiles, B, bt_s, 2.0, seed, 0.0, v.precision)


FP32_TF32 = dict(dtype=torch.float32, precision="tf32")
FP32_IEEE = dict(dtype=torch.float32, precision="ieee")
VARIANTS = [
    Variant("dense"),
    Variant("dense p=0", p=0.0),
    Variant("fan_in_fan_out", weight="fan_in_fan_out"),
    Variant("nf4 double quant", weight="nf4"),
    Variant("4 adapters", segmented=True),
    Variant("fp32 TF32", **FP32_TF32),
    Variant("fp32 TF32 off", **FP32_IEEE),
    Variant("experts", experts="qwen3"),
    Variant("experts gpt-oss", experts="gpt-oss"),
    Variant("experts 16 rows each", experts="qwen3", expert_rows=16),
    Variant("experts fp32 TF32 off", experts="qwen3", **FP32_IEEE),
]
# --subset extra: the other paths the launchers take (each is minutes of compiling on a small machine). Several
# adapters over a 4-bit W is no path: fused_multi_lora_linear refuses a 4-bit weight.
EXTRA_VARIANTS = [
    Variant("dense split GEMM", gemm="split"),
    Variant("experts split GEMM", experts="qwen3", gemm="split"),  # grouped_mm's base, the kernel's k-loop skipped
    Variant("frozen adapter (dx only)", grads="dx"),
    Variant("first layer (grad_A only)", grads="grad_a"),
]
# What tests/test_sm90_budget.py checks in CI (--subset ci): the widest kept config of these kernels in these
# variants (the backward's headline case, the 4-bit GEMMs, the segmented and fp32 skinny kernels).
CI_KERNELS = {
    "dense": ("lora_linear_fwd", "lora_linear_bwd_dx", "lora_shrink", "lora_dy_b"),
    "nf4 double quant": ("lora_linear_fwd", "lora_linear_bwd_dx"),
    "4 adapters": ("lora_shrink", "lora_dy_b"),
    "fp32 TF32 off": ("lora_shrink", "lora_dy_b"),
    "experts": ("grouped_lora_gemm", "grouped_lora_shrink", "grouped_lora_grad"),
}
# Variants the forward kernels do not distinguish (no gradients there): only the backward is compiled for them.
BWD_ONLY = ("frozen adapter (dx only)", "first layer (grad_A only)")
