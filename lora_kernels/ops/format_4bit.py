"""4-bit base weights in bitsandbytes' format (QLoRA): the description the ops take, and the format itself.

Plain PyTorch, no Triton (the torch backend imports it): it lives in ops/ because the kernels' indexing depends on
it, and every layer above reaches it through backends/ (base.py re-exports it), as the layering wants.

bitsandbytes (bnb) stores a 4-bit weight W of shape (N, K) as:

    packed   ceil(N·K / 2) bytes (uint8, or the same bytes viewed as another `quant_storage` dtype): element i of
             W's row-major flattening is the high nibble of byte i // 2 when i is even, the low nibble when odd
    code     16 float32 values, the NF4 or FP4 table; a nibble q means code[q]
    absmax   one scale per `blocksize` consecutive elements of the flattening (blocks run across rows when
             K is not a multiple of blocksize): W[i] = code[q_i] · absmax[i // blocksize], in float32, then
             rounded once to the compute dtype
    double quantization ("compress_statistics", QLoRA's default): absmax itself is stored as uint8 codes into
             bnb's 256-entry dynamic map, with a float32 absmax per `nested_blocksize` (256) codes and one float32
             offset: absmax[j] = fl(fl(nested_code[a_j] · nested_absmax[j // 256]) + offset)

`QuantizedWeight` carries exactly those tensors (no float copy of W anywhere) plus the metadata; `from_bnb`
builds one from a bnb `Params4bit` (or packed data + `QuantState`) without importing bitsandbytes, and
`dequantize` is this package's own PyTorch dequantization (the torch backend, merges, a 4-bit layer's base-only
forward), bit for bit bnb's.
"""
import weakref
from typing import NamedTuple, Optional, Tuple

import torch

QUANT_TYPES = ("nf4", "fp4")
# The blocksizes bnb's quantize_4bit accepts (bitsandbytes 0.4x-0.50).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# NF4: quantiles of N(0, 1) (QLoRA paper), already in [-1, 1]. FP4: bnb's 1-bit sign, 2-bit exponent, 1-bit
# mantissa values in bit-pattern order, normalised by the largest (12) in float32 as bnb does; index 8 is -0.0.
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]

_tables = {}
_checked_codes = weakref.WeakValueDictionary()  # id -> code tensors already compared with ours


def code_table(quant_type: str, device) -> torch.Tensor:
    """The 16-entry float32 table of `quant_type` on `device` (cached: the kernels read it by pointer)."""
    key = (quant_type, str(device))
    if key not in _tables:
        raw = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
        _tables[key] = (raw / raw.abs().max()).to(device)
    return _tables[key]


class QuantizedWeight(NamedTuple):
    """A frozen (N, K) base weight in bnb's 4-bit format (module docstring). Tensors are bnb's own, not copies."""
    packed: torch.Tensor                  # ceil(N·K/2) bytes, any shape
    absmax: torch.Tensor                  # float32 (blocks,), or uint8 codes when double-quantized
    quant_type: str                       # "nf4" | "fp4"
    blocksize: int
    shape: Tuple[int, int]                # (out_features, in_features)
    nested_absmax: Optional[torch.Tensor] = None   # float32 (ceil(blocks / nested_blocksize),)
    nested_code: Optional[torch.Tensor] = None     # float32 (256,)
    offset: Optional[torch.Tensor] = None          # float32, 0-dim (or 1 element)
    nested_blocksize: int = 0

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self):
        """The tensors in a fixed order (Nones included): what the custom ops take."""
        return (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset)


def _bnb_version() -> str:
    import sys

    bnb = sys.modules.get("bitsandbytes")
    return getattr(bnb, "__version__", "unknown") if bnb is not None else "not imported"


