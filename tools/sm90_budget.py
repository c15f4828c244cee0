"""Registers, spills and shared memory of every autotune config the LoRA kernels keep, compiled for an H100.

Nothing runs and no GPU is needed: each op's launcher is called at the headline shapes (M=8192, K->N in
4096->4096, 4096->14336, 14336->4096, r=16, bf16 activations, fp32 adapters, p=0.1) with meta tensors and its
kernel launch is intercepted (tools/sm90_launches.py: the variants and their launches); for each config the
autotuner keeps (after its prune_configs_by) the kernel is bound to those arguments exactly as Triton's launcher
binds them (runtime specialization: integers divisible by 16, pointers aligned, ones folded), compiled with
Triton's frontend for sm_90 and assembled by ptxas, whose report gives registers and spills; shared memory is
Triton's allocation (what a launch asks for).

    python tools/sm90_budget.py              # Markdown table of every kernel, variant and kept config
    python tools/sm90_budget.py --subset ci  # the subset tests/test_sm90_budget.py checks (widest kept tiles)
    python tools/sm90_budget.py --check      # exit 1 if any kept config spills or passes 227 KB

The three headline shapes specialize identically (every dimension is a multiple of 16), so each
(variant, config) is compiled once. Triton's disk cache (~/.triton/cache) makes reruns fast; the ptxas report is
cached beside it, keyed by the kernel's hash. Runs without TRITON_INTERPRET (set, triton.jit gives interpreted
functions the compiler cannot take).
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/sm90_budget.py compiles kernels: run it without TRITON_INTERPRET=1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from sm90_launches import (BWD_ONLY, CI_KERNELS, EXPERT_SHAPES, EXTRA_VARIANTS, SHAPES, VARIANTS,  # noqa: E402
                           Launch, intercepted, launch_bwd, launch_experts, launch_fwd)

SM90 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # 227 KB: the most dynamic shared memory one CTA may opt into on sm_90


class Stats(NamedTuple):
    regs: int
    spill_stores: int
    spill_loads: int
    shared: int

    @property
    def ok(self) -> bool:
        return self.regs >= 0 and self.spill_stores == 0 and self.spill_loads == 0 and self.shared <= SMEM_LIMIT


def kernel_name(kernel) -> str:
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn.fn.__name__.strip("_").removesuffix("_kernel")


def jit_fn(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def kept_configs(launch: Launch) -> List[triton.Config]:
    """The configs the autotuner would time for this launch (its prune_configs_by applied); a plain kernel's one."""
    if not isinstance(launch.kernel, Autotuner):
        return [triton.Config({}, num_warps=launch.kwargs.get("num_warps", 4),
                              num_stages=launch.kwargs.get("num_stages", 3))]
    tuner = launch.kernel
    tuner.nargs = dict(zip(tuner.arg_names, launch.args))
    try:
        return tuner.prune_configs(launch.kwargs) if len(tuner.configs) > 1 else list(tuner.configs)
    finally:
        tuner.nargs = None


_BACKEND = None


def compile_source(launch: Launch, config: triton.Config):
    """(ASTSource, options) exactly as JITFunction.run builds them for these arguments, for sm_90."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = make_backend(SM90)
    fn = jit_fn(launch.kernel)
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    binder = create_function_from_signature(fn.signature, fn.params, _BACKEND)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(_BACKEND, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


_PTXAS_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _cache_dir() -> str:
    base = knobs.cache.dir or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    path = os.path.join(base, "sm90_budget")
    os.makedirs(path, exist_ok=True)
    return path


def _ptxas_report(ptx: str, fp_fusion: bool) -> str:
    """ptxas -v for the PTX, with the flags Triton's make_cubin uses (when Triton's cache skipped ptxas)."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(90).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.o")]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def measure(launch: Launch, config: triton.Config) -> Stats:
    src, options = compile_source(launch, config)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v when it runs ptxas (not on a cache hit)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=SM90, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = False
    stats_file = os.path.join(_cache_dir(), compiled.hash + ".json")
    report = log.getvalue()
    if not _PTXAS_LINE.search(report):
        if os.path.exists(stats_file):
            with open(stats_file) as f:
                return Stats(**json.load(f))
        report = _ptxas_report(compiled.asm["ptx"], options.enable_fp_fusion)
    spills = _PTXAS_LINE.search(report)
    stats = Stats(int(_REGS.search(report).group(1)), int(spills.group(1)), int(spills.group(2)),
                  compiled.metadata.shared)
    with open(stats_file, "w") as f:
        json.dump(stats._asdict(), f)
    return stats


def config_label(launch: Launch, config: triton.Config) -> str:
    """The config's tiles (with the grouped kernels' BLOCK_M, which comes with the launch), warps, stages."""
    kw = {**launch.kwargs, **config.kwargs}
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK_RED")
    tiles = "x".join(str(kw[k]) for k in keys if k in kw)
    return f"{tiles} w{config.num_warps} s{config.num_stages}" if tiles else f"w{config.num_warps}"


class Row(NamedTuple):
    kernel: str
    variant: str
    config: str
    stats: Stats  # None: pruned by the autotuner's prune_configs_by, not compiled


