"""One offline, deadline-aware GPU run: the headline numbers in the first minutes, then whatever else fits.

    bench/run_gpu.sh --out "$OUT"                    # preset quick: 480 s in all, for a 10-minute command
    bench/run_gpu.sh --out "$OUT" --preset short     # 180 s: the headline case and shapes, for a short remainder
    bench/run_gpu.sh --out DIR --preset ci           # self-hosted GPU CI: every GPU test and benchmark
    bench/run_gpu.sh --dry-run --out DIR             # on a CPU: the checks below, nothing measured

bench/run_gpu.sh runs `python -m bench.gpu_run` with the repository root on PYTHONPATH: nothing is installed
and nothing is fetched. The stages of a preset run in order of importance under one deadline (--deadline-s or
LORA_BENCH_DEADLINE_S): a stage starts only if at least its min_s is left, may take its budget or what is
left, whichever is less, and is then stopped (SIGTERM to its process group, SIGKILL after GRACE_S). The
collector saves its JSON after every case and on SIGTERM, so a stage cut short keeps what it measured. The
CUDA extension builds in the background from the start (TORCH_CUDA_ARCH_LIST, default 9.0) and only its
own stage waits for it.

Output in --out (default bench/results), flat, one stem <gpu-slug>-<UTC date>: <stem>.json (the results,
with device, torch, triton and commit; LORA_BENCH_COMMIT where the tree has no .git), <stem>.md and .png
(regenerated after every stage that adds results), <stem>.stages.json (the environment and how each stage
ended), <stem>.logs.tar.gz (every stage's log), and in the ci preset <stem>.pytest-benchmark.json: at most
6 files, within LIMITS.

--dry-run (CI runs it: tests/test_gpu_script.py) detects the environment for real, prints the deadline
plan from the stages' estimated H100 times, runs each stage's command line in its parse-only form (collect
and report --check-args, pytest --collect-only that must select tests, setup.py build_ext --help), and
checks the files it wrote against LIMITS.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent

# What comes back from a lent GPU machine's output folder; the run keeps within it everywhere.
LIMITS = {"files": 8, "file_bytes": 16 * 2**20, "depth": 2}
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
LOG_CAP_BYTES = 2 * 2**20    # per log in the tarball: its first and last MiB
GRACE_S = 8.0                # SIGTERM, then this long, then SIGKILL
RESERVE_S = 25.0             # kept from every stage for the last report, the archive and one grace period
COMMAND_LIMIT_S = 600.0      # a lent machine's limit per command: the quick and short deadlines stay inside it

HEADLINE_CASE = "7b.q_proj/M8192/r16/p0.1/bf16/Afp32"
HEADLINE_IMPLS = ("base", "fused", "fused_gemm", "split_gemm", "torch", "peft")
EXT_BUILD = ("build/gpu-ext", "build/gpu-ext-tmp")   # --build-lib, --build-temp


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the orchestrator: stop the stage in flight, keep what was written."""


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


def _build_env(run: Run) -> Dict[str, str]:
    # One arch: torch need not see a GPU to pick one, and it compiles in a fraction of the default list's time.
    env = {"MAX_JOBS": os.environ.get("MAX_JOBS", "4"),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}
    if run.env.get("cuda"):  # a CUDA build of torch: build even where nvcc is found only through CUDA_HOME
        env["LORA_KERNELS_BUILD_CUDA"] = "1"
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    return env


def _build_argv(run: Run) -> List[str]:
    return [run.python, "setup.py", "-q", "build_ext", "--build-lib", EXT_BUILD[0], "--build-temp", EXT_BUILD[1]]


