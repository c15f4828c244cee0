"""The optional CUDA extension (csrc/, lora_kernels._cuda) and its backend (lora_kernels/backends/cuda.py).

On CPU (no GPU, CPU torch), what can be checked is checked:
  * csrc/philox.cuh, compiled with g++ into a tiny driver, reproduces Triton's dropout mask bit for bit:
    the random words of ops/dropout.py's dropout_bits and the keep decisions of its dropout_keep, run under
    Triton's interpreter, for several seeds (also > 2**32) and Philox counters beyond 2**32;
  * every csrc source compiles with the flags torch's BuildExtension passes (nvcc for .cu, the host
    compiler for .cpp) against the installed torch's headers; skipped when nvcc is absent;
  * CudaLoraLinear's autograd glue, with a stand-in for the compiled module that implements its functions
    in torch using the Triton mask, matches the float64 oracle; and a missing build raises clearly.
On a CUDA machine with the extension built (tests marked gpu): every extension function against the
float64 oracle and its mask against the Triton mask on device, and CudaLoraLinear end to end.
"""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from lora_kernels.backends import cuda as cuda_backend

from helpers import TOL, keep_mask, make_case, oracle, rel_err, seed_for

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HOST_EMULATION = ROOT / "tests" / "cuda_host_emulation" / "kernel_emulation.cpp"

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lora_kernels.ops.dropout import drop_threshold, dropout_bits, dropout_keep, dropout_mask  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Philox: csrc/philox.cuh (g++) against Triton
# ----------------------------------------------------------------------------------------------

