"""lora_kernels' benchmarks and GPU run tooling (not part of the installed package).

Run from the repository root as modules, e.g. `python -m bench.collect`, `python -m bench.report`,
`python -m bench.compare`, `bench/run_gpu.sh` (which runs `python -m bench.gpu_run`): the root on
sys.path is all they need, no install and no sys.path patching. Importing this package is cheap (no
torch): the GPU orchestrator imports it before it knows whether torch works at all.
"""
