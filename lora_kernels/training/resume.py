"""What --resume continues, checked before any model is loaded: the checkpoint, and the run's settings.

The manifest (manifest.py) records the flags that define a run. A resume with different values would train
another run under the old one's name (a new --lr silently ignored, a new --lora-alpha changing the scaling
mid-run, a new --seed drawing a new random base under the old adapter), so every difference is an error listing
each flag with both values. The flags in CHANGEABLE may change on resume (train longer, evaluate or save at
another rhythm): a difference there is a notice, and the manifest then records the new value.
"""
from __future__ import annotations

import json
from typing import Callable, List, Optional, Tuple

from .checkpoint import checkpoint_root, checkpoint_step, latest_checkpoint
from .manifest import MANIFEST, read_manifest, write_manifest

CHANGEABLE = ("--max-steps", "--eval-every", "--eval-max-batches", "--save-every")


def _show(value) -> str:
    if value is None:
        return "unset"
    return json.dumps(value) if isinstance(value, (list, dict, str)) else str(value)


def compare_settings(stored: dict, now: dict, changeable=CHANGEABLE) -> Tuple[List[str], List[str]]:
    """(errors, notices): one "FLAG RUN (the run) vs NOW (now)" text per setting that differs. A setting the run
    did not record (an older manifest) is not compared."""
    errors, notices = [], []
    for key, value in now.items():
        if key not in stored:
            continue
        old = stored[key]
        if json.loads(json.dumps(value)) == old:  # the manifest's JSON: tuples are lists there
            continue
        text = f"{key} {_show(old)} (the run) vs {_show(value)} (now)"
        (notices if key in changeable else errors).append(text)
    return errors, notices


def resume_target(output_dir: str, resume: str, settings: dict, say: Callable[[str], None] = print,
                  write: bool = True) -> Tuple[str, Optional[int]]:
    """(checkpoint directory, the step it was written at) for --resume [CHECKPOINT] in output_dir, after comparing
    `settings` with those the run recorded (ValueError listing each difference; notices through `say`).
    write=False: compare only (every rank compares; one records the changed CHANGEABLE values)."""
    path = latest_checkpoint(output_dir) if resume == "latest" else resume
    if path is None:
        raise ValueError(f"--resume: no checkpoint under {checkpoint_root(output_dir)}: nothing to resume (start the "
                         "run without --resume)")
    step = checkpoint_step(path)
    finished = step >= settings.get("--max-steps", step + 1)  # the caller says so; nothing is written then
    manifest = read_manifest(output_dir)
    stored = (manifest or {}).get("settings") or {}
    if not stored and finished:
        return path, step
    if not stored:
        say(f"notice: {output_dir} has no recorded settings ({MANIFEST}): the flags of this resume are not "
            "compared with the run's")
        return path, step
    errors, notices = compare_settings(stored, settings)
    if errors:
        raise ValueError(f"--resume: the run in {output_dir} was started with other settings: {'; '.join(errors)}. "
                         "Resume with the run's values, or start a new run (--overwrite, or another --output-dir)")
    if finished:
        return path, step
    for text in notices:
        say(f"notice: resuming with {text}")
    if notices and write:
        write_manifest(output_dir, [], {**stored, **{k: v for k, v in settings.items() if k in CHANGEABLE}})
    return path, step
