"""`lora-kernels bench`: base vs fused vs PEFT LoRA timing on this machine."""
from __future__ import annotations

from .common import DTYPES, CLIError, fraction, positive_float, positive_int, user_error

def cmd_bench(args) -> int:
    import torch

    from ..backends.gemm_dispatch import gemm_choices
    from ..layer_bench import BASE, FUSED, PEFT, bench_layers
    from ..training.resources import resolve_device

    from ..backends import resolve_backend
    from ..layer_bench import bench_sizes, check_bench_memory
    from ..settings import check_environment

    user_error(check_environment)
    device = str(user_error(resolve_device, args.device, training=True)) if args.device else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    sizes = bench_sizes(args.tokens, args.in_features, args.out_features, dtype, device)
    user_error(check_bench_memory, *sizes)
    try:  # an explicit backend that cannot run here (LORA_KERNELS_BACKEND=cuda without the extension) says why
        resolve_backend(torch.empty(1, sizes[1], device=sizes[4], dtype=sizes[3]))
    except (ValueError, RuntimeError) as err:
        raise CLIError(str(err).splitlines()[0]) from None
    res = bench_layers(tokens=args.tokens, in_features=args.in_features, out_features=args.out_features, r=args.r,
                       dropout=args.dropout, dtype=getattr(torch, args.dtype) if args.dtype else None,
                       device=device, min_time=args.min_time)
    if not res.peft_installed:
        print("peft is not installed: skipping the PEFT comparison (pip install peft)")
    print(f"device {res.device} ({res.device_name}), dtype {res.dtype}, x ({res.tokens}, {res.in_features}) -> "
          f"{res.out_features}, r={res.r}, dropout={res.dropout}, backend {res.backend}, "
          f"timer {res.timer}, {res.reps} reps")
    for name, ms in res.median_ms.items():
        print(f"  {name:18s} fwd+bwd {ms:9.3f} ms")
    if res.device.type == "cpu" and res.backend == "torch":
        print("  (on a CPU the fused layer runs the plain-PyTorch backend, not the Triton kernels: these numbers say "
              "nothing about GPU speed)")
    if PEFT in res.median_ms:
        print(f"  PEFT / fused = {res.median_ms[PEFT] / res.median_ms[FUSED]:.2f}x, "
              f"fused / base = {res.median_ms[FUSED] / res.median_ms[BASE]:.2f}x")
    for key, (path, ms) in gemm_choices().items():  # empty unless LORA_KERNELS_GEMM=auto measured (on a GPU)
        print(f"  GEMM path {key.describe()}: {path} (fused {ms['fused']:.3f} ms, split {ms['split']:.3f} ms)")
    return 0



def add_parser(sub, fmt) -> None:
    """The bench subcommand and its flags."""
    b = sub.add_parser("bench", formatter_class=fmt, help="time base vs fused vs PEFT LoRA on this machine",
                       description="Forward+backward timing of nn.Linear, FusedLoraLinear and PEFT's LoRA Linear on "
                       "one shape (CUDA events, L2 flushed between repetitions, on a GPU); defaults are small on "
                       "CPU, LLM-sized on GPU.")
    b.add_argument("--tokens", type=positive_int, default=None, help="rows of x (default 512 CPU, 8192 GPU)")
    b.add_argument("--in-features", type=positive_int, default=None, help="default 512 CPU, 4096 GPU")
    b.add_argument("--out-features", type=positive_int, default=None, help="default: in-features")
    b.add_argument("--r", type=positive_int, default=16, help="LoRA rank")
    b.add_argument("--dropout", type=fraction, default=0.1, help="LoRA dropout")
    b.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default bfloat16 on GPU, float32 on CPU")
    b.add_argument("--device", default=None, help="default cuda if available, else cpu")
    b.add_argument("--min-time", type=positive_float, default=0.5, help="about how many seconds each case is timed")
    b.set_defaults(func=cmd_bench)