def _ext_ready(run: Run, limit: float) -> Optional[str]:
    """Wait (within `limit`) for the background build and put the module where lora_kernels imports it."""
    if run.env.get("cuda_extension_built"):
        return None
    if run.build is None:
        return "the CUDA extension build was not started (no nvcc?)"
    try:
        rc = run.build.wait(timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        _stop(run.build)
        return "the CUDA extension build did not finish in time (log: build-ext.log)"
    built = glob.glob(str(REPO / EXT_BUILD[0] / "lora_kernels" / "_cuda*.so"))
    if rc != 0 or not built:
        return f"the CUDA extension build failed with exit status {rc} (log: build-ext.log)"
    shutil.copy2(built[0], REPO / "lora_kernels" / Path(built[0]).name)
    return None


def _ext_checks(run: Run) -> List[List[str]]:
    return [_build_argv(run) + ["--help"]]


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
                 EXT_TESTS_QUICK, prepare=_ext_ready, needs=("cuda_available", "nvcc"), extra_checks=_ext_checks),
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
                 ["-m", "gpu", "tests/test_cuda_ext.py"], prepare=_ext_ready, needs=("cuda_available", "nvcc"),
                 extra_checks=_ext_checks),
    Stage("suite", "the pytest-benchmark suites on the headline grid", 900, 60, 2400,
          lambda run, limit: [*_pytest(run, ["bench/", "-q"]), *_suite_args(run)],
          lambda run: [[*_pytest(run, ["bench/", "--collect-only", "-q"]), *_suite_args(run)]]),
]}


def _suite_args(run: Run) -> List[str]:
    return [f"--benchmark-json={run.out / (run.stem + '.pytest-benchmark.json')}", "--benchmark-group-by=group",
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
    "ci": Preset(9000, ["headline_grid", "gpu_tests", "e2e_all", "ext_all", "suite", "full"],
                 "the self-hosted GPU CI: every GPU test and benchmark"),
}
# The environment record opens every run (the file stem, the implementations and which stages can run depend
# on it); it is not one of the listed stages.
ENV_STAGE = "env"


# -- running --------------------------------------------------------------------------------------------------

def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (the collector saves and exits), SIGKILL after GRACE_S."""
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


def _env_vars(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                       else []))
    return env


def run_command(run: Run, argv: List[str], log: Path, limit: float, extra_env=None) -> tuple:
    """(exit status, seconds, cut short) of argv with its output appended to `log`, stopped after `limit` s."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(argv)}   # limit {limit:.0f} s, {_now()}\n".encode())
        f.flush()
        run.current = subprocess.Popen(argv, cwd=REPO, env=_env_vars(extra_env), stdout=f, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        cut = False
        try:
            rc = run.current.wait(timeout=None if limit == float("inf") else max(0.1, limit))
        except subprocess.TimeoutExpired:
            cut = True
            _stop(run.current)
            rc = run.current.returncode
        finally:
            if run.current.poll() is None:  # Interrupted while waiting
                _stop(run.current)
            run.current = None
        f.write(f"# exit status {rc}{' (stopped: time limit)' if cut else ''} after "
                f"{time.monotonic() - t0:.1f} s\n".encode())
    return rc, time.monotonic() - t0, cut


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S UTC")


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


_RESULT_LINE = re.compile(r"^(=+ )?.*\b\d+ (passed|failed|errors?|skipped|deselected)\b|no tests ran|^collect\.py: ")


def _summary(path: Path) -> str:
    """The line that says how a stage went: pytest's result line, collect.py's last word, or the last line."""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith("#")]
    said = [ln for ln in lines if _RESULT_LINE.search(ln)]
    return (said or lines or [""])[-1].strip("= ")[:300]


def _stage_env_ok(run: Run, stage: Stage) -> Optional[str]:
    missing = [n for n in stage.needs if not run.env.get(n)]
    return None if not missing else f"not here: {', '.join(missing)}"


