"""A run's output directory: is it usable, does it hold a previous run, and clearing one on request.

A new run in a used directory must not silently delete the old run's checkpoints, metrics and adapter:
the caller either resumes it or asks for it to be replaced (--overwrite / TrainConfig.overwrite), and then
only what the run's manifest (manifest.py) lists is deleted.
"""
from __future__ import annotations

import os
import uuid
from typing import Iterable, Optional, Tuple

from .checkpoint import CHECKPOINT_DIR, list_checkpoints
from .manifest import MANIFEST, present, read_manifest, remove, write_manifest
from .metrics import METRICS_FILE, PLOT_FILE

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's names (persistence/keys.py)
ADAPTER_STAGING = (".adapter-new", ".adapter-old")  # save_adapter's folders inside an adapter folder


def check_writable(output_dir: str) -> None:
    """Create output_dir if needed and prove a file can be written there; ValueError naming it otherwise.

    A probe file rather than os.access: access() says yes to root on a read-only filesystem."""
    if os.path.islink(output_dir) and not os.path.exists(output_dir):
        raise ValueError(f"--output-dir {output_dir!r} is a symbolic link to {os.readlink(output_dir)!r}, which does "
                         "not exist: create that folder or give another --output-dir")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output-dir {output_dir!r} exists and is not a directory")
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{uuid.uuid4().hex[:8]}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--output-dir {output_dir!r} is not writable ({err.strerror or err})") from None


def run_outputs(extra: Iterable[str] = ()) -> Tuple[str, ...]:
    """The manifest entries of a Trainer's outputs: metrics, plot, the adapter (and save_adapter's staging
    folders), the checkpoints by their own names (a user's checkpoints/other/ is not one), plus `extra`."""
    return (METRICS_FILE, PLOT_FILE, *ADAPTER_FILES, *ADAPTER_STAGING, f"{CHECKPOINT_DIR}/step-*", *extra)


def adapter_folder_outputs(folder: str) -> Tuple[str, ...]:
    """The manifest entries of an adapter saved to OUTPUT_DIR/folder (save_adapter's files and staging)."""
    return (*(f"{folder}/{n}" for n in (*ADAPTER_FILES, *ADAPTER_STAGING)), f".{folder}.*.tmp")


def _is_run(output_dir: str, manifest: dict) -> bool:
    """Whether the manifest's run got anywhere: a complete checkpoint or a saved adapter. Otherwise it is a start
    that failed (bad data, a flag the library refused, Ctrl-C while loading), which a new run may reuse."""
    done = [e for e in present(output_dir, manifest["outputs"]) if os.path.basename(e) == ADAPTER_FILES[0]]
    return bool(list_checkpoints(output_dir) or done)


def start_run(output_dir: str, overwrite: bool, outputs: Iterable[str], *, clear: bool = True,
              settings: Optional[dict] = None, reuse_all: bool = True) -> Optional[str]:
    """Before a new (not resumed) run writes anything: refuse or clear what is in output_dir, then record
    `outputs` (manifest entries) in its manifest. Returns a notice to print, or None.

    A folder without a manifest that holds files a run writes is not a run of ours: refused, --overwrite or not.
    A previous run of ours (a checkpoint or an adapter) is refused unless overwrite, which deletes exactly the
    manifest's entries. An unfinished start is reused: its entries are deleted (reuse_all=False: only those in
    `outputs`, for a Trainer started by a caller that wrote the run's other files itself). clear=False: check
    only (every rank checks, so all raise together; one deletes and writes)."""
    outputs = list(outputs)
    manifest = read_manifest(output_dir)
    notice = None
    if manifest is None:
        found = present(output_dir, outputs)
        if found:
            raise ValueError(f"--output-dir {output_dir!r} holds {', '.join(found[:4])} but no {MANIFEST}: not a "
                             "lora_kernels run, so nothing there is deleted or overwritten (--overwrite included); "
                             "choose another --output-dir")
    elif _is_run(output_dir, manifest):
        found = present(output_dir, manifest["outputs"])
        if not overwrite:
            raise ValueError(f"--output-dir {output_dir!r} holds a previous run ({', '.join(found[:4])}"
                             f"{', ...' if len(found) > 4 else ''}): continue it with --resume, or pass --overwrite "
                             "to replace it (only the files its manifest lists are deleted)")
        if clear:
            remove(output_dir, manifest["outputs"])
    elif present(output_dir, manifest["outputs"]):
        if clear:
            remove(output_dir, manifest["outputs"] if reuse_all else outputs)
        notice = (f"reusing --output-dir {output_dir!r}: an earlier start there stopped before its first checkpoint; "
                  "its files are replaced")
    if clear:
        keep = [] if manifest is None or (reuse_all or _is_run(output_dir, manifest)) else manifest["outputs"]
        write_manifest(output_dir, [*keep, *outputs], settings if settings is not None else
                       (manifest or {}).get("settings", {}), fresh=True)
    return notice


def check_merge_output(model_dir: str, adapter_dir: str, output_dir: str, overwrite: bool = False) -> None:
    """ValueError where writing a merged model to output_dir would write over its input or into a run: the base
    model's folder (or one inside it), the adapter's folder, a run's folder; a folder already holding a model
    needs overwrite."""
    out, model, adapter = (os.path.realpath(p) for p in (output_dir, model_dir, adapter_dir))
    if out == model or out.startswith(model + os.sep):
        raise ValueError(f"--output-dir {output_dir!r} is {'' if out == model else 'inside '}--model {model_dir!r}: "
                         "merging never writes over its input model; choose another --output-dir")
    if out == adapter or os.path.isfile(os.path.join(out, MANIFEST)) or \
            os.path.isfile(os.path.join(out, ADAPTER_FILES[0])):
        raise ValueError(f"--output-dir {output_dir!r} holds an adapter or a finetune run: a merged model there "
                         "would mix with it; choose another --output-dir (e.g. a new folder inside the run)")
    if os.path.isdir(out) and not overwrite:
        held = sorted(n for n in os.listdir(out) if n == "config.json" or n.endswith(".safetensors"))
        if held:
            raise ValueError(f"--output-dir {output_dir!r} already holds a model ({', '.join(held[:3])}): pass "
                             "--overwrite to replace it, or choose another --output-dir")