_DRIVER = r"""
#include <cstdio>
#include "philox.cuh"
// stdin: queries "seed row_start M K p"; stdout per query: M*K random words (hex), then M*K keep flags
// (0/1), for rows [row_start, row_start + M) of a logical (*, K) tensor.
int main() {
  long long seed, row_start, M, K;
  double p;
  while (std::scanf("%lld %lld %lld %lld %lf", &seed, &row_start, &M, &K, &p) == 5) {
    const int32_t threshold = lora_kernels::drop_threshold(p);
    for (long long m = 0; m < M; ++m)
      for (long long k = 0; k < K; ++k)
        std::printf("%08x ", lora_kernels::dropout_bits(static_cast<uint64_t>(seed), row_start + m, k, K));
    std::printf("\n");
    for (long long m = 0; m < M; ++m)
      for (long long k = 0; k < K; ++k)
        std::printf("%d", lora_kernels::dropout_keep(static_cast<uint64_t>(seed), row_start + m, k, K, threshold)
                              ? 1 : 0);
    std::printf("\n");
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def philox_cpp(builds):
    """Run csrc/philox.cuh on the host: f(queries) -> [(uniform bits int64 (M, K), keep bool (M, K))]."""
    exe = builds.wait("philox_driver")

    def run(queries):
        inp = "".join(f"{s} {r0} {M} {K} {p!r}\n" for s, r0, M, K, p in queries)
        lines = subprocess.run([str(exe)], input=inp, capture_output=True, text=True, check=True).stdout.splitlines()
        out = []
        for i, (_, _, M, K, _) in enumerate(queries):
            bits = torch.tensor([int(t, 16) for t in lines[2 * i].split()], dtype=torch.int64).reshape(M, K)
            keep = torch.tensor([c == "1" for c in lines[2 * i + 1]], dtype=torch.bool).reshape(M, K)
            out.append((bits, keep))
        return out

    return run


@triton.jit
def _rand_rows_kernel(seed_ptr, bits_ptr, keep_ptr, row_start, M, K, threshold, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """dropout_bits and dropout_keep for rows [row_start, row_start + M) of a logical (*, K) tensor."""
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    rows = row_start + local.to(tl.int64)
    seed = tl.load(seed_ptr)
    bits = dropout_bits(seed, rows, col0, K, BLOCK_K)
    keep = dropout_keep(seed, rows, col0, K, threshold, BLOCK_K)
    ok = (local < M)[:, None] & (cols < K)[None, :]
    out = local.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(bits_ptr + out, bits.to(tl.int64), mask=ok)
    tl.store(keep_ptr + out, keep.to(tl.int8), mask=ok)


def triton_rand_rows(seed, row_start, M, K, p, device="cpu"):
    """(random words int64 (M, K), keep bool (M, K)) from Triton (the interpreter on CPU)."""
    bits = torch.empty((M, K), dtype=torch.int64, device=device)
    keep = torch.empty((M, K), dtype=torch.int8, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    grid = (triton.cdiv(M, 16), triton.cdiv(K, 32))
    _rand_rows_kernel[grid](seed_t, bits, keep, row_start, M, K, drop_threshold(p), BLOCK_M=16, BLOCK_K=32)
    return bits, keep.bool()


MASK_CASES = [  # (seed, M, K, p)
    (0, 37, 53, 0.1),
    (12345, 64, 100, 0.5),
    (2**31 - 2, 5, 1000, 0.25),  # the largest seed draw_seed produces
    (987654321, 33, 65, 0.9),
]


def test_philox_header_reproduces_triton_dropout_mask(philox_cpp):
    results = philox_cpp([(s, 0, M, K, p) for s, M, K, p in MASK_CASES])
    for (seed, M, K, p), (_, keep) in zip(MASK_CASES, results):
        want = dropout_mask(torch.tensor([seed], dtype=torch.int64), M, K, p)
        assert torch.equal(keep, want), f"mask differs for seed={seed} M={M} K={K} p={p}"
        assert 0 < keep.sum() < keep.numel()


LARGE_OFFSET_CASES = [  # (seed, row_start, M, K, p): Philox counters row*ceil(K/4) + col//4 at and far beyond 2**32
    (7, 2**32 // 250 - 2, 5, 1000, 0.3),  # crosses 2**32 inside the block
    (2**31 - 2, 2**33 // 20 - 1, 3, 77, 0.5),
    (424242, 2**45 // 250, 2, 1000, 0.1),
    (2**40 + 3, 2**36 // 24, 3, 96, 0.2),  # a seed above 2**32: both key words in play
    (-5, 12, 4, 40, 0.6),  # a negative int64 seed is reinterpreted as uint64 by both
]


def test_philox_header_reproduces_triton_rand_bits_beyond_2_32(philox_cpp):
    # One block straddles 2**32 (both 32-bit counters change inside it); others lie far beyond it.
    assert any(r0 * -(-K // 4) < 2**32 <= (r0 + M) * -(-K // 4) for _, r0, M, K, _ in LARGE_OFFSET_CASES)
    results = philox_cpp(LARGE_OFFSET_CASES)
    for (seed, r0, M, K, p), (bits, keep) in zip(LARGE_OFFSET_CASES, results):
        want_bits, want_keep = triton_rand_rows(seed, r0, M, K, p)
        assert torch.equal(bits, want_bits), f"random words differ for seed={seed} rows {r0}+{M} K={K}"
        assert torch.equal(keep, want_keep), f"keep differs for seed={seed} rows {r0}+{M} K={K}"


def test_philox_header_keep_at_the_threshold(philox_cpp):
    """An element whose top 24 random bits equal drop_threshold(p) is kept (>=), one above is dropped, in both
    implementations."""
    seed, K = 99, 64
    (bits, _), = philox_cpp([(seed, 0, 1, K, 0.5)])
    top = int(bits[0, 10]) >> 8
    for p, kept in ((top / 2**24, True), ((top + 1) / 2**24, False)):  # exact doubles: the threshold is top (+1)
        (_, keep), = philox_cpp([(seed, 0, 1, K, p)])
        want = dropout_mask(torch.tensor([seed]), 1, K, p)
        assert bool(keep[0, 10]) == kept and bool(want[0, 10]) == kept
        assert torch.equal(keep, want)


# ----------------------------------------------------------------------------------------------
# compile check: csrc/ with the flags of torch's BuildExtension
# ----------------------------------------------------------------------------------------------

def _setup_sources():
    text = (ROOT / "setup.py").read_text()
    m = re.search(r'name="lora_kernels\._cuda",\s*sources=\[([^\]]*)\]', text)
    assert m, "setup.py no longer declares the lora_kernels._cuda CUDAExtension sources"
    return re.findall(r'"([^"]+)"', m.group(1))


def test_setup_lists_every_csrc_source():
    sources = _setup_sources()
    for s in sources:
        assert (ROOT / s).is_file(), f"setup.py lists {s}, which does not exist"
    on_disk = sorted(str(p.relative_to(ROOT)) for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))
    assert sorted(sources) == on_disk, f"setup.py sources {sources} != csrc translation units {on_disk}"


def _cuda_home():
    nvcc = shutil.which("nvcc")
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 nvcc and str(Path(os.path.realpath(nvcc)).parents[1])):
        if cand and (Path(cand) / "include" / "cuda_runtime_api.h").is_file():
            return Path(cand)
    return None


def _host_cxx():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _extension_compile_commands(tmp_path):
    """({source: argv} compiling each csrc translation unit as BuildExtension would, or {}, skip reason)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {}, "nvcc not found: the CUDA extension sources cannot be compile-checked here"
    cuda_home = _cuda_home()
    if cuda_home is None:
        return {}, "CUDA headers (cuda_runtime_api.h) not found in CUDA_HOME, /usr/local/cuda or next to nvcc"
    cxx = _host_cxx()
    if cxx is None:
        return {}, "no host C++ compiler"
    torch_inc = Path(torch.__file__).parent / "include"
    if not (torch_inc / "torch" / "csrc" / "utils" / "pybind.h").is_file():
        return {}, f"torch's C++ headers are not installed under {torch_inc}"
    includes = [f"-I{torch_inc}", f"-I{torch_inc / 'torch' / 'csrc' / 'api' / 'include'}",
                f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_home / 'include'}"]
    # torch's CPU wheel lacks this generated header of c10/cuda (a CUDA build ships it); the real build
    # never needs the shim, which only defines what the CUDA wheel's copy defines.
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{tmp_path / 'shim'}")
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_cuda",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    # torch.utils.cpp_extension.COMMON_NVCC_FLAGS + setup.py's extra_compile_args, warnings as errors.
    nvcc_flags = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                  "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
                  "--compiler-options", "-fPIC", "-O3", "--use_fast_math", "-arch=sm_90", "-Werror",
                  "all-warnings", std]
    cmds = {}
    for src in _setup_sources():
        obj = tmp_path / (Path(src).name + ".o")
        if src.endswith(".cu"):
            cmds[src] = [nvcc, "-c", str(ROOT / src), "-o", str(obj)] + includes + defines + nvcc_flags
        else:
            cmds[src] = [cxx, "-c", str(ROOT / src), "-o", str(obj), "-fPIC", "-O3", "-Wall", "-Werror", std] \
                + includes + defines
    return cmds, None