def run_stage(run: Run, stage: Stage, index: int) -> dict:
    rec = {"name": stage.name, "what": stage.what, "est_s": stage.est_s}
    log = run.logs / f"{index:02d}-{stage.name}.log"
    why = _stage_env_ok(run, stage)
    left = run.left()
    if why is None and left < stage.min_s:
        why = f"deadline: {max(0.0, left):.0f} s left, needs at least {stage.min_s:.0f} s"
    if why:
        rec.update(status="skipped", why=why)
        print(f"[{_now()}] {stage.name}: skipped ({why})", flush=True)
        return rec
    limit = left if stage.budget_s is None else min(stage.budget_s, left)
    t0 = time.monotonic()
    print(f"[{_now()}] {stage.name}: {stage.what} (limit {limit:.0f} s)", flush=True)
    if stage.prepare is not None:
        why = stage.prepare(run, limit - stage.min_s / 2)
        if why:
            log.write_text(why + "\n")
            rec.update(status="failed", why=why, seconds=round(time.monotonic() - t0, 1))
            print(f"[{_now()}] {stage.name}: FAILED: {why}", flush=True)
            return rec
        limit -= time.monotonic() - t0
    rc, secs, cut = run_command(run, stage.argv(run, limit), log, limit)
    rec.update(status="cut" if cut else ("ok" if rc == 0 else "failed"), rc=rc,
               limit_s=None if limit == float("inf") else round(limit),
               seconds=round(time.monotonic() - t0, 1), summary=_summary(log))
    print(f"[{_now()}] {stage.name}: {rec['status']} in {rec['seconds']:.0f} s: {rec['summary']}", flush=True)
    if rec["status"] != "ok":
        print(_tail(log), flush=True)
    return rec


def report(run: Run) -> Optional[dict]:
    """Regenerate the Markdown and PNG from the results file (a few seconds), within the reserve."""
    if not run.results.exists():
        return None
    limit = max(5.0, min(60.0, run.deadline - time.monotonic() - GRACE_S))
    args = [run.python, "-m", "bench.report", str(run.results)]
    if not run.env.get("matplotlib", True):
        args.append("--no-png")
    rc, secs, cut = run_command(run, args, run.logs / "report.log", limit)
    return {"rc": rc, "seconds": round(secs, 1), "cut": cut}


def detect_env(run: Run) -> Optional[str]:
    """The env stage: the environment record (bench.env) and nvidia-smi's full output into the logs."""
    log = run.logs / "00-env.log"
    if shutil.which("nvidia-smi"):
        run_command(run, ["nvidia-smi"], log, 30)
    out = run.logs / "env.json"
    limit = max(30.0, min(120.0, run.left()))
    try:
        with open(out, "wb") as f:
            proc = subprocess.run([run.python, "-m", "bench.env"], cwd=REPO, env=_env_vars(), stdout=f,
                                  stderr=subprocess.PIPE, timeout=limit)
    except subprocess.TimeoutExpired:
        return f"python -m bench.env did not finish in {limit:.0f} s (torch import or CUDA initialisation hangs?)"
    if proc.returncode != 0:
        return f"python -m bench.env failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}"
    run.env = json.loads(out.read_text())
    run.stem = os.environ.get("LORA_BENCH_STEM") or run.env["stem"]
    return None


