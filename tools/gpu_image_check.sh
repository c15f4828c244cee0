#!/usr/bin/env bash
# What can be checked on a CPU machine against the GPU machine's own package versions, before a lent GPU's
# minutes are spent: the device image pairs torch 2.11 (CUDA 13) with triton 3.6 and transformers 5.17, while
# CI runs torch 2.13, triton 3.9 and the newest transformers. In a venv with the image's versions this
#   1. compiles every kept autotune config for sm_90 under triton 3.6 (tools/sm90_budget.py --check, all
#      subsets: ptxas spills differently from 3.9's),
#   2. builds the CUDA extension against torch 2.11's CUDA headers with nvcc (CUDA_HOME, default /usr/local/cuda),
#   3. dry-runs bench/run_gpu.sh's presets (every stage's command parsed),
#   4. runs the CPU test suite (the interpreter needs numpy < 2.4 beside triton 3.6; the image has 2.5, which
#      the GPU run never feeds to the interpreter).
#
#   tools/gpu_image_check.sh [VENV]   # default /tmp/lk-gpu-image; ~2 min to build it, then 8.5 min on 2 cores
#                                     # (13 min with a cold triton cache)
#
# Needs the package registry (torch 2.11's CUDA wheel and its nvidia libraries: about 3 GB) and python 3.11+.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/lk-gpu-image}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
    # No constraint files: the image's torch is older than what a machine's pip constraints may pin.
    PIP_CONSTRAINT= "$venv/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" \
        "peft==0.21.*" "numpy<2.4" "setuptools<82" wheel ninja pytest pytest-benchmark pytest-xdist \
        "bitsandbytes==0.50.2" "accelerate==1.16.0" "trl==1.16.0" safetensors matplotlib tqdm
fi
. "$venv/bin/activate"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, '| triton', triton.__version__,
      '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
rc=0
step() { echo "== $*"; "$@" || { echo "!! failed: $*"; rc=1; }; }
step python tools/sm90_budget.py --check --quiet
step python tools/sm90_budget.py --subset extra --check --quiet
ext=$(mktemp -d)
step env CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST=9.0 \
    python setup.py -q build_ext --build-lib "$ext/lib" --build-temp "$ext/tmp"
# loads against torch 2.11's libraries (from the build folder alone: there lora_kernels is a namespace package)
step bash -c "cd '$ext/lib' && env -u PYTHONPATH python -c 'import torch, lora_kernels._cuda as c; print(sorted(n for n in dir(c) if n[0] != \"_\"))'"
for preset in quick dora_moe adapters; do
    step bash bench/run_gpu.sh --dry-run --preset "$preset" --out "$ext/dry-$preset"
done
step python -m pytest -q -n 2 -p no:cacheprovider
rm -rf "$ext"
exit "$rc"
