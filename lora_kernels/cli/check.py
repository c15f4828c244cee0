"""`lora-kernels check`: the kernels against the float64 reference on this machine."""
from __future__ import annotations

import os
import sys

from .common import DTYPES, CLIError

def cmd_check(args) -> int:
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton picks its interpreter when it is first imported (triton.language's own jit helpers are
        # decorated then), and importing lora_kernels has already imported it: re-run in a child process.
        import subprocess

        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "lora_kernels.cli", "check", *args.argv], env=env)
    from ..parity_check import check_parity, check_parity_4bit, check_parity_dora

    from ..backends import resolve_backend

    os.environ["LORA_KERNELS_BACKEND"] = args.backend
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = args.dtype or (list(DTYPES) if device.type == "cuda" else ["float32", "float16"])
    for dtype in dtypes:  # a backend that cannot run a dtype here says so before anything runs
        try:
            resolve_backend(torch.empty(1, 1, device=device, dtype=getattr(torch, dtype)))
        except (ValueError, RuntimeError) as err:
            raise CLIError(f"--backend {args.backend} --dtype {dtype}: {str(err).splitlines()[0]}") from None
    results = check_parity(dtypes, device)
    print("fused forward/backward vs the float64 reference; error = max |fused - reference| / max(max |reference|, 1)")
    _print_parity(results)
    backends_4bit = None if args.backend == "auto" else [args.backend]
    try:  # a 4-bit W on every backend with 4-bit kernels (or the one asked for), vs bnb's own dequantization
        results_4bit = check_parity_4bit(dtypes, device, backends_4bit)
    except ImportError as err:
        print(f"4-bit (QLoRA) cases skipped: bitsandbytes cannot be imported ({err}); pip install bitsandbytes")
        results_4bit = None
    if results_4bit:
        print("4-bit (QLoRA) base: the reference's W is bitsandbytes' dequantization of the packed weight")
        _print_parity(results_4bit)
    results += results_4bit or []
    results_dora = check_parity_dora(dtypes, device, four_bit=results_4bit is not None, backends_4bit=backends_4bit)
    print("DoRA (use_dora=True): PEFT's DoRA formula in float64, also grad_m (the magnitude); a 4-bit W as above")
    _print_parity(results_dora)
    results += results_dora
    failed = not all(res.ok for res in results)
    interp = " (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    print(("FAILED: errors above tolerance" if failed else "OK: all within tolerance") + interp)
    return 1 if failed else 0


def _print_parity(results) -> None:
    for res in results:
        errors = "; ".join(f"{name} {err:.2e}{'' if err < res.tol else ' FAIL'}" for name, err in res.errors.items())
        print(f"backend={res.backend} device={res.device} dtype={res.dtype}{res.label} shape=(M={res.M}, K={res.K}, "
              f"N={res.N}, r={res.r}{', bias' if res.bias else ''}): {errors} (tolerance {res.tol:.0e})")



def add_parser(sub, fmt) -> None:
    """The check subcommand and its flags."""
    c = sub.add_parser("check", formatter_class=fmt, help="compare the kernels with the reference on this machine",
                       description="Run the fused forward and backward on small odd shapes and compare y, grad_x, "
                       "grad_A, grad_B with the float64 reference; then the same with a 4-bit (QLoRA) base: NF4 and "
                       "FP4, double quant on and off, two blocksizes, with and without dropout, on every backend with "
                       "4-bit kernels that runs here (needs bitsandbytes; the reference uses its dequantized W); then "
                       "DoRA (fused_dora_linear: y and the gradients of x, A, B and the magnitude) on a dense and a "
                       "4-bit W, with and without dropout. "
                       "Without a GPU the Triton kernels run under Triton's interpreter (slow but real). Exit status 1 "
                       "if any error exceeds its tolerance.")
    c.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto",
                   help="LORA_KERNELS_BACKEND for the check (auto: Triton on GPU and under the interpreter; the "
                   "4-bit cases run on every backend with 4-bit kernels)")
    c.add_argument("--dtype", action="append", choices=DTYPES,
                   help="dtype to check (repeatable); default fp32+fp16 on CPU, plus bf16 on GPU")
    c.set_defaults(func=cmd_check)