def start_build(run: Run) -> None:
    """The CUDA extension's build, in the background at low priority so it does not slow the Triton numbers."""
    if run.env.get("cuda_extension_built") or not run.env.get("nvcc") or not run.env.get("cuda_available"):
        return
    log = open(run.logs / "build-ext.log", "ab")
    log.write(f"$ {' '.join(_build_argv(run))}   # {_build_env(run)}\n".encode())
    log.flush()
    run.build = subprocess.Popen(["nice", "-n", "10", *_build_argv(run)], cwd=REPO, env=_env_vars(_build_env(run)),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()


# -- output --------------------------------------------------------------------------------------------------

def check_layout(out: Path, files: Sequence[Path]) -> List[str]:
    """What in `files` (under `out`) breaks LIMITS; empty when all is well."""
    problems = []
    if len(files) > LIMITS["files"]:
        problems.append(f"{len(files)} files under {out}, more than {LIMITS['files']}")
    for f in files:
        rel = f.relative_to(out)
        if len(rel.parts) - 1 > LIMITS["depth"]:
            problems.append(f"{rel}: more than {LIMITS['depth']} folders deep")
        bad = [p for p in rel.parts if not _NAME.match(p)]
        if bad:
            problems.append(f"{rel}: name {bad[0]!r} has characters other than letters, digits, '.', '_', '-'")
        if f.stat().st_size > LIMITS["file_bytes"]:
            problems.append(f"{rel}: {f.stat().st_size} bytes, more than {LIMITS['file_bytes']}")
    return problems


def _capped(path: Path) -> bytes:
    data = path.read_bytes()
    if len(data) <= LOG_CAP_BYTES:
        return data
    half = LOG_CAP_BYTES // 2
    return data[:half] + f"\n[... {len(data) - 2 * half} bytes cut ...]\n".encode() + data[-half:]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_outputs(run: Run, done: bool = False) -> List[Path]:
    """<stem>.stages.json and <stem>.logs.tar.gz, rewritten atomically (after every stage); this run's files."""
    doc = {"preset": run.preset, "dry_run": run.dry_run, "started": run.started,
           "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "finished": done,
           "deadline_s": run.deadline_s, "limits": LIMITS, "env": run.env, "stages": run.records}
    _atomic_write(run.out / f"{run.stem}.stages.json", (json.dumps(doc, indent=1) + "\n").encode())
    tar_path = run.out / f"{run.stem}.logs.tar.gz"
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for log in sorted(run.logs.iterdir()):
            data = _capped(log)
            info = tarfile.TarInfo(f"{run.stem}.logs/{log.name}")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, tar_path)
    for stray in run.out.glob(f"{run.stem}*.tmp"):  # a collector killed mid-write
        stray.unlink()
    return sorted(p for p in run.out.iterdir() if p.name.startswith(run.stem) and p.is_file())


def _brief(rec: dict) -> str:
    secs = rec.get("seconds")
    return f"{rec['name']} {rec.get('status')}" + ("" if secs is None else f" {secs:.0f}s")


def _headline_lines(run: Run) -> List[str]:
    try:
        doc = json.loads(run.results.read_text())
    except (OSError, ValueError):
        return []
    lines = []
    for c in doc.get("cases", []):
        r = c.get("ratios") or {}
        lines.append(f"  {c['name']}: fused {c.get('fused_ms')} ms, base {c.get('base_ms')} ms, "
                     f"fused/base {r.get('fused_over_base')}, PEFT/fused {r.get('peft_over_fused')}, "
                     f"torch/fused {r.get('torch_over_fused')}")
    for e in doc.get("e2e", []):
        lines.append(f"  {e['name']}: {e.get('ratios')}")
    return lines


# -- plan and dry run ------------------------------------------------------------------------------------------

def plan(stages: Sequence[Stage], deadline_s: Optional[float], reserve_s: float = RESERVE_S,
         env_s: float = 15.0, report_s: float = 5.0) -> List[dict]:
    """Where each stage would start and what limit it would get, if every stage took its estimate ("expected")
    and if every one took all it may ("worst"); "runs" is False where it would be skipped for the deadline."""
    rows = []
    horizon = float("inf") if deadline_s is None else deadline_s - reserve_s
    t_exp = t_worst = env_s
    for s in stages:
        row = {"stage": s.name, "est_s": s.est_s, "min_s": s.min_s, "budget_s": s.budget_s}
        for key, t in (("expected", t_exp), ("worst", t_worst)):
            left = horizon - t
            runs = left >= s.min_s
            limit = (min(s.budget_s, left) if s.budget_s is not None else left) if runs else 0.0
            row[key] = {"start_s": round(t), "runs": runs, "limit_s": None if limit == float("inf") else round(limit)}
        exp, worst = row["expected"], row["worst"]
        if exp["runs"]:
            t_exp += min(s.est_s, exp["limit_s"] if exp["limit_s"] is not None else s.est_s) + \
                (report_s if s.results else 0)
        if worst["runs"]:
            t_worst += (worst["limit_s"] if worst["limit_s"] is not None else 0) + (report_s if s.results else 0)
        rows.append(row)
    return rows


