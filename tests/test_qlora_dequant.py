"""4-bit dequantization against bitsandbytes, bit for bit: our Triton helper (ops/dequant_4bit.py, under the
interpreter on CPU) and our PyTorch dequantization (ops/format_4bit.py), over every byte and absmax code, NF4 and FP4,
double quantization on and off, every blocksize bitsandbytes accepts, odd shapes.

The reference is bitsandbytes' generic PyTorch dequantization (`bnb_dequantize` below), which bnb documents as
matching its CUDA kernel. bnb's public `dequantize_4bit` on CPU dispatches, for even in_features, to a native kernel
whose result depends on the CPU: on AVX512 machines it reads the wrong scale for blocks that cross rows, so it is
no oracle. Signed zeros: FP4 code 8 is -0.0 in bnb's table and its CUDA kernel keeps the sign, as ours do; bnb's
generic and CPU kernels give +0.0. Comparisons with bnb therefore treat -0.0 and +0.0 as one value, and
`test_fp4_negative_zero_follows_bnbs_cuda_kernel` checks the sign against the nibbles.
"""
import pytest
import torch

bf = pytest.importorskip("bitsandbytes.functional")

from lora_kernels.ops.format_4bit import BLOCKSIZES, code_table, dequantize, from_bnb  # noqa: E402

SHAPES = [(33, 47), (24, 130), (3, 4099), (40, 64)]   # odd N·K, rows spanning blocks, K > 4096, even
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def quantized_case(shape, quant_type, double_quant, blocksize, dtype, seed=0):
    """bnb-quantized random W, then every byte value written into the packed data and every uint8 absmax code
    into the absmax (double quant), so all 16 × 16 nibble pairs and all 256 nested codes are dequantized."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    packed, qs = bf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    flat = packed.view(-1)
    flat.copy_((torch.arange(flat.numel()) * 7 + seed) % 256)   # a stride coprime with 256 covers every byte
    if double_quant:
        qs.absmax.copy_((torch.arange(qs.absmax.numel()) * 5 + 3) % 256)
    else:
        qs.absmax.mul_(torch.rand(qs.absmax.shape, generator=g) + 0.5)
    return packed, qs


def bnb_dequantize(packed, qs):
    """bitsandbytes' dequantization of (packed, qs) by its generic PyTorch kernel (module docstring: why not its
    public dequantize_4bit on CPU); the nested absmax as bnb's dequantize_4bit computes it."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = qs.absmax
    if qs.nested:
        absmax = bf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax.float(),
                                    _get_4bit_code(qs.quant_type, packed.device), qs.blocksize, qs.shape, qs.dtype)


def same_bits(got, want, signed_zero=True):
    if not signed_zero:
        got, want = got + 0.0, want + 0.0   # -0.0 + 0.0 = +0.0
    return got.dtype == want.dtype and torch.equal(got.view(BITS[got.dtype]), want.view(BITS[want.dtype]))


def test_code_tables_are_bitsandbytes():
    for qt in ("nf4", "fp4"):
        assert torch.equal(code_table(qt, "cpu"), bf.get_4bit_type(qt, device="cpu"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dequant_bit_exact(quant_type, double_quant, blocksize, dtype):
    from lora_kernels.ops.dequant_4bit import dequantize_4bit

    for i, shape in enumerate(SHAPES):
        packed, qs = quantized_case(shape, quant_type, double_quant, blocksize, dtype, seed=i)
        want = bnb_dequantize(packed, qs)
        got = dequantize_4bit(from_bnb(packed, qs), dtype)
        assert got.shape == shape and same_bits(got, want, signed_zero=False), shape


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_dequant_bit_exact(quant_type, double_quant, dtype):
    for blocksize in BLOCKSIZES:
        for i, shape in enumerate(SHAPES):
            packed, qs = quantized_case(shape, quant_type, double_quant, blocksize, dtype, seed=i)
            want = bnb_dequantize(packed, qs)
            got = dequantize(from_bnb(packed, qs), dtype)
            assert same_bits(got, want, signed_zero=False), (blocksize, shape)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fp4_negative_zero_follows_bnbs_cuda_kernel(impl):
    """FP4 code 8 is -0.0 in bnb's table and its CUDA kernel keeps the sign; bnb's generic kernel and its AVX512
    CPU kernel give +0.0, so the sign is checked against the nibbles themselves, the values against bnb."""
    from lora_kernels.ops.dequant_4bit import dequantize_4bit

    packed, qs = quantized_case((16, 64), "fp4", False, 64, torch.float32)
    got = (dequantize_4bit if impl == "triton" else dequantize)(from_bnb(packed, qs), torch.float32)
    assert same_bits(got, bnb_dequantize(packed, qs), signed_zero=False)
    flat = packed.view(-1)
    nibbles = torch.stack([flat >> 4, flat & 15], dim=1).reshape(got.shape)
    negative_zero = got.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)
    assert (nibbles == 8).any() and torch.equal(negative_zero, nibbles == 8)


def test_params4bit_and_bad_quant_states():
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(40, 24, bias=False, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(torch.randn(24, 40), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)._quantize("cpu")
    qw = from_bnb(lin.weight)
    assert qw.shape == (24, 40) and qw.double_quant and qw.packed.data_ptr() == lin.weight.data_ptr()
    assert same_bits(dequantize(qw, torch.float32), bnb_dequantize(lin.weight.data, lin.weight.quant_state))
    qs = lin.weight.quant_state
    with pytest.raises(ValueError, match="no bitsandbytes quant_state"):
        from_bnb(torch.zeros(480, 1, dtype=torch.uint8))
    qs.quant_type = "int4"
    with pytest.raises(ValueError, match="quant_type 'int4'"):
        from_bnb(lin.weight)
    qs.quant_type, qs.blocksize = "nf4", 48
    with pytest.raises(ValueError, match="blocksize 48"):
        from_bnb(lin.weight)
    qs.blocksize = 64

    class OldState:   # a QuantState from another bnb version: no state2 / offset fields
        absmax, blocksize, quant_type, shape, code = qs.absmax, 64, "nf4", qs.shape, qs.code

    with pytest.raises(ValueError, match="unsupported bitsandbytes QuantState.*lacks offset, state2"):
        from_bnb(lin.weight.data, OldState())


@pytest.mark.parametrize("double_quant", [True, False])
def test_weight_repacked_by_bnb_cpu_inference_is_refused(double_quant):
    """bnb's eval-mode CPU path (AVX512-BF16 machines) repacks a Linear4bit's bytes into another layout and, with
    double quantization, drops state2: the kernels must say so, not read the bytes as the standard layout."""
    bnb = pytest.importorskip("bitsandbytes")
    w = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4",
                          compress_statistics=double_quant)._quantize("cpu")
    packed, qs = bf._convert_weight_packed_for_cpu(w.data, w.quant_state)
    with pytest.raises(ValueError, match="repacked by bitsandbytes' CPU inference path"):
        from_bnb(packed, qs)
