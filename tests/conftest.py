"""Test setup: without a GPU the Triton kernels run on CPU under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Each test starts from LORA_KERNELS_BACKEND=auto unless it sets its own."""
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
