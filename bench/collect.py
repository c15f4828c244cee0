"""Measure every implementation side by side, one case at a time in one process, into a results file.

    python -m bench.collect                       # on a GPU: the headline cases -> bench/results/<gpu>-<date>.json
    python -m bench.collect --grid full --passes fwdbwd --budget-s 1200
    python -m bench.collect --no-ops --e2e llama-2048,llama-4096
    python -m bench.collect --no-ops --dora --moe         # DoRA and MoE-experts cases (bench/lkbench/dora.py, moe.py)
    python -m bench.collect --out /tmp/smoke.json # without a GPU: smoke shapes, perf_counter timing
    python -m bench.collect ... --check-args      # validate the arguments (grid, regex, names), measure nothing

Run from the repository root (or with it on PYTHONPATH). Each case's implementations run back to back on
the same tensors (bench/lkbench/ops_bench.py), so ratios compare like with like. The file is rewritten
after every case: a run stopped by a time limit keeps what it measured; SIGTERM ends the run between
two statements, records the cases not measured under "truncated" and exits 124. Exit status 1 if any
implementation's output disagreed with the reference. Without a GPU this refuses to write into
bench/results/ (a CPU smoke run is not a result).
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from pathlib import Path

from bench.lkbench import HAS_CUDA  # first: sets TRITON_INTERPRET when there is no GPU
import torch
from bench.lkbench import cases as C
from bench.lkbench import dora as D
from bench.lkbench import e2e as E
from bench.lkbench import impls as I
from bench.lkbench import moe as MOE
from bench.lkbench import results as R
from bench.lkbench.ops_bench import PASSES, STOP_REQUESTED, measure_case
from lora_kernels.timing import L2_FLUSH_BYTES, Timer


class Stopped(Exception):
    """SIGTERM arrived (a time limit): save what was measured and stop."""


def _stop(signum, frame):
    STOP_REQUESTED.append(signal.Signals(signum).name)
    raise Stopped(signal.Signals(signum).name)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", choices=C.GRIDS, default=None, help="default: LORA_BENCH_GRID, else headline on "
                    "a GPU and smoke without one")
    ap.add_argument("--match", default=None, help="regex searched in case names (default: LORA_BENCH_MATCH)")
    ap.add_argument("--impls", default="all", help=f"comma-separated subset of {','.join(I.IMPLS)} (op cases; the "
                    "DoRA and MoE cases measure all theirs)")
    ap.add_argument("--passes", default=",".join(PASSES), help="comma-separated subset of fwd,bwd,fwdbwd "
                    "(fwdbwd is required)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repetitions per pass (GPU 5, CPU 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per pass (GPU 25, CPU 2)")
    ap.add_argument("--no-ops", action="store_true", help="skip the op-level cases (e.g. only --e2e)")
    ap.add_argument("--dora", action="store_true", help=f"also the DoRA cases of the grid ({', '.join(D.DORA_IMPLS)})")
    ap.add_argument("--moe", action="store_true", help=f"also the MoE-experts cases of the grid "
                    f"({', '.join(MOE.MOE_IMPLS)})")
    ap.add_argument("--e2e", default="", help=f"comma-separated end-to-end presets: {','.join(E.PRESETS)}")
    ap.add_argument("--e2e-steps", type=int, default=None, help="timed training steps (GPU 10, CPU 1)")
    ap.add_argument("--skip-existing", action="store_true", help="leave cases already in the file alone (so a "
                    "later --grid full stage does not replace the headline cases' fuller measurements)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="results file (default: see lkbench/results.py)")
    ap.add_argument("--check-args", action="store_true", help="validate the arguments and list the cases they "
                    "select (the grid as defined, GPU or not), then exit without measuring")
    return ap.parse_args(argv)


def _passes(spec: str):
    passes = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in passes if p not in PASSES]
    if unknown or "fwdbwd" not in passes:
        raise ValueError(f"--passes={spec!r}: want a subset of {','.join(PASSES)} that includes fwdbwd")
    return passes


def _presets(spec: str):
    presets = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in presets if p not in E.PRESETS]
    if unknown:
        raise ValueError(f"--e2e={spec!r}: unknown preset(s) {unknown}; known: {', '.join(E.PRESETS)}")
    return presets


# Where each kind of case is kept in the results file.
SUITES = {"ops": "cases", "dora": "dora", "moe": "moe"}


def _jobs(args, grid: str, require_cuda: bool = True) -> list:
    """[(suite, case)] in the order they run: op cases, then DoRA, then MoE experts."""
    jobs = [] if args.no_ops else [("ops", c) for c in C.select(grid, args.match, require_cuda=require_cuda)]
    if args.dora:
        jobs += [("dora", c) for c in D.dora_cases(grid, args.match, require_cuda=require_cuda)]
    if args.moe:
        jobs += [("moe", c) for c in MOE.moe_cases(grid, args.match, require_cuda=require_cuda)]
    return jobs


def _suites(args) -> list:
    return [k for k, on in (("ops", not args.no_ops), ("dora", args.dora), ("moe", args.moe)) if on]


def _measure(suite: str, case, names, timer, passes) -> dict:
    if suite == "dora":
        return D.measure_dora_case(case, list(D.DORA_IMPLS), timer, passes)
    if suite == "moe":
        return MOE.measure_moe_case(case, list(MOE.MOE_IMPLS), timer, passes)
    return measure_case(case, names, timer, passes)


def _line(suite: str, res: dict) -> str:
    """What the console says about one measured case."""
    if suite == "ops":
        rt = res["ratios"]
        return (f"base {res['base_ms']} ms, fused {res['fused_ms']} ms, peft {res['peft_ms']} ms, torch "
                f"{res['torch_ms']} ms | fused/base {rt['fused_over_base']}, peft/fused {rt['peft_over_fused']}")
    names = D.DORA_IMPLS if suite == "dora" else MOE.MOE_IMPLS
    return (", ".join(f"{n} {res[f'{n}_ms']} ms" for n in names) + " | "
            + ", ".join(f"{k} {v}" for k, v in res["ratios"].items() if v is not None))


def _truncated(doc: dict, grid: str, not_run: list, selected: list) -> None:
    """Record `not_run` (of this run's `selected` cases) under "truncated", keeping what earlier runs into the same
    file left unmeasured outside this selection (a DoRA stage cut short stays recorded after a MoE stage)."""
    earlier = [n for n in (doc.get("truncated") or {}).get("not_run", []) if n not in set(selected)]
    if earlier or not_run:
        doc["truncated"] = {"grid": grid, "not_run": earlier + not_run}
    else:
        doc.pop("truncated", None)


def check_args(args) -> int:
    """--check-args: every value the run would use, validated; exit 1 when a --match selects nothing (in any suite
    asked for), since a case renamed under a script's regex would otherwise be skipped silently on the GPU."""
    names = I.names_from(args.impls)
    passes = _passes(args.passes)
    presets = _presets(args.e2e)
    grid = args.grid or C.default_grid()
    if args.match is not None:
        re.compile(args.match)
    todo = _jobs(args, grid, require_cuda=False)
    for n in ("warmup", "reps", "e2e_steps"):
        v = getattr(args, n)
        if v is not None and v < 1:
            raise ValueError(f"--{n.replace('_', '-')}={v}: must be >= 1")
    counts = {k: sum(1 for j, _ in todo if j == k) for k in _suites(args)}
    print(f"collect.py --check-args: grid {grid}, "
          + ", ".join(f"{n} {k if k != 'ops' else 'op'} case(s)" for k, n in counts.items())
          + f", impls {','.join(names)}, passes {','.join(passes)}, e2e {','.join(presets) or '-'}")
    for _, c in todo[:5]:
        print(f"  {c.name}")
    if len(todo) > 5:
        print(f"  ... and {len(todo) - 5} more")
    empty = [k for k, n in counts.items() if not n]
    if empty:
        print(f"collect.py --check-args: --match {args.match!r} selects no {'/'.join(empty)} case of grid {grid}",
              file=sys.stderr)
        return 1
    if not counts and not presets:
        print("collect.py --check-args: --no-ops without --e2e, --dora or --moe measures nothing", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_args:
        try:
            return check_args(args)
        except (ValueError, re.error) as err:
            print(f"collect.py --check-args: {err}", file=sys.stderr)
            return 2
    cuda = HAS_CUDA
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
    passes = _passes(args.passes)
    presets = _presets(args.e2e)
    grid = args.grid or C.default_grid()
    timing = {"method": timer.method, "warmup": warmup, "reps": reps, "statistic": "median",
              "l2_flush_bytes": L2_FLUSH_BYTES if cuda else 0}
    doc = R.open_run(path, R.environment(device), smoke=not cuda or grid == "smoke", timing=timing)
    doc.setdefault("grids", [])
    if _suites(args) and grid not in doc["grids"]:
        doc["grids"].append(grid)
    print(f"collect.py: {doc['device']}, torch {doc['torch']}, triton {doc['triton']}, commit {doc['commit']}"
          f"{' (dirty)' if doc.get('dirty') else ''} -> {path}", flush=True)

    if not doc.get("commit"):
        print("collect.py: WARNING: no git commit known (no .git here?); set LORA_BENCH_COMMIT so the results "
              "say what code they measured", file=sys.stderr)
    t0 = time.monotonic()
    errors = []
    todo = _jobs(args, grid)
    if args.skip_existing:
        todo = [(k, c) for k, c in todo if c.name not in {d["name"] for d in doc.get(SUITES[k], [])}]
    signal.signal(signal.SIGTERM, _stop)
    i = 0
    try:
        for i, (suite, case) in enumerate(todo):
            if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
                _truncated(doc, grid, [c.name for _, c in todo[i:]], [c.name for _, c in todo])
                print(f"collect.py: time budget of {args.budget_s:.0f} s spent; {len(todo) - i} case(s) not run",
                      flush=True)
                break
            res = _measure(suite, case, names, timer, passes)
            errors += res["errors"]
            R.upsert(doc.setdefault(SUITES[suite], []), res)
            R.save(doc, path)
            print(f"[{i + 1}/{len(todo)}] {case.name}: {_line(suite, res)}", flush=True)
        else:
            _truncated(doc, grid, [], [c.name for _, c in todo])
            i = len(todo)

        for preset in presets:
            if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
                print(f"collect.py: time budget spent; end-to-end preset {preset} not run", flush=True)
                continue
            steps = args.e2e_steps if args.e2e_steps is not None else (10 if cuda else 1)
            res = E.run_e2e(preset, device, warmup=3 if cuda else 0, steps=steps)
            R.upsert(doc.setdefault("e2e", []), res)
            R.save(doc, path)
            print(f"e2e {preset}: {res.get('ratios')}", flush=True)
    except Exception:  # noqa: BLE001 - Stopped, or re-raised wrapped by the code it interrupted
        if not STOP_REQUESTED:
            raise
        why = STOP_REQUESTED[0]
        not_run = [c.name for k, c in todo[i:] if c.name not in {d["name"] for d in doc.get(SUITES[k], [])}]
        _truncated(doc, grid, not_run, [c.name for _, c in todo])
        R.save(doc, path)
        print(f"collect.py: stopped by {why} after {time.monotonic() - t0:.0f} s; {len(not_run)} case(s) not "
              f"run; {path} holds what was measured", file=sys.stderr, flush=True)
        return 124

    R.save(doc, path)
    print(f"collect.py: wrote {path} ({len(doc['cases'])} op cases, {len(doc.get('dora', []))} DoRA, "
          f"{len(doc.get('moe', []))} MoE, {len(doc.get('e2e', []))} end-to-end)")
    for e in errors:
        print(f"MISMATCH {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