def dry_run(run: Run, stages: Sequence[Stage], deadline_s: Optional[float]) -> bool:
    ok = True
    print(f"deadline plan ({'no deadline' if deadline_s is None else f'{deadline_s:.0f} s'}, reserve "
          f"{run.reserve_s:.0f} s; estimates for an H100, cold Triton cache):")
    print(f"  {'stage':<14} {'est s':>6} {'min s':>6} {'budget':>7} | {'start':>5} {'limit':>5} | "
          f"{'worst start':>11} {'limit':>5}")
    for row in plan(stages, deadline_s, run.reserve_s):
        e, w = row["expected"], row["worst"]
        fmt = lambda r: (f"{r['start_s']:>5} {r['limit_s'] if r['limit_s'] is not None else '-':>5}"  # noqa: E731
                         if r["runs"] else f"{r['start_s']:>5} {'skip':>5}")
        print(f"  {row['stage']:<14} {row['est_s']:>6.0f} {row['min_s']:>6.0f} "
              f"{row['budget_s'] if row['budget_s'] is not None else '-':>7} | {fmt(e)} | {'':>6}{fmt(w)}")
    if deadline_s is not None and deadline_s + GRACE_S > COMMAND_LIMIT_S:
        print(f"  note: deadline {deadline_s:.0f} s + {GRACE_S:.0f} s grace exceeds a lent machine's "
              f"{COMMAND_LIMIT_S:.0f} s per command")
    for i, stage in enumerate(stages, start=1):
        log = run.logs / f"{i:02d}-{stage.name}.log"
        stage_ok = True
        for argv in stage.checks(run):
            extra = _build_env(run) if "build_ext" in argv else None
            rc, secs, cut = run_command(run, argv, log, 300, extra)
            collected = None
            if "--collect-only" in argv:
                m = re.search(r"^(\d+)(?:/\d+)? tests? collected", log.read_text(), re.M)
                collected = int(m.group(1)) if m else 0
            good = rc == 0 and collected != 0
            stage_ok &= good
            what = " ".join(a if " " not in a else repr(a) for a in argv[1:])
            print(f"  {'parses' if good else 'FAILS '} {stage.name}: {what}"
                  f"{'' if collected is None else f'  ({collected} tests)'}  [{secs:.0f} s]", flush=True)
            if not good:
                print(_tail(log, 20))
        ok &= stage_ok
        run.records.append({"name": stage.name, "what": stage.what, "est_s": stage.est_s,
                            "status": "parsed" if stage_ok else "failed"})
    return ok


# -- main -----------------------------------------------------------------------------------------------------

def _deadline_arg(v: str) -> Optional[float]:
    if v.lower() in ("0", "none", "off"):
        return None
    try:
        s = float(v)
    except ValueError:
        s = -1.0
    if not s > 0:
        raise argparse.ArgumentTypeError(f"deadline must be a positive number of seconds or 'none', got {v!r}")
    return s


