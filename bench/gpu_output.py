"""What a GPU run (bench/gpu_run.py) leaves in its output folder: the stages record and the logs archive,
rewritten after every stage, checked against what comes back from a lent machine (LIMITS)."""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path
from typing import List, Sequence

from bench.gpu_stages import Run

# What comes back from a lent GPU machine's output folder; the run keeps within it everywhere.
LIMITS = {"files": 8, "file_bytes": 16 * 2**20, "depth": 2}
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
LOG_CAP_BYTES = 2 * 2**20    # per log in the tarball: its first and last MiB


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
    for c in doc.get("dora", []) + doc.get("moe", []):
        lines.append(f"  {c['name']}: " + ", ".join(f"{k} {v}" for k, v in (c.get("ratios") or {}).items()
                                                  if v is not None))
    for e in doc.get("e2e", []):
        lines.append(f"  {e['name']}: {e.get('ratios')}")
    return lines
