"""What a GPU run runs: its stages (each a command, a time budget, a minimum, its parse-only form) and presets.

bench/gpu_run.py runs them under one deadline; docs/benchmarks.md ("GPU in ten minutes") says how the
estimated times were made.
"""
from __future__ import annotations

import datetime as _dt
import glob
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
GRACE_S = 8.0                # SIGTERM, then this long, then SIGKILL
RESERVE_S = 25.0             # kept from every stage for the last report, the archive and one grace period
HEADLINE_CASE = "7b.q_proj/M8192/r16/p0.1/bf16/Afp32"
HEADLINE_IMPLS = ("base", "fused", "fused_gemm", "split_gemm", "torch", "peft")
EXT_BUILD = ("build/gpu-ext", "build/gpu-ext-tmp")   # --build-lib, --build-temp


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (the collector saves and exits), SIGKILL after GRACE_S; then SIGKILL to
    whatever of the group outlived its leader (a compiler or test worker must not run on into the next stage)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is gone already
        pass


@dataclass
class Run:
    python: str
    out: Path
    logs: Path
    deadline: float                      # time.monotonic() value
    deadline_s: Optional[float] = None   # as given (None: no deadline)
    preset: str = "quick"
    dry_run: bool = False
    reserve_s: float = RESERVE_S
    env: dict = field(default_factory=dict)
    stem: str = "run"
    records: List[dict] = field(default_factory=list)
    build: Optional[subprocess.Popen] = None
    current: Optional[subprocess.Popen] = None
    started: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def results(self) -> Path:
        return self.out / f"{self.stem}.json"

    def left(self) -> float:
        """Seconds a stage may still use: the time to the deadline less the reserve."""
        return self.deadline - time.monotonic() - self.reserve_s

    def impls(self) -> str:
        names = [n for n in HEADLINE_IMPLS if n != "peft" or self.env.get("peft_imports", True)]
        return ",".join(names)


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    est_s: float                 # estimated seconds on an H100 (docs/benchmarks.md says how), in a run of its preset
    min_s: float                 # not started with less left: it could not finish its first useful unit
    budget_s: Optional[float]    # at most this long; None: whatever is left
    argv: Callable[[Run, float], List[str]]          # the command, given its time limit
    checks: Callable[[Run], List[List[str]]]         # its parse-only forms, for --dry-run
    needs: Sequence[str] = ("cuda_available",)       # env record flags that must be true
    results: bool = False        # adds to the results file: the report is regenerated after it
    prepare: Optional[Callable[[Run, float], Optional[str]]] = None  # runs first; returns why it cannot run


# -- stage commands -------------------------------------------------------------------------------------------

def _collect(run: Run, args: Sequence[str]) -> List[str]:
    return [run.python, "-m", "bench.collect", *args, "--out", str(run.results)]


def collect_stage(name, what, est_s, min_s, budget_s, args: Callable[[Run], List[str]],
                  margin_s: Optional[float] = None, needs=("cuda_available",)) -> Stage:
    """collect.py under a time limit. margin_s: --budget-s is the limit less this, so collect starts no case
    it cannot finish (None for a single case, which gets the whole limit)."""
    def argv(run, limit):
        budget = [] if margin_s is None else ["--budget-s", f"{max(1.0, limit - margin_s):.0f}"]
        return _collect(run, [*args(run), *budget])

    return Stage(name, what, est_s, min_s, budget_s, argv, lambda run: [_collect(run, [*args(run), "--check-args"])],
                 needs=needs, results=True)


def _pytest(run: Run, select: Sequence[str]) -> List[str]:
    return [run.python, "-m", "pytest", *select, "-p", "no:cacheprovider"]


def pytest_stage(name, what, est_s, min_s, budget_s, select: Sequence[str], prepare=None, needs=("cuda_available",),
                 extra_checks: Callable[[Run], List[List[str]]] = lambda run: []) -> Stage:
    return Stage(name, what, est_s, min_s, budget_s, lambda run, limit: _pytest(run, [*select, "-q", "-rfE"]),
                 lambda run: [*extra_checks(run), _pytest(run, [*select, "--collect-only", "-q"])],
                 needs=needs, prepare=prepare)


def build_env(run: Run) -> Dict[str, str]:
    # One arch: torch need not see a GPU to pick one, and it compiles in a fraction of the default list's time.
    env = {"MAX_JOBS": os.environ.get("MAX_JOBS", "4"),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}
    if run.env.get("cuda"):  # a CUDA build of torch: build even where nvcc is found only through CUDA_HOME
        env["LORA_KERNELS_BUILD_CUDA"] = "1"
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    return env


