"""Test setup: without a GPU the Triton kernels run on CPU under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""
import os
import sys

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreter_problem():
    """Why Triton's interpreter cannot run the kernels here, or None.

    triton < 3.9's interpreter turns a loop bound into a Python int with int() on a 1-element array, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every kernel with
    a loop fails. The GPU image pairs triton 3.6 with numpy 2.5 (compiled kernels are unaffected). Probed with
    such a loop rather than guessed from version numbers, so a fixed triton or numpy passes on its own merits.
    """
    try:
        import triton
        import triton.language as tl
    except ImportError:  # no triton (e.g. not Linux): the Triton tests skip themselves
        return None

    @triton.jit
    def _loop_bound_probe(x_ptr, n):
        acc = 0.0
        for i in range(n):
            acc += tl.load(x_ptr + i)
        tl.store(x_ptr, acc)

    x = torch.ones(2)
    try:
        _loop_bound_probe[(1,)](x, 2)
    except Exception as err:  # noqa: BLE001 - any failure here means no interpreter test can pass
        import numpy

        fix = (" Install numpy<2.4 beside this triton (pip install 'numpy<2.4'), or triton>=3.9."
               if "0-dimensional" in str(err) else "")
        return (f"Triton's interpreter cannot run a kernel loop here (triton {triton.__version__}, numpy "
                f"{numpy.__version__}): {err}.{fix}")
    return None


def pytest_sessionstart(session):
    problem = _interpreter_problem() if os.environ.get("TRITON_INTERPRET") == "1" else None
    if problem:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)


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


@pytest.fixture(autouse=True)
def _bnb_reference_in_compute_dtype():
    """bitsandbytes' Linear4bit, in eval mode without grad on a CPU with AVX512-BF16, repacks its weight into a
    CPU-only layout and multiplies in bfloat16 (~1e-2 off on unit-scale logits), on other CPUs in the compute
    dtype: PEFT's QLoRA outputs, our tests' reference, would then depend on the CPU. Layers built during a test
    take the compute-dtype path everywhere (bnb reads the flag per module at construction). The refusal of a
    repacked weight by our kernels is tested in test_qlora_dequant.py."""
    modules = sys.modules.get("bitsandbytes.nn.modules")   # imported at collection by the files that use bnb
    if modules is None:
        yield
        return
    mp = pytest.MonkeyPatch()   # its own: a test's monkeypatch.undo() must not drop it
    mp.setattr(modules, "has_avx512bf16", lambda: False)
    yield
    mp.undo()


@pytest.fixture(scope="session", autouse=True)
def _gpu_like_autotune_session():
    """LORA_KERNELS_GPU_LIKE_AUTOTUNE=first|last runs the whole session in the GPU-like autotune mode (below)."""
    winner = os.environ.get("LORA_KERNELS_GPU_LIKE_AUTOTUNE")
    if not winner or os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import gpu_like_autotune as mode

    disable = mode.enable(winner)
    yield
    disable()


@pytest.fixture
def gpu_like_autotune():
    """Every autotuned kernel gets several configs and a stub timer (tests/gpu_like_autotune.py), so the
    autotuner benchmarks and its hooks run as on a GPU; switched off (tuning caches cleared) afterwards."""
    import gpu_like_autotune as mode

    disable = mode.enable("last")
    yield mode
    disable()


@pytest.fixture
def count_kernel_calls(monkeypatch):
    """A list that gets one entry per fused_lora_linear call made by a fused PEFT layer or a FusedLoraLinear."""
    from lora_kernels.integrations import peft as lk_peft
    from lora_kernels.layers import dense as lk_dense

    calls = []
    for module in (lk_dense, lk_peft):
        real = module.fused_lora_linear

        def counting(*args, _real=real, **kwargs):
            calls.append(1)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "fused_lora_linear", counting)
    return calls


@pytest.fixture
def fresh_gemm_choices(monkeypatch):
    """No LORA_KERNELS_GEMM from the environment, and gemm_dispatch's per-shape choices cleared before and after:
    each test sees auto measure (or not) from nothing."""
    from lora_kernels.backends import gemm_dispatch

    monkeypatch.delenv("LORA_KERNELS_GEMM", raising=False)
    gemm_dispatch.clear_gemm_choices()
    yield
    gemm_dispatch.clear_gemm_choices()


@pytest.fixture
def cli_defaults(monkeypatch):
    """The CLI tests' setting: the torch backend (multi-step runs stay quick; the kernels are tested op by op),
    and torch's thread count put back afterwards (finetune sets it for the process it runs in)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
