#!/usr/bin/env bash
# The one GPU command: offline, deadline-aware, results under --out. Run from anywhere; it works in the
# repository root it lives in, with that root on PYTHONPATH (no install, no network).
#
#   bench/run_gpu.sh --out "$OUT"                   # preset quick: 480 s, headline numbers first
#   bench/run_gpu.sh --out "$OUT" --preset short    # 180 s, for a short remainder of a lent machine
#   bench/run_gpu.sh --out "$OUT" --preset dora_moe # 240 s, the DoRA and MoE-experts cases, after quick
#   bench/run_gpu.sh --out DIR --preset ci          # self-hosted GPU CI: every GPU test and benchmark
#   bench/run_gpu.sh --dry-run --out DIR            # CPU: environment, deadline plan, every command parsed
#   bench/run_gpu.sh --help                         # stages, presets, options
#
# Environment: PYTHON (default python3), LORA_BENCH_COMMIT (the commit to record where the tree has no
# .git), LORA_BENCH_DEADLINE_S (instead of --deadline-s), TORCH_CUDA_ARCH_LIST (default 9.0, the CUDA
# extension's build only), LORA_BENCH_STEM (file stem, default <gpu-slug>-<UTC date>).
# The stages and their order live in bench/gpu_stages.py; docs/benchmarks.md ("GPU in ten minutes") says what
# comes back.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m bench.gpu_run "$@"