class _Builds:
    """Every host/nvcc compile this module needs, started together in the background (they are most of its
    run time, and they overlap with each other and with the Triton-interpreter tests)."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.jobs = {}  # name -> (argv, Popen, product path)
        self.skips = {}  # name -> reason

    def start(self, name, argv, product):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.jobs[name] = (argv, proc, product)

    def wait(self, name):
        if name in self.skips:
            pytest.skip(self.skips[name])
        argv, proc, product = self.jobs[name]
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name} failed to compile:\n$ {' '.join(map(str, argv))}\n{out[-8000:]}"
        return product

    def close(self):
        for _, proc, _ in self.jobs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    b = _Builds(tmp_path_factory.mktemp("csrc_builds"))
    cxx = _host_cxx()
    # The Philox driver: only the header and a C++17 compiler. No -ffast-math: the host build must round
    # like the device (float(int32) and one float32 multiply).
    if cxx is None:
        b.skips["philox_driver"] = "no C++ compiler (g++/c++/clang++) to build the Philox driver"
    else:
        src = b.tmp / "philox_driver.cpp"
        src.write_text(_DRIVER)
        exe = b.tmp / "philox_driver"
        b.start("philox_driver", [cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{CSRC}", str(src), "-o", str(exe)],
                exe)
    # The kernels under host emulation: needs the CUDA headers (cuda_fp16.h, cuda_bf16.h) and C++20 <barrier>.
    cuda_home = _cuda_home()
    if cxx is None or cuda_home is None:
        b.skips["kernel_emulation"] = "needs a host C++20 compiler and the CUDA toolkit headers (cuda_fp16.h)"
    else:
        exe = b.tmp / "kernel_emulation"
        b.start("kernel_emulation", [cxx, "-std=c++20", "-O2", "-pthread", f"-I{cuda_home / 'include'}", f"-I{CSRC}",
                                     str(HOST_EMULATION), "-o", str(exe)], exe)
    cmds, reason = _extension_compile_commands(b.tmp)
    for src in _setup_sources():
        if reason:
            b.skips[src] = reason
        else:
            b.start(src, cmds[src], b.tmp / (Path(src).name + ".o"))
    yield b
    b.close()


@pytest.mark.parametrize("src", _setup_sources())
def test_cuda_extension_source_compiles(builds, src):
    """Each source of setup.py's CUDAExtension compiles with BuildExtension's flags (and -Werror)."""
    assert builds.wait(src).is_file()


def test_kernels_under_host_emulation(builds):
    """The CUDA kernels, run on the host (tests/cuda_host_emulation/kernel_emulation.cpp), match a float64 reference."""
    exe = builds.wait("kernel_emulation")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert "0 failure(s)" in run.stdout


# ----------------------------------------------------------------------------------------------
# CudaLoraLinear on CPU, with a torch stand-in for the compiled module
# ----------------------------------------------------------------------------------------------

class _TorchStandIn:
    """lora_kernels._cuda's contract written in torch (float32 math), with the Triton mask."""

    @staticmethod
    def _dropped(x2, seed, p):
        xf = x2.float()
        if p > 0:
            xf = xf * dropout_mask(seed, x2.shape[0], x2.shape[1], p).float() / (1.0 - p)
        return xf

    @staticmethod
    def dropout_shrink(x, A, seed, p):
        assert x.dim() == 2 and x.stride(1) == 1 and A.dtype in (torch.float32, x.dtype)
        return _TorchStandIn._dropped(x, seed, p) @ A.float().t()

    @staticmethod
    def dropout_grad_a(dyb, x, seed, p, scaling):
        assert dyb.dtype == torch.float32 and x.stride(1) == 1
        return scaling * (dyb.t() @ _TorchStandIn._dropped(x, seed, p))

    @staticmethod
    def lora_dx_epilogue(grad_x, dyb, A, seed, p, scaling):
        assert grad_x.is_contiguous() and dyb.dtype == torch.float32
        term = scaling * (dyb @ A.float())
        if p > 0:
            term = term * dropout_mask(seed, grad_x.shape[0], grad_x.shape[1], p).float() / (1.0 - p)
        grad_x.copy_((grad_x.float() + term).to(grad_x.dtype))
        return grad_x


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_load_extension", lambda: _TorchStandIn)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_lora_linear_glue_matches_oracle(stand_in, p, bias):
    case = make_case((2, 5), K=24, N=20, r=4, dtype=torch.float32, bias=bias, seed=3)
    x = case["x"].requires_grad_(True)
    A = case["lora_A"].requires_grad_(True)
    B = case["lora_B"].requires_grad_(True)
    seed = seed_for(11)
    torch.manual_seed(11)
    y = cuda_backend.CudaLoraLinear.apply(x, case["weight"], case["bias"], A, B, case["scaling"], p)
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = keep_mask("triton", seed, x.shape, p) if p > 0 else None
    y_ref, g_ref = oracle(case, mask=mask, p=p, dy=dy)
    tol = TOL[torch.float32]
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, g_ref["x"]) < tol
    assert rel_err(A.grad, g_ref["lora_A"]) < tol
    assert rel_err(B.grad, g_ref["lora_B"]) < tol