def parse_args(argv=None):
    epilog = "stages (estimated seconds on an H100):\n" + "\n".join(
        f"  {s.name:<14} {s.est_s:>5.0f}  {s.what}" for s in STAGES.values())
    ap = argparse.ArgumentParser(prog="bench/run_gpu.sh", description=__doc__.split("\n")[0], epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                    help="; ".join(f"{k}: {p.what}" for k, p in PRESETS.items()))
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/results; "
                    "build/gpu-dry-run with --dry-run)")
    ap.add_argument("--deadline-s", default=os.environ.get("LORA_BENCH_DEADLINE_S"),
                    help="seconds for the whole run, or 'none' (default: LORA_BENCH_DEADLINE_S, else the preset's: "
                    + ", ".join(f"{k} {p.deadline_s:.0f}" for k, p in PRESETS.items()) + ")")
    ap.add_argument("--stages", default=None, help=f"comma-separated stages instead of the preset's (any of "
                    f"{', '.join(STAGES)}); the environment is always recorded first")
    ap.add_argument("--dry-run", action="store_true", help="detect the environment, print the deadline plan, "
                    "parse every stage's command line, check the output layout; measure nothing")
    args = ap.parse_args(argv)
    try:
        args.deadline_s = PRESETS[args.preset].deadline_s if args.deadline_s is None else _deadline_arg(args.deadline_s)
    except argparse.ArgumentTypeError as err:
        ap.error(f"--deadline-s / LORA_BENCH_DEADLINE_S: {err}")
    if args.stages is not None:
        names = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in names if s not in STAGES]
        if unknown or not names:
            ap.error(f"--stages={args.stages!r}: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
        args.stage_list = names
    else:
        args.stage_list = list(PRESETS[args.preset].stages)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    deadline_s = args.deadline_s
    out = (args.out or (REPO / ("build/gpu-dry-run" if args.dry_run else "bench/results"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="lk-gpu-logs-"))
    run = Run(python=sys.executable, out=out, logs=logs, dry_run=args.dry_run, deadline_s=deadline_s,
              deadline=time.monotonic() + (deadline_s if deadline_s is not None else float("inf")),
              preset=args.preset if args.stages is None else f"custom: {args.stages}")
    stages = [STAGES[n] for n in args.stage_list]

    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    handlers = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    rc = 0
    try:
        print(f"[{_now()}] gpu_run: preset {run.preset}, deadline "
              f"{'none' if deadline_s is None else f'{deadline_s:.0f} s'}, out {out}"
              f"{' (dry run)' if run.dry_run else ''}", flush=True)
        t0 = time.monotonic()
        why = detect_env(run)
        run.records.append({"name": ENV_STAGE, "status": "failed" if why else "ok",
                            "seconds": round(time.monotonic() - t0, 1), **({"why": why} if why else {})})
        if why:
            print(f"gpu_run: {why}", file=sys.stderr)
            return 2
        e = run.env
        print(f"[{_now()}] env: {e['device']}, torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, "
              f"numpy {e['numpy']}, peft {e['peft']}, nvcc {e['nvcc'] or '-'}, commit {e['commit']}", flush=True)
        if not e.get("commit"):
            print("gpu_run: WARNING: no commit known (no .git here): run with LORA_BENCH_COMMIT=<sha> so the "
                  "results say what they measured", file=sys.stderr, flush=True)
        if run.dry_run:
            rc = 0 if dry_run(run, stages, deadline_s) else 1
        else:
            if not e.get("cuda_available"):
                print("gpu_run: torch sees no CUDA GPU: the GPU stages are skipped (on a CPU, --dry-run checks "
                      "this script)", file=sys.stderr, flush=True)
            if any(s.prepare is _ext_ready for s in stages):
                start_build(run)
            for i, stage in enumerate(stages, start=1):
                rec = run_stage(run, stage, i)
                run.records.append(rec)
                if stage.results and rec["status"] != "skipped":
                    rec["report"] = report(run)
                write_outputs(run)
            ran = [r for r in run.records[1:] if r.get("status") != "skipped"]
            if any(r.get("status") in ("failed", "cut") for r in ran):
                rc = 1
            elif not ran and not e.get("cuda_available"):
                rc = 2
    except Interrupted as why:
        print(f"gpu_run: interrupted ({why}); keeping what was written", file=sys.stderr, flush=True)
        if run.current is not None:
            _stop(run.current)
        run.records.append({"name": "interrupted", "status": "cut", "why": str(why)})
        rc = 124
    finally:
        if run.build is not None and run.build.poll() is None:
            _stop(run.build)
        files = write_outputs(run, done=True)
        problems = check_layout(out, files)
        shutil.rmtree(logs, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print(f"\n[{_now()}] gpu_run: {len(files)} file(s) in {out}:")
    for f in files:
        print(f"  {f.name}  ({f.stat().st_size} bytes)")
    for p in problems:
        print(f"gpu_run: OUTPUT LIMIT: {p}", file=sys.stderr)
    print("stages: " + ", ".join(_brief(r) for r in run.records))
    for line in _headline_lines(run):
        print(line)
    return rc or (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())
