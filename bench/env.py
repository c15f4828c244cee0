"""The environment record of a GPU run, as one JSON object on stdout: `python -m bench.env`.

What every results file records (bench/lkbench/results.py: device, torch, triton, CUDA, transformers, peft,
commit, date), the file stem of the run, and what decides which stages of a GPU run (bench/gpu_stages.py) can
run here: whether torch sees a GPU and its compute capability, whether peft imports, nvcc and ninja for the
CUDA extension, and whether that extension is already built. Optional pieces that are missing are recorded as
null or false; only a torch that does not import is an error.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

from bench.lkbench import HAS_CUDA  # first: sets TRITON_INTERPRET when there is no GPU
import torch
from bench.lkbench import results as R

_SMI_QUERY = "name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"


def _imports(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any failure to import means the stages that need it cannot run
        return False
    return True


def _nvidia_smi():
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={_SMI_QUERY}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi failed: {err}"
    return out.stdout.strip() or out.stderr.strip()


def record() -> dict:
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    env = R.environment(device)
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    env.update({
        "stem": R.default_path(device).stem,
        "python": sys.version.split()[0],
        "numpy": R.package_version("numpy"),
        "cuda_available": HAS_CUDA,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if HAS_CUDA else None,
        "gpu_count": torch.cuda.device_count() if HAS_CUDA else 0,
        "nvidia_smi": _nvidia_smi(),
        "peft_imports": _imports("peft") and _imports("transformers"),
        "matplotlib": _imports("matplotlib"),
        "nvcc": nvcc if nvcc and os.path.exists(nvcc) else None,
        "ninja": shutil.which("ninja"),
        "cuda_extension_built": importlib.util.find_spec("lora_kernels._cuda") is not None,
    })
    return env


if __name__ == "__main__":
    json.dump(record(), sys.stdout, indent=1)
    sys.stdout.write("\n")