@pytest.mark.parametrize("lead,transpose", [((3, 4), True), ((), False), ((0, 5), False)])
def test_cuda_lora_linear_glue_layouts_and_half(stand_in, lead, transpose):
    """float16 activations with float32 adapters; a transposed (T, B, K) view, a 1-D x and an empty batch."""
    case = make_case(lead, K=16, N=12, r=3, dtype=torch.float16, ab_dtype=torch.float32, seed=5)
    x = case["x"].transpose(0, 1) if transpose else case["x"]
    case["x"] = x
    x.requires_grad_(True)
    A = case["lora_A"].requires_grad_(True)
    B = case["lora_B"].requires_grad_(True)
    seed = seed_for(3)
    torch.manual_seed(3)
    y = cuda_backend.CudaLoraLinear.apply(x, case["weight"], case["bias"], A, B, case["scaling"], 0.25)
    assert y.shape == (*x.shape[:-1], 12) and y.dtype == torch.float16
    dy = torch.randn_like(y)
    y.backward(dy)
    assert x.grad.shape == x.shape and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    if x.numel() == 0:
        assert not A.grad.any() and not B.grad.any()
        return
    mask = keep_mask("triton", seed, x.shape, 0.25)
    y_ref, g_ref = oracle(case, mask=mask, p=0.25, dy=dy)
    tol = TOL[torch.float16]
    assert rel_err(y, y_ref) < tol
    for got, name in ((x.grad, "x"), (A.grad, "lora_A"), (B.grad, "lora_B")):
        assert rel_err(got, g_ref[name]) < tol, name


