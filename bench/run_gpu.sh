#!/usr/bin/env bash
# One long GPU run: the GPU tests, the measured results file, the pytest-benchmark suite, the report.
#
#   bench/run_gpu.sh                 # every stage, in order of importance
#   bench/run_gpu.sh headline report # chosen stages only (e.g. one per command under a time limit)
#
# Stages (default: all, in this order, so a run cut short has measured what matters most):
#   check     a CUDA GPU is visible to torch (the run aborts otherwise)
#   tests     python -m pytest -m gpu tests
#   headline  bench/collect.py --grid headline: the issue's target cases, all implementations,
#             forward / backward / forward+backward, peak memory and saved bytes
#   e2e       bench/collect.py --e2e: Llama-style training step, ours vs PEFT (tokens/s, peak memory)
#   suite     the pytest-benchmark suites (bench/), JSON saved next to the results
#   full      bench/collect.py --grid full (forward+backward only) until LORA_BENCH_FULL_BUDGET_S
#   report    bench/report.py: the Markdown table and the PNG chart
#
# Environment:
#   LORA_BENCH_RESULTS_DIR   where results go (default bench/results)
#   LORA_BENCH_STEM          file stem (default <gpu-slug>-<UTC date>, fixed once per invocation)
#   LORA_BENCH_FULL_BUDGET_S seconds the full grid may take (default 1500)
#   LORA_BENCH_E2E_PRESETS   end-to-end presets (default llama-2048,llama-4096)
# Every stage runs even if an earlier one failed (a GPU is rare: measure what can be measured);
# the script exits 1 at the end if any stage failed, naming them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(check tests headline e2e suite full report)

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "run_gpu.sh: torch sees no CUDA GPU; this script is for GPU machines" \
         "(CPU smoke: python -m pytest tests/test_bench_smoke.py)" >&2
    exit 2
fi

RESULTS_DIR=${LORA_BENCH_RESULTS_DIR:-bench/results}
mkdir -p "$RESULTS_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
if [ -z "${LORA_BENCH_STEM:-}" ]; then
    LORA_BENCH_STEM=$(cd bench && "$PY" -c 'import lkbench, torch; from lkbench import results as R; print(R.default_path(torch.device("cuda")).stem)')
fi
export LORA_BENCH_RESULTS_DIR=$RESULTS_DIR LORA_BENCH_STEM
RESULTS=$RESULTS_DIR/$LORA_BENCH_STEM.json
LOGS=$RESULTS_DIR/$LORA_BENCH_STEM.logs
mkdir -p "$LOGS"
failed=()

run() {  # run <stage> <command...>: tee the output to the stage's log, remember a failure
    local stage=$1; shift
    echo "=== [$stage] $* ($(date -u +%H:%M:%S) UTC)"
    "$@" 2>&1 | tee "$LOGS/$stage.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "=== [$stage] FAILED with exit status $rc (log: $LOGS/$stage.log)" >&2
        failed+=("$stage")
    fi
}

for stage in "${stages[@]}"; do
    case $stage in
        check)
            run check bash -c "nvidia-smi || true; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'" ;;
        tests)
            run tests "$PY" -m pytest -m gpu tests -q -p no:cacheprovider ;;
        headline)
            run headline "$PY" bench/collect.py --grid headline ;;
        e2e)
            run e2e "$PY" bench/collect.py --no-ops --e2e "${LORA_BENCH_E2E_PRESETS:-llama-2048,llama-4096}" ;;
        suite)
            run suite env LORA_BENCH_GRID=headline "$PY" -m pytest bench/ -q -p no:cacheprovider \
                --benchmark-json="$RESULTS_DIR/$LORA_BENCH_STEM.pytest-benchmark.json" \
                --benchmark-group-by=group --benchmark-columns=median,min,max,rounds ;;
        full)
            run full "$PY" bench/collect.py --grid full --passes fwdbwd --warmup 3 --reps 10 --skip-existing \
                --budget-s "${LORA_BENCH_FULL_BUDGET_S:-1500}" ;;
        report)
            if [ -f "$RESULTS" ]; then run report "$PY" bench/report.py "$RESULTS"
            else echo "=== [report] no $RESULTS to report on" >&2; failed+=(report); fi ;;
        *)
            echo "run_gpu.sh: unknown stage '$stage' (check tests headline e2e suite full report)" >&2
            exit 2 ;;
    esac
done

echo
echo "run_gpu.sh: results in $RESULTS_DIR:"
ls -1 "$RESULTS_DIR" | grep -F "$LORA_BENCH_STEM" | sed 's/^/  /'
if [ ${#failed[@]} -ne 0 ]; then
    echo "run_gpu.sh: FAILED stage(s): ${failed[*]}" >&2
    exit 1
fi
echo "run_gpu.sh: all stages passed"