def launches(variants) -> List[tuple]:
    """[(launch, names of the variants that launch it)]: each distinct kernel specialization the variants launch
    over the three headline shapes, once (e.g. the shrink is the same kernel for a dense and a 4-bit W)."""
    found: Dict[tuple, tuple] = {}
    backend = make_backend(SM90)
    for variant in variants:
        for shape in EXPERT_SHAPES[variant.experts] if variant.experts else SHAPES:
            captured: List[Launch] = []
            with intercepted(captured):
                if variant.experts:
                    launch_experts(variant, *shape)
                else:
                    if variant.name not in BWD_ONLY:
                        launch_fwd(variant, *shape)
                    launch_bwd(variant, *shape)
            for launch in captured:
                fn = jit_fn(launch.kernel)
                binder = create_function_from_signature(fn.signature, fn.params, backend)
                first = launch.kernel.configs[0].all_kwargs() if isinstance(launch.kernel, Autotuner) else {}
                _, spec, _ = binder(*launch.args, **launch.kwargs, **first)
                key = (fn.fn.__name__, str(spec))
                launch0, names = found.get(key, (launch, []))
                if variant.name not in names:
                    names.append(variant.name)
                found[key] = (launch0, names)
    return list(found.values())


def widest(configs: List[triton.Config]) -> List[triton.Config]:
    """The config with the most tile elements per thread (the register-heaviest), the larger tile on a tie."""
    def size(c):
        tile = 1
        for k, v in c.kwargs.items():
            if k.startswith("BLOCK_"):
                tile *= v
        return tile / c.num_warps, tile
    return [max(configs, key=size)]


def budget(variants=VARIANTS, kernels=None, log=None, only_widest=False) -> List[Row]:
    rows = []
    for launch, names in launches(variants):
        name = kernel_name(launch.kernel)
        if kernels and name not in kernels:
            continue
        if only_widest and not any(name in CI_KERNELS.get(v, ()) for v in names):
            continue
        configs = kept_configs(launch)
        if not only_widest and isinstance(launch.kernel, Autotuner):
            for config in launch.kernel.configs:
                if config not in configs:
                    rows.append(Row(name, ", ".join(names), config_label(launch, config), None))
        for config in widest(configs) if only_widest else configs:
            start = time.time()
            try:
                stats = measure(launch, config)
            except Exception as err:  # noqa: BLE001 - a config that does not compile is over any budget
                print(f"{name} | {', '.join(names)} | {config_label(launch, config)} | does not compile: "
                      f"{type(err).__name__}: {str(err)[:2000]}", file=sys.stderr, flush=True)
                stats = Stats(-1, -1, -1, -1)
            rows.append(Row(name, ", ".join(names), config_label(launch, config), stats))
            if log:
                print(f"{name} | {rows[-1].variant} | {rows[-1].config} | {stats} | {time.time() - start:.1f}s",
                      file=log, flush=True)
    return rows


def markdown(rows: List[Row]) -> str:
    lines = ["| kernel | variant | config (BM x BN x BK or BM x BC x BRED, warps, stages) | registers | spill stores / loads (B) "
             "| shared memory (B) | within budget |",
             "|---|---|---|---:|---:|---:|---|"]
    for row in rows:
        s = row.stats
        if s is None:
            lines.append(f"| {row.kernel} | {row.variant} | {row.config} | – | – | – | pruned |")
            continue
        if s.regs < 0:
            lines.append(f"| {row.kernel} | {row.variant} | {row.config} | – | – | – | **does not compile** |")
            continue
        lines.append(f"| {row.kernel} | {row.variant} | {row.config} | {s.regs} | {s.spill_stores} / {s.spill_loads} "
                     f"| {s.shared} | {'yes' if s.ok else '**no**'} |")
    kept = [r for r in rows if r.stats is not None]
    bad = [r for r in kept if not r.stats.ok]
    lines.append("")
    lines.append(f"{len(kept)} kept configs compiled ({len(rows) - len(kept)} pruned), {len(bad)} over budget "
                 f"(spills > 0 or shared memory > "
                 f"{SMEM_LIMIT} B).")
    return "\n".join(lines)


DOC = os.path.join(REPO, "docs", "benchmarks.md")
BEGIN, END = "<!-- sm90_budget: begin (generated) -->", "<!-- sm90_budget: end -->"


def write_doc(table: str, command: str) -> None:
    """Replace the generated block of docs/benchmarks.md (between BEGIN and END) with this table."""
    with open(DOC) as f:
        text = f.read()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = (f"{BEGIN}\nGenerated by `{command.replace(' --write-doc', '')}` (triton {triton.__version__}, "
             f"ptxas for sm_90; no GPU): do not edit by hand.\n\n{table}\n{END}")
    with open(DOC, "w") as f:
        f.write(head + block + tail)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=("all", "ci", "extra"), default="all",
                        help="all: every kept config of the main variants; ci: the widest kept config of the CI "
                             "variants; extra: the split GEMMs (dense, experts), grad_x only, grad_A only")
    parser.add_argument("--kernel", action="append", help="only this kernel (lora_linear_fwd, lora_shrink, ...)")
    parser.add_argument("--variant", action="append", help="only this variant (see VARIANTS)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any kept config is over budget")
    parser.add_argument("--write-doc", action="store_true",
                        help="also put the table into docs/benchmarks.md, between its sm90_budget markers")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    variants = {"all": VARIANTS, "extra": EXTRA_VARIANTS,
                "ci": [v for v in VARIANTS if v.name in CI_KERNELS]}[args.subset]
    if args.variant:
        variants = [v for v in VARIANTS + EXTRA_VARIANTS if v.name in args.variant]
    start = time.time()
    rows = budget(variants, args.kernel, log=None if args.quiet else sys.stderr, only_widest=args.subset == "ci")
    table = markdown(rows)
    print(table)
    if args.write_doc:
        write_doc(table, " ".join(["python tools/sm90_budget.py", *(argv if argv is not None else sys.argv[1:])]))
    print(f"\nCompiled with triton {triton.__version__} for sm_90 in {time.time() - start:.0f} s.", file=sys.stderr)
    if args.check and any(r.stats is not None and not r.stats.ok for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
