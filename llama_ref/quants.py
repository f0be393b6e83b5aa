"""Vectorised dequantisation of GGUF tensor data with torch.

The byte layouts are the ggml block layouts (ggml-quants.c; gguf-py's gguf/quants.py mirrors them and is the
reference the tests compare against). Every kernel writes `bias + q * scale` in one torch op, where the
scale is an fp16 field times a small integer: that product is exact in float32, so each value is rounded
once, exactly as the reference rounds it, and the cast to the output dtype happens in that same op.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

# Blocks are decoded a chunk at a time so the integer and float temporaries stay a few MB (cache-sized)
# rather than several times the tensor, while each torch op still has enough work to hide Python's overhead.
CHUNK_ELEMENTS = 1 << 19


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of each block, as float32 of shape (n_blocks, 1)."""
    return blocks[:, start : start + 2].view(torch.float16).float()


def _fields(q: torch.Tensor, width: int) -> torch.Tensor:
    """Each byte split into its 8 // width bit fields, lowest first, stacked on a new dim before the last."""
    mask = (1 << width) - 1
    return torch.stack([(q >> s) & mask for s in range(0, 8, width)], dim=-2)


def _write(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    if bias is None:
        torch.mul(q, scale, out=out.view(q.shape))
    else:
        torch.addcmul(bias, q, scale, out=out.view(q.shape))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit mins (sub-blocks 4-7 borrow top bits)."""
    lo, hi, mix = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat((lo & 63, (mix & 15) | ((lo >> 6) << 4)), dim=1)
    mins = torch.cat((hi & 63, (mix >> 4) | ((hi >> 6) << 4)), dim=1)
    return scales, mins


def _q4_0(b, out):
    d = _f16(b, 0)
    _write(out, _fields(b[:, 2:], 4), d[:, :, None], -8 * d[:, :, None])


def _q4_1(b, out):
    _write(out, _fields(b[:, 4:], 4), _f16(b, 0)[:, :, None], _f16(b, 2)[:, :, None])


def _q5_low_high(b, qh_at):
    # bit j of the little-endian 32-bit qh is the fifth bit of element j
    high = _fields(b[:, qh_at : qh_at + 4], 1).transpose(1, 2).reshape(-1, 32)
    return _fields(b[:, qh_at + 4 :], 4).view(-1, 32) | (high << 4)


def _q5_0(b, out):
    d = _f16(b, 0)
    _write(out, _q5_low_high(b, 2), d, -16 * d)


def _q5_1(b, out):
    _write(out, _q5_low_high(b, 4), _f16(b, 0), _f16(b, 2))


def _q8_0(b, out):
    _write(out, b[:, 2:].view(torch.int8), _f16(b, 0))


def _q2_k(b, out):
    n, s = len(b), b[:, :16]
    q = _fields(b[:, 16:80].view(n, 2, 32), 2).view(n, 16, 16)
    _write(out, q, (_f16(b, 80) * (s & 15))[:, :, None], -(_f16(b, 82) * (s >> 4))[:, :, None])


def _q3_k(b, out):
    n, s = len(b), b[:, 96:108]
    # sixteen 6-bit scales: low nibbles in bytes 0-7, top two bits in bytes 8-11, stored with an offset of 32
    scales = _fields(s[:, :8], 4).view(n, 16) | (_fields(s[:, 8:], 2).view(n, 16) << 4)
    scale = (_f16(b, 108) * (scales.float() - 32))[:, :, None]
    # the reference subtracts 4 where the hmask bit is clear, i.e. q = low | high << 2, minus 4
    q = _fields(b[:, 32:96].view(n, 2, 32), 2).view(n, 256) | (_fields(b[:, :32], 1).view(n, 256) << 2)
    _write(out, q.view(n, 16, 16), scale, -4 * scale)


def _q4_k(b, out):
    n = len(b)
    scales, mins = _k_scales(b[:, 4:16])
    q = _fields(b[:, 16:].view(n, 4, 32), 4).view(n, 8, 32)
    _write(out, q, (_f16(b, 0) * scales)[:, :, None], -(_f16(b, 2) * mins)[:, :, None])


def _q5_k(b, out):
    n = len(b)
    scales, mins = _k_scales(b[:, 4:16])
    q = _fields(b[:, 48:].view(n, 4, 32), 4).view(n, 8, 32) | (_fields(b[:, 16:48], 1) << 4)
    _write(out, q, (_f16(b, 0) * scales)[:, :, None], -(_f16(b, 2) * mins)[:, :, None])


def _q6_k(b, out):
    n = len(b)
    low = _fields(b[:, :128].view(n, 2, 64), 4).view(n, 8, 32)
    high = _fields(b[:, 128:192].view(n, 2, 32), 2).view(n, 8, 32)
    scale = (_f16(b, 208) * b[:, 192:208].view(torch.int8))[:, :, None]
    _write(out, (low | (high << 4)).view(n, 16, 16), scale, -32 * scale)


_KERNELS = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
_FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
SUPPORTED = (*_KERNELS, *_FLOATS)


def _bytes_of(raw: np.ndarray, qtype: Q, shape) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The file's bytes as a flat uint8 tensor (no copy), checked to hold a `qtype` tensor of `shape`."""
    with warnings.catch_warnings():
        # the reader's arrays are read-only maps of the file; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    shape = tuple(int(d) for d in shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    if n % block_size or data.numel() != n // block_size * type_size:
        raise ValueError(f"{data.numel()} bytes of {qtype.name} do not hold a tensor of shape {shape}")
    return data, shape


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The GGUF tensor stored as `raw` (the file's bytes, in any numpy dtype and shape) as a new torch tensor
    of `shape` (torch order, last dim fastest) and `dtype`."""
    if qtype not in _KERNELS and qtype not in _FLOATS:
        raise ValueError(
            f"cannot dequantize ggml type {getattr(qtype, 'name', qtype)}; "
            f"supported: {', '.join(t.name for t in SUPPORTED)}"
        )
    data, shape = _bytes_of(raw, qtype, shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if qtype in _FLOATS:
        # a copy even when no conversion is needed: a view would keep the file mapped and be read-only
        return data.view(_FLOATS[qtype]).to(dtype, copy=True).view(shape)
    blocks = data.view(-1, type_size)
    out = torch.empty(len(blocks), block_size, dtype=dtype)
    step = max(1, CHUNK_ELEMENTS // block_size)
    # One intra-op thread: these ops are short and memory-bound, so OpenMP's barrier after each one stalls
    # whenever another process holds a core, and more threads gain little even when the cores are idle.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, len(blocks), step):
            _KERNELS[qtype](blocks[start : start + step], out[start : start + step])
    finally:
        torch.set_num_threads(threads)
    return out.view(shape)


# ---------------------------------------------------------------------------- 4-bit groups

FOUR_BIT = (Q.Q4_0, Q.Q4_1, Q.Q4_K)  # the types whose every group of 32 values reads q * scale + min, q in 0..15
GROUP = 32


def _groups_q4_0(b):
    d = _f16(b, 0)
    return _fields(b[:, 2:], 4).reshape(-1, 1, GROUP), d, -8 * d


def _groups_q4_1(b):
    return _fields(b[:, 4:], 4).reshape(-1, 1, GROUP), _f16(b, 0), _f16(b, 2)


def _groups_q4_k(b):
    n = len(b)
    scales, mins = _k_scales(b[:, 4:16])
    return _fields(b[:, 16:].view(n, 4, 32), 4).view(n, 8, GROUP), _f16(b, 0) * scales, -(_f16(b, 2) * mins)


_GROUPS = {Q.Q4_0: _groups_q4_0, Q.Q4_1: _groups_q4_1, Q.Q4_K: _groups_q4_k}


def int4_groups(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit GGUF tensor as (q, scale, min): q uint8 in 0..15 of `shape`; scale and min float32 of
    shape[:-1] + (shape[-1] // 32,), one per group of 32 consecutive values of the last dim. Each value is
    q * scale + min, which is what dequantize() writes: no precision is lost. Only FOUR_BIT types."""
    if qtype not in _GROUPS:
        raise ValueError(
            f"{getattr(qtype, 'name', qtype)} is not a 4-bit type; 4-bit types: {', '.join(t.name for t in FOUR_BIT)}"
        )
    data, shape = _bytes_of(raw, qtype, shape)
    if shape[-1] % GROUP:
        raise ValueError(f"a row of {shape[-1]} values is not whole groups of {GROUP}")
    q, scale, low = _GROUPS[qtype](data.view(-1, GGML_QUANT_SIZES[qtype][1]))
    groups = (*shape[:-1], shape[-1] // GROUP)
    return q.reshape(shape), scale.reshape(groups), low.reshape(groups)
