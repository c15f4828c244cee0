"""Autotune as on a GPU, under Triton's interpreter.

The interpreter build of lora_kernels/ops/configs.py gives each kernel one config, and an autotuner with one
config never benchmarks: its hooks (zeroing, restoring) never run on CPU. `enable()` gives every autotuned
kernel of lora_kernels.ops two small configs (the interpreter's tile, and the same with BLOCK_M doubled: another
row grouping of every partial sum; see _variants for the MoE experts' kernels) and a stub timer that runs each config twice, as a GPU's benchmark runs it
many times, and ranks the configs in a fixed order (`winner`: "last" or "first"), so the hooks run exactly as
on a GPU and the outcome does not depend on timing. Used by the `gpu_like_autotune` fixture, by
LORA_KERNELS_GPU_LIKE_AUTOTUNE=first|last for a whole session (tests/conftest.py), and by subprocess scripts.
"""
import importlib
import pkgutil

BENCH_RUNS = 2  # a GPU's do_bench runs a config tens of times: two already expose a missing reset


def autotuned_kernels():
    """{name: Autotuner} of every autotuned kernel in lora_kernels.ops."""
    import lora_kernels.ops as ops
    from triton.runtime.autotuner import Autotuner

    found = {}
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"lora_kernels.ops.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, Autotuner):
                found[f"{info.name}.{name}"] = obj
    return found


def _variants(config):
    """BLOCK_M doubled; for the MoE experts' row-tiled kernels, whose BLOCK_M comes with the tile table and not
    from a config, their first block (the streamed or output-column block) doubled."""
    import triton

    block = "BLOCK_M" if "BLOCK_M" in config.kwargs else next(k for k in config.kwargs if k.startswith("BLOCK_"))
    taller = dict(config.kwargs, **{block: config.kwargs[block] * 2})
    return [config, triton.Config(taller, num_warps=config.num_warps, num_stages=config.num_stages)]


def _stub_timer(order):
    """A do_bench that runs the config BENCH_RUNS times and reports a time fixed by the call order: "last" makes
    the last config tried win (BLOCK_M doubled, not the interpreter's default), "first" the first."""
    calls = []

    def do_bench(kernel_call, quantiles=None, **_):
        for _ in range(BENCH_RUNS):
            kernel_call()
        calls.append(None)
        t = float(len(calls)) if order == "first" else 1.0 / len(calls)
        return [t, t, t]

    return do_bench


def enable(winner: str = "last"):
    """Switch the mode on; returns a function that switches it off (configs, timer and tuning caches restored)."""
    if winner not in ("first", "last"):
        raise ValueError(f"winner must be 'first' or 'last', got {winner!r}")
    saved = []
    for kernel in autotuned_kernels().values():
        saved.append((kernel, kernel.configs, kernel.__dict__.get("do_bench")))
        kernel.configs = _variants(kernel.configs[0]) if len(kernel.configs) == 1 else kernel.configs
        kernel.__dict__["do_bench"] = _stub_timer(winner)  # shadows Autotuner's cached_property
        kernel.cache.clear()

    def disable():
        for kernel, configs, bench in saved:
            kernel.configs = configs
            kernel.__dict__.pop("do_bench", None)
            if bench is not None:
                kernel.__dict__["do_bench"] = bench
            kernel.cache.clear()

    return disable
