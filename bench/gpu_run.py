"""One offline, deadline-aware GPU run: the headline numbers in the first minutes, then whatever else fits.

    bench/run_gpu.sh --out "$OUT"                    # preset quick: 480 s in all, for a 10-minute command
    bench/run_gpu.sh --out "$OUT" --preset short     # 180 s: the headline case first, for a short remainder
    bench/run_gpu.sh --out "$OUT" --preset adapters  # 210 s: the QLoRA and multi-adapter suites, after quick
    bench/run_gpu.sh --out "$OUT" --preset dora_moe  # 240 s: the DoRA and MoE-experts cases, after quick
    bench/run_gpu.sh --out DIR --preset ci           # self-hosted GPU CI: every GPU test and benchmark
    bench/run_gpu.sh --dry-run --out DIR             # on a CPU: the checks below, nothing measured

bench/run_gpu.sh runs `python -m bench.gpu_run` with the repository root on PYTHONPATH: nothing is installed
and nothing is fetched. The stages of a preset (bench/gpu_stages.py) run in order of importance under one
deadline (--deadline-s or LORA_BENCH_DEADLINE_S): a stage starts only if at least its min_s is left, may take
its budget or what is left, whichever is less, and is then stopped (SIGTERM to its process group, SIGKILL
after GRACE_S). The collector saves its JSON after every case and on SIGTERM, so a stage cut short keeps what
it measured. The CUDA extension builds in the background from the start (TORCH_CUDA_ARCH_LIST, default 9.0)
and only its own stage waits for it. This file holds the command line, the deadline plan and the dry run;
bench/gpu_runner.py runs a stage, bench/gpu_output.py writes and checks the output folder.

Output in --out (default bench/results), flat, one stem <gpu-slug>-<UTC date>: <stem>.json (the results,
with device, torch, triton and commit; LORA_BENCH_COMMIT where the tree has no .git), <stem>.md and .png
(regenerated after every stage that adds results), <stem>.stages.json (the environment and how each stage
ended), <stem>.logs.tar.gz (every stage's log), and in the ci (adapters) preset <stem>.pytest-benchmark.json
(<stem>.adapters.pytest-benchmark.json): at most 6 files, within LIMITS.

--dry-run (CI runs it: tests/test_gpu_script.py) detects the environment for real, prints the deadline
plan from the stages' estimated H100 times, runs each stage's command line in its parse-only form (collect
and report --check-args, pytest --collect-only that must select tests, setup.py build_ext --help), and
checks the files it wrote against LIMITS.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

# LIMITS, LOG_CAP_BYTES, _capped: read by tests/test_gpu_script.py through this module, like the stages below.
from bench.gpu_output import (LIMITS, LOG_CAP_BYTES, _brief, _capped, _headline_lines, check_layout,  # noqa: F401
                              write_outputs)
from bench.gpu_runner import Interrupted, _now, _tail, detect_env, report, run_command, run_stage, start_build
from bench.gpu_stages import (ENV_STAGE, GRACE_S, PRESETS, REPO, RESERVE_S, STAGES, Run, Stage, build_env, ext_ready,
                              stop)
from bench.gpu_stages import collect_stage, pytest_stage  # noqa: F401  (one import for scripts and tests)

COMMAND_LIMIT_S = 600.0      # a lent machine's limit per command: the quick and short deadlines stay inside it


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
            extra = build_env(run) if "build_ext" in argv else None
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
            if any(s.prepare is ext_ready for s in stages):
                start_build(run)
            for i, stage in enumerate(stages, start=1):
                rec = run_stage(run, stage, i)
                run.records.append(rec)
                if stage.results and rec["status"] != "skipped":
                    rec["report"] = report(run)
                write_outputs(run)
            ran = [r for r in run.records[1:] if r.get("status") != "skipped"]
            if any(r.get("status") == "failed" or r.get("cut_by") == "budget" for r in ran):
                rc = 1
            elif not ran and not e.get("cuda_available"):
                rc = 2
    except Interrupted as why:
        print(f"gpu_run: interrupted ({why}); keeping what was written", file=sys.stderr, flush=True)
        if run.current is not None:
            stop(run.current)
        run.records.append({"name": "interrupted", "status": "cut", "why": str(why)})
        rc = 124
    finally:
        if run.build is not None and run.build.poll() is None:
            stop(run.build)
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