def build_argv(run: Run) -> List[str]:
    return [run.python, "setup.py", "-q", "build_ext", "--build-lib", EXT_BUILD[0], "--build-temp", EXT_BUILD[1]]


def ext_ready(run: Run, limit: float) -> Optional[str]:
    """Wait (within `limit`) for the background build and put the module where lora_kernels imports it."""
    if run.env.get("cuda_extension_built"):
        return None
    if run.build is None:
        return "the CUDA extension build was not started (no nvcc?)"
    try:
        rc = run.build.wait(timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        stop(run.build)
        return "the CUDA extension build did not finish in time (log: build-ext.log)"
    built = glob.glob(str(REPO / EXT_BUILD[0] / "lora_kernels" / "_cuda*.so"))
    if rc != 0 or not built:
        return f"the CUDA extension build failed with exit status {rc} (log: build-ext.log)"
    shutil.copy2(built[0], REPO / "lora_kernels" / Path(built[0]).name)
    return None


def _ext_checks(run: Run) -> List[List[str]]:
    return [build_argv(run) + ["--help"]]


def _headline_case(run: Run) -> List[str]:
    return ["--grid", "headline", "--match", f"^{re.escape(HEADLINE_CASE)}$", "--impls", run.impls()]


def _headline_shapes(run: Run) -> List[str]:
    # The same dtype, rank, dropout and M on the other two headline shapes: no new Triton compiles, only autotuning.
    tail = HEADLINE_CASE.split("/", 1)[1]
    return ["--grid", "headline", "--match", f"/{re.escape(tail)}$", "--skip-existing", "--impls", run.impls()]


SMOKE = ["-m", "gpu and smoke", "tests"]
# One test of the extension's set compiles the float32 Triton path with autotuning (~38 kernels, estimated
# 90 s on an H100) only to compare masks end to end, which test_gpu_mask_matches_triton already does per
# element; the time-limited presets leave it to the ci preset.
ADAPTER_SUITES = ["bench/test_bench_qlora.py", "bench/test_bench_multi.py"]
EXT_TESTS_QUICK = ["-m", "gpu", "tests/test_cuda_ext.py", "-k", "not drop_the_same_elements"]

STAGES: Dict[str, Stage] = {s.name: s for s in [
    collect_stage("headline", f"{HEADLINE_CASE}: {', '.join(HEADLINE_IMPLS)}; fwd, bwd, fwd+bwd, peak memory",
                  110, 60, 300, _headline_case),
    pytest_stage("smoke_tests", "pytest -m 'gpu and smoke': bf16 parity on the Llama shapes, both GEMM paths, "
                 "auto's choice, dropout reproducibility", 45, 30, 180, SMOKE),
    collect_stage("shapes", "the other two headline shapes, same settings", 45, 30, 150, _headline_shapes,
                  margin_s=30),
    collect_stage("e2e", "end to end, llama-2048 preset: ours vs PEFT, tokens/s and peak memory", 70, 45, 180,
                  lambda run: ["--no-ops", "--e2e", "llama-2048"], needs=("cuda_available", "peft_imports")),
    pytest_stage("ext", "CUDA extension (built in the background) and its GPU tests", 35, 20, 150,
                 EXT_TESTS_QUICK, prepare=ext_ready, needs=("cuda_available", "nvcc"), extra_checks=_ext_checks),
    collect_stage("headline_rest", "the rest of the headline grid (p=0, bf16 adapters), every implementation",
                  300, 30, None, lambda run: ["--grid", "headline", "--skip-existing"], margin_s=45),
    collect_stage("full", "the full grid, forward+backward only, closest to the headline first", 1500, 30, 1500,
                  lambda run: ["--grid", "full", "--passes", "fwdbwd", "--warmup", "3", "--reps", "10",
                               "--skip-existing"], margin_s=45),
    # ci preset only
    collect_stage("headline_grid", "the whole headline grid, every implementation", 400, 60, 1800,
                  lambda run: ["--grid", "headline"], margin_s=60),
    pytest_stage("gpu_tests", "pytest -m gpu: every GPU test", 1800, 60, 3600, ["-m", "gpu", "tests"]),
    collect_stage("e2e_all", "end to end, llama-2048 and llama-4096", 150, 45, 900,
                  lambda run: ["--no-ops", "--e2e", "llama-2048,llama-4096"], needs=("cuda_available", "peft_imports")),
    pytest_stage("ext_all", "CUDA extension and all its GPU tests", 150, 20, 900,
                 ["-m", "gpu", "tests/test_cuda_ext.py"], prepare=ext_ready, needs=("cuda_available", "nvcc"),
                 extra_checks=_ext_checks),
    Stage("suite", "the pytest-benchmark suites on the headline grid", 900, 60, 2400,
          lambda run, limit: [*_pytest(run, ["bench/", "-q"]), *_suite_args(run)],
          lambda run: [[*_pytest(run, ["bench/", "--collect-only", "-q"]), *_suite_args(run)]]),
    # dora_moe preset (and ci): the DoRA and MoE-experts targets (issues 24, 25), side by side in the collector
    collect_stage("dora", "DoRA on the three headline shapes, p = 0.1 and 0: base, our LoRA, our DoRA (Triton and "
                  "torch), PEFT DoRA; fwd, bwd, fwd+bwd, saved and peak memory", 110, 45, 130,
                  lambda run: ["--no-ops", "--dora", "--grid", "headline", "--skip-existing"], margin_s=20),
    collect_stage("moe", "MoE experts, Qwen3-30B-A3B then gpt-oss-20b layer, p = 0 and 0.1: transformers' grouped_mm "
                  "base, ours (inject_lora, target_parameters), PEFT target_parameters; fwd, bwd, fwd+bwd, peak memory",
                  60, 30, 300, lambda run: ["--no-ops", "--moe", "--grid", "headline", "--skip-existing"], margin_s=20,
                  needs=("cuda_available", "peft_imports")),
    # adapters preset: the QLoRA and multi-adapter targets (issues 14, 15), which the quick preset has no room for
    Stage("adapter_suites", "pytest-benchmark: QLoRA NF4 layer vs PEFT's QLoRA and our dense layer; a 4-adapter "
          "mixed batch vs one adapter", 150, 60, None,
          lambda run, limit: [*_pytest(run, [*ADAPTER_SUITES, "-q"]), *_suite_args(run, "adapters")],
          lambda run: [[*_pytest(run, [*ADAPTER_SUITES, "--collect-only", "-q"]), *_suite_args(run, "adapters")]]),
]}


def _suite_args(run: Run, tag: str = "") -> List[str]:
    name = f"{run.stem}.{tag + '.' if tag else ''}pytest-benchmark.json"
    return [f"--benchmark-json={run.out / name}", "--benchmark-group-by=group",
            "--benchmark-columns=median,min,max,rounds"]


@dataclass(frozen=True)
class Preset:
    deadline_s: Optional[float]
    stages: Sequence[str]
    what: str


PRESETS = {
    "quick": Preset(480, ["headline", "smoke_tests", "shapes", "e2e", "ext", "headline_rest", "full"],
                    "a 10-minute command: the headline first, then correctness, the other shapes, end to end, "
                    "the CUDA extension, the rest of the grid"),
    # A fresh machine spends most of it compiling the headline case's kernels (estimated 110 s); what is left
    # goes to the stages that reuse those kernels, in the quick preset's order.
    "short": Preset(180, ["headline", "smoke_tests", "shapes"],
                    "the remainder of a lent machine (about 4 minutes, its start included): the headline case "
                    "first"),
    # For a second command: compiling the 4-bit and segmented kernels takes most of it (estimated).
    "adapters": Preset(210, ["adapter_suites"],
                       "QLoRA and multi-adapter benchmarks, for the remainder of a lent machine after quick"),
    # For a second command on the machine quick ran on (its Triton cache warm): DoRA first, capped (about 27 compiles
    # of its own, the LoRA ones cached by quick), then MoE with the rest (the grouped Triton expert kernels'
    # compiles, about 30 for the first Qwen3 case, take most of it). docs/benchmarks.md: the estimates.
    "dora_moe": Preset(240, ["dora", "moe"], "the DoRA and MoE-experts cases, for the remainder of a lent machine "
                       "after quick"),
    "ci": Preset(9000, ["headline_grid", "gpu_tests", "e2e_all", "ext_all", "dora", "moe", "suite", "full"],
                 "the self-hosted GPU CI: every GPU test and benchmark"),
}
# The environment record opens every run (the file stem, the implementations and which stages can run depend
# on it); it is not one of the listed stages.
ENV_STAGE = "env"
