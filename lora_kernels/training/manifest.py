"""A run's manifest: OUTPUT_DIR/lora_kernels_run.json lists what the run writes there, and its settings.

--overwrite deletes exactly the manifest's entries and nothing else a user keeps in the folder (their own
files beside the run, or inside checkpoints/ and base_model/). A folder without a manifest is not a run of
ours: where it holds files a run would write, a new run is refused rather than writing over them.

Entries are paths relative to OUTPUT_DIR; one may end in a shell pattern for outputs whose names are only
known later (checkpoints/step-*). The settings are the run-defining flags, compared on --resume.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from typing import Iterable, List, Optional

MANIFEST = "lora_kernels_run.json"
FORMAT = "lora_kernels.run"
VERSION = 1


def manifest_path(output_dir: str) -> str:
    return os.path.join(output_dir, MANIFEST)


def read_manifest(output_dir: str) -> Optional[dict]:
    """The manifest of output_dir, None where there is none; ValueError naming the file if it is not one."""
    path = manifest_path(output_dir)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not a lora_kernels run manifest ({type(err).__name__}); nothing in "
                         f"{output_dir!r} is deleted: remove the file, or choose another --output-dir") from None
    ok = (isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("outputs"), list)
          and all(isinstance(e, str) and _inside(e) for e in doc["outputs"]))
    if not ok:
        raise ValueError(f"{path}: not a lora_kernels run manifest; nothing in {output_dir!r} is deleted: "
                         "remove the file, or choose another --output-dir")
    doc.setdefault("settings", {})
    return doc


def _inside(entry: str) -> bool:
    """A relative path that stays inside the folder (a crafted manifest must not make us delete elsewhere)."""
    parts = entry.replace("\\", "/").split("/")
    return bool(entry) and not os.path.isabs(entry) and ".." not in parts and "" not in parts


def write_manifest(output_dir: str, outputs: Iterable[str], settings: Optional[dict] = None,
                   fresh: bool = False) -> dict:
    """Write (atomically) the manifest with these entries (added to the existing manifest's unless fresh) and
    settings (None: keep the existing ones)."""
    old = None if fresh else read_manifest(output_dir)
    old = old or {"outputs": [], "settings": {}}
    entries = list(old["outputs"]) + [e for e in outputs if e not in old["outputs"]]
    entries = list(dict.fromkeys(entries))
    doc = {"format": FORMAT, "version": VERSION, "outputs": entries,
           "settings": settings if settings is not None else old["settings"]}
    tmp = manifest_path(output_dir) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, manifest_path(output_dir))
    return doc


def present(output_dir: str, entries: Iterable[str]) -> List[str]:
    """The entries (patterns expanded) that exist in output_dir, as relative paths; an empty folder counts only
    where a pattern names it (checkpoints/step-*)."""
    found: List[str] = []
    for entry in entries:
        parent, name = os.path.split(entry)
        pattern = any(c in name for c in "*?[")
        if pattern:
            folder = os.path.join(output_dir, parent)
            names = sorted(os.listdir(folder)) if os.path.isdir(folder) and not os.path.islink(folder) else []
            matches = [os.path.join(parent, n) for n in names if fnmatch.fnmatchcase(n, name)]
        else:
            matches = [entry]
        for rel in matches:
            path = os.path.join(output_dir, rel)
            if not pattern and os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
                continue
            if os.path.lexists(path) and rel not in found:
                found.append(rel)
    return found


def remove(output_dir: str, entries: Iterable[str]) -> List[str]:
    """Delete the entries that exist (a folder entry with all it holds), then the folders they were in that are
    left empty (up to output_dir, never it). Returns what was deleted."""
    entries = list(entries)
    gone = present(output_dir, entries)
    for rel in gone:
        path = os.path.join(output_dir, rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    for entry in entries:  # empty folders the run made (checkpoints/, base_model/, NAME/), deepest first
        parent = os.path.dirname(entry)
        while parent:
            folder = os.path.join(output_dir, parent)
            if os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder):
                os.rmdir(folder)
            parent = os.path.dirname(parent)
    return gone