def test_cuda_lora_linear_glue_saves_no_mask_or_copy(stand_in):
    case = make_case((3,), K=16, N=8, r=2, dtype=torch.float32, seed=1)
    x = case["x"].requires_grad_(True)
    A = case["lora_A"].requires_grad_(True)
    B = case["lora_B"].requires_grad_(True)
    y = cuda_backend.CudaLoraLinear.apply(x, case["weight"], case["bias"], A, B, case["scaling"], 0.5)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 6
    assert saved[0] is x or saved[0].data_ptr() == x.data_ptr()
    assert saved[1].shape == (3, 2) and saved[1].dtype == torch.float32  # xa
    assert saved[2].shape == (1,) and saved[2].dtype == torch.int64  # seed
    assert not any(t.dtype == torch.bool or (t.shape == x.shape and t.data_ptr() != x.data_ptr()) for t in saved)


def test_cuda_backend_without_extension_raises_clearly():
    if cuda_backend.extension_available():
        pytest.skip("lora_kernels._cuda is built here")
    case = make_case((2,), K=8, N=4, r=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="lora_kernels._cuda.*not built"):
        cuda_backend.CudaLoraLinear.apply(case["x"], case["weight"], case["bias"], case["lora_A"], case["lora_B"],
                                          1.0, 0.0)


# ----------------------------------------------------------------------------------------------
# GPU: the compiled extension
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def ext():
    if not cuda_backend.extension_available():
        pytest.skip("lora_kernels._cuda is not built (pip install with a CUDA torch and nvcc)")
    return cuda_backend.cuda_extension()


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device="cuda")


def _ref_mask(seed, M, K, p):
    return dropout_mask(seed, M, K, p).double() / (1.0 - p) if p > 0 else torch.ones(M, K, device="cuda",
                                                                                    dtype=torch.float64)


def _strided_rows(M, K, dtype, pad, gen):
    """An (M, K) view with row stride K + pad (pad = 0: contiguous)."""
    base = torch.randn(M, K + pad, generator=gen, device="cuda").to(dtype)
    return base[:, :K]


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("seed,M,K,p", MASK_CASES + [(31337, 1000, 4096, 0.1)])
def test_gpu_mask_matches_triton(ext, seed, M, K, p):
    s = _seed(seed)
    assert torch.equal(ext.dropout_mask(s, M, K, p), dropout_mask(s, M, K, p))


@pytest.mark.gpu
@pytest.mark.parametrize("seed,r0,M,K,p", LARGE_OFFSET_CASES)
def test_gpu_mask_matches_triton_beyond_2_32(ext, seed, r0, M, K, p):
    _, want = triton_rand_rows(seed, r0, M, K, p, device="cuda")
    assert torch.equal(ext.dropout_mask(_seed(seed), M, K, p, r0), want)