def from_bnb(weight, quant_state=None) -> QuantizedWeight:
    """The QuantizedWeight of a bnb `Params4bit` (or of packed data and its `QuantState`). Nothing is copied.

    Raises ValueError naming what is wrong for a quant state this package cannot read: an unknown quant type,
    a blocksize bnb does not produce, a code table that is not bnb's NF4/FP4, a missing field (another
    bitsandbytes version's QuantState), or a weight that is not 2-D or not quantized yet.
    """
    qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("weight has no bitsandbytes quant_state: expected a quantized Params4bit (moved to its "
                         "device or loaded 4-bit) or packed data with a QuantState")
    # Before the field check: the repacking drops state2 of a double-quantized weight.
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("the Params4bit was repacked by bitsandbytes' CPU inference path (packing_format_for_cpu): "
                         "the kernels read bitsandbytes' standard 4-bit layout only")
    missing = [f for f in ("absmax", "blocksize", "quant_type", "shape", "code", "offset", "state2")
               if not hasattr(qs, f)]
    if missing:
        raise ValueError(f"unsupported bitsandbytes QuantState (bitsandbytes {_bnb_version()}): it lacks "
                         f"{', '.join(missing)}")
    if qs.quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {qs.quant_type!r} is not supported: the kernels read {' and '.join(QUANT_TYPES)}")
    if qs.blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {qs.blocksize!r} is not one bitsandbytes produces {BLOCKSIZES}")
    if qs.shape is None or len(qs.shape) != 2:
        raise ValueError(f"the quantized weight must be 2-D (out_features, in_features), got shape {qs.shape}")
    N, K = (int(s) for s in qs.shape)
    packed = weight if type(weight) is torch.Tensor else weight.data  # a Params4bit's plain packed bytes
    if packed.numel() * packed.element_size() != (N * K + 1) // 2:
        raise ValueError(f"packed data has {packed.numel() * packed.element_size()} bytes but shape {(N, K)} needs "
                         f"{(N * K + 1) // 2}: the weight is not (or no longer) 4-bit quantized")
    code = qs.code
    if code is None or code.numel() != 16:
        raise ValueError(f"the quant state's code table is not bitsandbytes' {qs.quant_type} table")
    # Compared once per table tensor (on a GPU the comparison syncs); torch.compile traces what eager checked.
    if not torch.compiler.is_compiling() and _checked_codes.get(id(code)) is not code:
        if not torch.equal(code.float().cpu(), code_table(qs.quant_type, "cpu")):
            raise ValueError(f"the quant state's code table is not bitsandbytes' {qs.quant_type} table")
        _checked_codes[id(code)] = code
    blocks = (N * K + qs.blocksize - 1) // qs.blocksize
    if qs.absmax.numel() != blocks:
        raise ValueError(f"absmax has {qs.absmax.numel()} entries but {(N, K)} in blocks of {qs.blocksize} "
                         f"needs {blocks}")
    if qs.state2 is None:
        if qs.absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 without double quantization, got {qs.absmax.dtype}")
        return QuantizedWeight(packed, qs.absmax, qs.quant_type, int(qs.blocksize), (N, K))
    s2 = qs.state2
    if qs.absmax.dtype != torch.uint8 or s2.code is None or s2.code.numel() != 256 or qs.offset is None:
        raise ValueError("unsupported double quantization: expected uint8 absmax codes, a 256-entry nested code "
                         f"and an offset (bitsandbytes {_bnb_version()})")
    if s2.absmax.dtype != torch.float32 or s2.absmax.numel() != (blocks + s2.blocksize - 1) // s2.blocksize:
        raise ValueError(f"nested absmax must be float32 with one entry per {s2.blocksize} absmax codes")
    offset = qs.offset if isinstance(qs.offset, torch.Tensor) else torch.tensor(float(qs.offset))
    return QuantizedWeight(packed, qs.absmax, qs.quant_type, int(qs.blocksize), (N, K), s2.absmax, s2.code,
                           offset.to(device=packed.device, dtype=torch.float32), int(s2.blocksize))


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] · scales[i // blocksize] in float32, without an index tensor of values' size."""
    n = values.numel()
    pad = (-n) % blocksize
    v = torch.cat((values, values.new_zeros(pad))) if pad else values
    return (v.view(-1, blocksize) * scales.view(-1, 1)).view(-1)[:n]


def absmax_float(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 per-block scales (the nested dequantization when double-quantized)."""
    if not qw.double_quant:
        return qw.absmax
    # Two separate roundings, as bnb does it (dequantize_blockwise, then += offset): never one fused multiply-add.
    return _blockwise(qw.nested_code[qw.absmax.long()], qw.nested_absmax, qw.nested_blocksize) + qw.offset.reshape(())


def dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """W (N, K) in `dtype`, equal bit for bit to bitsandbytes.functional.dequantize_4bit. A W-sized temporary:
    for the torch backend and merges only, never kept for backward."""
    return dequantize_rows(qw, 0, qw.shape[0], dtype)


def dequantize_rows(qw: QuantizedWeight, start: int, stop: int, dtype: torch.dtype,
                    scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows start:stop of W in `dtype`, the same values as `dequantize` (the same float32 products), touching only
    the quantization blocks those rows overlap. scales: absmax_float(qw), for a caller walking W in row blocks.

    Transient memory for R rows: about R·K·13 bytes (the nibbles, their int64 indices, the float32 product)."""
    N, K = qw.shape
    stop = min(stop, N)
    e0, e1 = start * K, stop * K
    bs = qw.blocksize
    b0, b1 = e0 // bs, -(-e1 // bs)
    s0, s1 = b0 * bs, min(b1 * bs, N * K)                # whole blocks (s0 even: bs is)
    b = qw.packed.reshape(-1).view(torch.uint8)[s0 // 2: (s1 + 1) // 2]
    nibbles = torch.stack((b >> 4, b & 15), dim=-1).reshape(-1)[: s1 - s0]
    scales = absmax_float(qw) if scales is None else scales
    w = _blockwise(code_table(qw.quant_type, b.device)[nibbles.long()], scales[b0:b1], bs)
    return w[e0 - s0: e1 - s0].to(dtype).view(stop - start, K)
