#!/usr/bin/env python
"""Measure every implementation side by side, one case at a time in one process, into a results file.

    python bench/collect.py                       # on a GPU: the headline cases -> bench/results/<gpu>-<date>.json
    python bench/collect.py --grid full --passes fwdbwd --budget-s 1200
    python bench/collect.py --no-ops --e2e llama-2048,llama-4096
    python bench/collect.py --out /tmp/smoke.json # without a GPU: smoke shapes, perf_counter timing

Each case's implementations run back to back on the same tensors (bench/lkbench/ops_bench.py), so
ratios compare like with like. The file is rewritten after every case: a run stopped by a time limit
keeps what it measured. Exit status 1 if any implementation's output disagreed with the reference.
Without a GPU this refuses to write into bench/results/ (a CPU smoke run is not a result).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lkbench  # noqa: F401  (first: sets TRITON_INTERPRET when there is no GPU)
import torch
from lkbench import cases as C
from lkbench import e2e as E
from lkbench import impls as I
from lkbench import results as R
from lkbench.ops_bench import PASSES, measure_case
from lora_kernels.timing import L2_FLUSH_BYTES, Timer


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", choices=C.GRIDS, default=None, help="default: LORA_BENCH_GRID, else headline on "
                    "a GPU and smoke without one")
    ap.add_argument("--match", default=None, help="regex searched in case names (default: LORA_BENCH_MATCH)")
    ap.add_argument("--impls", default="all", help=f"comma-separated subset of {','.join(I.IMPLS)}")
    ap.add_argument("--passes", default=",".join(PASSES), help="comma-separated subset of fwd,bwd,fwdbwd "
                    "(fwdbwd is required)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repetitions per pass (GPU 5, CPU 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per pass (GPU 25, CPU 2)")
    ap.add_argument("--no-ops", action="store_true", help="skip the op-level cases (e.g. only --e2e)")
    ap.add_argument("--e2e", default="", help=f"comma-separated end-to-end presets: {','.join(E.PRESETS)}")
    ap.add_argument("--e2e-steps", type=int, default=None, help="timed training steps (GPU 10, CPU 1)")
    ap.add_argument("--skip-existing", action="store_true", help="leave cases already in the file alone (so a "
                    "later --grid full stage does not replace the headline cases' fuller measurements)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="results file (default: see lkbench/results.py)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    path = args.out or R.default_path(device)
    if not cuda and path.resolve().parent == R.RESULTS_DIR.resolve():
        print(f"collect.py: no GPU; refusing to write a CPU smoke run into {R.RESULTS_DIR} (pass --out)",
              file=sys.stderr)
        return 2
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    reps = args.reps if args.reps is not None else (25 if cuda else 2)
    timer = Timer(device, warmup, reps)
    names = I.names_from(args.impls)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    grid = args.grid or C.default_grid()
    timing = {"method": timer.method, "warmup": warmup, "reps": reps, "statistic": "median",
              "l2_flush_bytes": L2_FLUSH_BYTES if cuda else 0}
    doc = R.open_run(path, R.environment(device), smoke=not cuda or grid == "smoke", timing=timing)
    doc.setdefault("grids", [])
    if not args.no_ops and grid not in doc["grids"]:
        doc["grids"].append(grid)
    print(f"collect.py: {doc['device']}, torch {doc['torch']}, triton {doc['triton']}, commit {doc['commit']}"
          f"{' (dirty)' if doc.get('dirty') else ''} -> {path}", flush=True)

    if not doc.get("commit"):
        print("collect.py: WARNING: no git commit known (no .git here?); set LORA_BENCH_COMMIT so the results "
              "say what code they measured", file=sys.stderr)
    t0 = time.monotonic()
    errors = []
    todo = [] if args.no_ops else C.select(grid, args.match)
    if args.skip_existing:
        done = {c["name"] for c in doc["cases"]}
        todo = [c for c in todo if c.name not in done]
    for i, case in enumerate(todo):
        if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
            doc["truncated"] = {"grid": grid, "not_run": [c.name for c in todo[i:]]}
            print(f"collect.py: time budget of {args.budget_s:.0f} s spent; {len(todo) - i} case(s) not run",
                  flush=True)
            break
        res = measure_case(case, names, timer, passes)
        errors += res["errors"]
        R.upsert(doc["cases"], res)
        R.save(doc, path)
        rt = res["ratios"]
        print(f"[{i + 1}/{len(todo)}] {case.name}: base {res['base_ms']} ms, fused {res['fused_ms']} ms, "
              f"peft {res['peft_ms']} ms, torch {res['torch_ms']} ms | fused/base {rt['fused_over_base']}, "
              f"peft/fused {rt['peft_over_fused']}", flush=True)
    else:
        if todo:
            doc.pop("truncated", None)

    for preset in [p.strip() for p in args.e2e.split(",") if p.strip()]:
        if preset not in E.PRESETS:
            raise SystemExit(f"unknown --e2e preset {preset!r}; known: {', '.join(E.PRESETS)}")
        if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
            print(f"collect.py: time budget spent; end-to-end preset {preset} not run", flush=True)
            continue
        steps = args.e2e_steps if args.e2e_steps is not None else (10 if cuda else 1)
        res = E.run_e2e(preset, device, warmup=3 if cuda else 0, steps=steps)
        R.upsert(doc.setdefault("e2e", []), res)
        R.save(doc, path)
        print(f"e2e {preset}: {res.get('ratios')}", flush=True)

    R.save(doc, path)
    print(f"collect.py: wrote {path} ({len(doc['cases'])} op cases, {len(doc.get('e2e', []))} end-to-end)")
    for e in errors:
        print(f"MISMATCH {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
