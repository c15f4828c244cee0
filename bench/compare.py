"""Regression gate: compare a new results file with the latest committed one for the same GPU.

    python -m bench.compare NEW.json                         # baseline: newest bench/results/<same gpu>-*.json
    python -m bench.compare NEW.json --baseline OLD.json --metric fused_ms --threshold 0.10

For every case present in both files, fails (exit 1) when NEW's metric is more than `threshold`
above the baseline's. Gate only on metrics where higher is worse: times (`<impl>_ms`) and
fused_over_base (read from "ratios"). Cases only in one file are listed, not judged. With no
baseline for this GPU there is nothing to compare: exit 0 with a message, so a new GPU can join.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from bench.lkbench.results import RESULTS_DIR, load, slug

# Both are higher-is-worse: the fused time, and its cost relative to the base linear measured in the same run.
DEFAULT_METRICS = ["fused_ms", "fused_over_base"]


def value(case: dict, metric: str):
    return case.get(metric, (case.get("ratios") or {}).get(metric))


def find_baseline(new_path: Path, new_doc: dict, results_dir: Path):
    """Newest results file in results_dir for the same device, other than new_path itself."""
    prefix = slug(new_doc["device"]) + "-"
    # <prefix><date>.json only: not the run's <stem>.stages.json or <stem>.pytest-benchmark.json beside it.
    candidates = sorted(p for p in results_dir.glob(prefix + "*.json") if p.resolve() != new_path.resolve()
                        and re.fullmatch(r"\d{4}-\d{2}-\d{2}", p.stem[len(prefix):]))
    return candidates[-1] if candidates else None


def compare(new: dict, old: dict, metrics, threshold: float):
    """(regressions, improvements-or-equal count, names only in one file)."""
    old_cases = {c["name"]: c for c in old["cases"]}
    regressions, judged = [], 0
    for c in new["cases"]:
        o = old_cases.get(c["name"])
        if o is None:
            continue
        for m in metrics:
            a, b = value(c, m), value(o, m)
            if a is None or b is None:
                continue
            judged += 1
            if a > b * (1.0 + threshold):
                regressions.append(f"{c['name']}: {m} {b} -> {a} (+{(a / b - 1) * 100:.1f}% > {threshold * 100:.0f}%)")
    only = sorted(set(old_cases) ^ {c["name"] for c in new["cases"]})
    return regressions, judged, only


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("new", type=Path)
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where committed results live")
    ap.add_argument("--metric", action="append", default=None,
                    help=f"metric to gate on, repeatable (default: {', '.join(DEFAULT_METRICS)})")
    ap.add_argument("--threshold", type=float, default=0.10, help="allowed relative regression (0.10 = 10%%)")
    args = ap.parse_args(argv)
    new = load(args.new)
    base_path = args.baseline or find_baseline(args.new, new, args.results_dir)
    if base_path is None:
        print(f"compare.py: no committed results for {new['device']!r} in {args.results_dir}; nothing to compare")
        return 0
    old = load(base_path)
    if old["device"] != new["device"]:
        print(f"compare.py: baseline {base_path} is from {old['device']!r}, new run from {new['device']!r}",
              file=sys.stderr)
        return 2
    metrics = args.metric or DEFAULT_METRICS
    regressions, judged, only = compare(new, old, metrics, args.threshold)
    print(f"compare.py: {args.new} vs {base_path} (commit {old.get('commit')}): {judged} comparison(s) of "
          f"{', '.join(metrics)}, threshold {args.threshold * 100:.0f}%")
    if only:
        print(f"  {len(only)} case(s) in only one of the files (not judged)")
    for r in regressions:
        print(f"REGRESSION {r}", file=sys.stderr)
    if judged == 0:
        print("compare.py: no case in common with the baseline; nothing judged")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