GPU_SHAPES = [(1, 8, 1), (67, 200, 8), (300, 256, 16), (130, 96, 40), (257, 128, 100)]  # (M, K, r)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,r", GPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("a_fp32", [True, False])
@pytest.mark.parametrize("pad", [0, 3])
def test_gpu_dropout_shrink(ext, M, K, r, dtype, p, a_fp32, pad):
    g = torch.Generator(device="cuda").manual_seed(M * K + r)
    x = _strided_rows(M, K, dtype, pad, g)
    A = (torch.randn(r, K, generator=g, device="cuda") * K ** -0.5).to(torch.float32 if a_fp32 else dtype)
    s = _seed(1234 + M)
    xa = ext.dropout_shrink(x, A, s, p)
    assert xa.shape == (M, r) and xa.dtype == torch.float32
    ref = (x.double() * _ref_mask(s, M, K, p)) @ A.double().t()
    assert rel_err(xa, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,r", GPU_SHAPES + [(5000, 264, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("pad", [0, 3])
def test_gpu_dropout_grad_a(ext, M, K, r, dtype, p, pad):
    g = torch.Generator(device="cuda").manual_seed(M + K + r)
    x = _strided_rows(M, K, dtype, pad, g)
    dyb = torch.randn(M, r, generator=g, device="cuda")
    s = _seed(77 + K)
    grad_a = ext.dropout_grad_a(dyb, x, s, p, 1.5)
    assert grad_a.shape == (r, K) and grad_a.dtype == torch.float32
    ref = 1.5 * dyb.double().t() @ (x.double() * _ref_mask(s, M, K, p))
    assert rel_err(grad_a, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,r", GPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("a_fp32", [True, False])
def test_gpu_lora_dx_epilogue(ext, M, K, r, dtype, p, a_fp32):
    g = torch.Generator(device="cuda").manual_seed(M * r + K)
    grad_x = _strided_rows(M, K, dtype, 5, g)  # written in place through a strided view
    before = grad_x.double().clone()
    dyb = torch.randn(M, r, generator=g, device="cuda")
    A = (torch.randn(r, K, generator=g, device="cuda") * r ** -0.5).to(torch.float32 if a_fp32 else dtype)
    s = _seed(5 + M)
    out = ext.lora_dx_epilogue(grad_x, dyb, A, s, p, 0.75)
    assert out.data_ptr() == grad_x.data_ptr()
    ref = before + 0.75 * (dyb.double() @ A.double()) * _ref_mask(s, M, K, p)
    assert rel_err(grad_x, ref) < TOL[dtype]
    if p > 0:  # dropped elements are left exactly as they were
        dropped = ~dropout_mask(s, M, K, p)
        assert torch.equal(grad_x.double()[dropped], before[dropped])


@pytest.mark.gpu
def test_gpu_extension_errors(ext):
    x = torch.randn(4, 8, device="cuda")
    A = torch.randn(2, 8, device="cuda")
    s = _seed(1)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ext.dropout_shrink(x.cpu(), A.cpu(), s.cpu(), 0.1)
    with pytest.raises(RuntimeError, match="unit stride"):
        ext.dropout_shrink(x.t(), A[:, :4], s, 0.1)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ext.dropout_shrink(x.double(), A, s, 0.1)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        ext.dropout_shrink(x, A, s, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        ext.dropout_shrink(x, A, s.int(), 0.1)
    with pytest.raises(RuntimeError, match="A must have shape"):
        ext.dropout_shrink(x, A[:, :5], s, 0.1)
    with pytest.raises(RuntimeError, match="dyb must be float32"):
        ext.dropout_grad_a(torch.randn(4, 2, device="cuda").half(), x, s, 0.1, 1.0)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_cuda_lora_linear_matches_oracle(ext, dtype, p, bias):
    case = make_case((3, 37), K=200, N=136, r=16, dtype=dtype, ab_dtype=torch.float32, bias=bias, seed=2,
                     device="cuda")
    x = case["x"].requires_grad_(True)
    A = case["lora_A"].requires_grad_(True)
    B = case["lora_B"].requires_grad_(True)
    seed = seed_for(5, "cuda")
    torch.manual_seed(5)
    y = cuda_backend.CudaLoraLinear.apply(x, case["weight"], case["bias"], A, B, case["scaling"], p)
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = keep_mask("triton", seed, x.shape, p, device="cuda") if p > 0 else None
    y_ref, g_ref = oracle(case, mask=mask, p=p, dy=dy)
    tol = TOL[dtype] if dtype != torch.float32 else 2e-3  # cuBLAS may use TF32 for float32
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, g_ref["x"]) < tol
    assert rel_err(A.grad, g_ref["lora_A"]) < tol
    assert rel_err(B.grad, g_ref["lora_B"]) < tol


@pytest.mark.gpu
def test_gpu_cuda_and_triton_backends_drop_the_same_elements(ext):
    from lora_kernels.backends.triton import TritonLoraLinear

    case = make_case((64,), K=96, N=48, r=8, dtype=torch.float32, seed=4, device="cuda")
    outs = []
    for fn in (cuda_backend.CudaLoraLinear, TritonLoraLinear):
        torch.manual_seed(9)
        A = case["lora_A"].detach().clone().requires_grad_(True)
        y = fn.apply(case["x"], case["weight"], case["bias"], A, case["lora_B"], case["scaling"], 0.5)
        y.sum().backward()
        outs.append((y.detach(), A.grad))
    # Same seed, same mask: the results agree to rounding (a different mask would differ by O(1)).
    assert rel_err(outs[0][0], outs[1][0].double()) < 2e-3
    assert rel_err(outs[0][1], outs[1][1].double()) < 2e-3



def test_cuda_backend_compiles_fullgraph_through_its_custom_ops(stand_in):
    """The CUDA backend goes through the shared custom-op contract: torch.compile(fullgraph=True) traces it
    (fake implementations) and gives the eager results."""
    case = make_case((3, 4), K=16, N=12, r=4, dtype=torch.float32, seed=5)

    def step(x, A, B):
        return cuda_backend.CudaLoraLinear.apply(x, case["weight"], case["bias"], A, B, case["scaling"], 0.2)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        x, A, B = (case[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B"))
        torch.manual_seed(3)
        y = fn(x, A, B)
        y.square().sum().backward()
        results.append([y.detach(), x.grad, A.grad, B.grad])
    torch._dynamo.reset()
    for got, want in zip(*results):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)
