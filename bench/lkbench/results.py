"""Results files: where they go, what every one of them records, and merging stages into one file.

A run writes bench/results/<gpu-slug>-<YYYY-MM-DD>.json (then report.py adds .md and .png next to it).
Every file records the device, torch, triton, git commit and date; stages of one run (op cases,
end-to-end, the full grid) are merged into the same file by case name, so a run cut short by a time
limit keeps what it measured, and a later stage adds to it rather than overwriting it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

SCHEMA_VERSION = 1
BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git(*args) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def package_version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is recorded as None
        return None


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def environment(device: torch.device) -> dict:
    """What every results file records about where and from what it was measured."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "lora_kernels": package_version("lora_kernels"),
        # LORA_BENCH_COMMIT: for copies of the tree without .git (e.g. a work tree shipped to a GPU box).
        "commit": _git("rev-parse", "HEAD") or os.environ.get("LORA_BENCH_COMMIT"),
        # Uncommitted changes to tracked files mean the commit alone does not reproduce the numbers.
        "dirty": None if dirty is None else bool(dirty),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def default_path(device: torch.device) -> Path:
    """LORA_BENCH_RESULTS_DIR (default bench/results) / LORA_BENCH_STEM (default <gpu-slug>-<date>).json."""
    out_dir = Path(os.environ.get("LORA_BENCH_RESULTS_DIR") or RESULTS_DIR)
    stem = os.environ.get("LORA_BENCH_STEM") or f"{slug(device_name(device))}-{today()}"
    return out_dir / f"{stem}.json"


def load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    for key in ("device", "torch", "triton", "commit", "date", "cases"):
        if key not in doc:
            raise ValueError(f"{path}: not a lora_kernels results file (missing key {key!r})")
    return doc


def open_run(path: Path, env: dict, smoke: bool, timing: dict) -> dict:
    """The document to add to: the existing file at `path` (same device) or a new one."""
    if path.exists():
        doc = load(path)
        if doc["device"] != env["device"]:
            raise ValueError(f"{path} holds results for {doc['device']!r}, this machine is {env['device']!r}; "
                             "set LORA_BENCH_STEM or --out to write elsewhere")
        if doc.get("commit") != env["commit"] or doc.get("torch") != env["torch"]:
            # Mixing code versions in one file would make its ratios meaningless.
            raise ValueError(f"{path} was measured at commit {doc.get('commit')} with torch {doc.get('torch')}; "
                             f"this is {env['commit']} with torch {env['torch']}: write to a new file")
        doc["updated"] = env["date"]
        return doc
    return {"schema": SCHEMA_VERSION, **env, "smoke": smoke, "timing": timing, "cases": [], "e2e": []}


def upsert(items: list, item: dict) -> None:
    """Replace the entry with the same name, or append."""
    for i, old in enumerate(items):
        if old.get("name") == item["name"]:
            items[i] = item
            return
    items.append(item)


def save(doc: dict, path: Path) -> None:
    """Write atomically, so an interrupted run never leaves half a JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
