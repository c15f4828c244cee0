"""pytest-benchmark suites of lora_kernels (run from the repository root: python -m pytest bench/
[--benchmark-disable]).

bench.lkbench is imported first: without a GPU it sets TRITON_INTERPRET=1 before anything imports triton,
and the grids fall back to tiny shapes, so the same suites are a CPU smoke test in CI.
"""
import bench.lkbench  # noqa: F401  (must precede any import of triton / lora_kernels)
import pytest
import torch


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Start every benchmark from LORA_KERNELS_BACKEND=auto; implementations set their own backend."""
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
