"""Weight formats: what a stored weight is, how numpy encodes and decodes it, what gate it passes.

One `WeightFormat` per name, looked up in `FORMATS`; nothing else branches on a precision string.

  fp32  the source's float weights, untouched.
  fp16  weights stored in half precision and cast to the graph's float type where they are used
        (Cast node). In a graph that computes fp32 the activations stay fp32, so the VAE's known
        fp16 overflow cannot happen; only the weights are rounded.
  int8  symmetric, one scale per output channel (per row for an embedding table): q in [-127, 127],
        w = q * s. DequantizeLinear (opset 13 per-axis) feeds the Conv/MatMul/Gemm/Gather.
  int4  Q4_K-style block-wise, along the reduction axis (a Conv's input channels, a MatMul's K):
        blocks of `block` weights (32/64/128) each with a uint4 zero point and an 8-bit scale,
        the scales themselves stored as uint8 with one float scale per 8 blocks (a "super-block",
        256 weights at block 32, as in llama.cpp's Q4_K). Two blocked DequantizeLinear nodes
        (opset 21): scale = s8 * super, w = (q - zp) * scale. 4.56 bits per weight at block 32,
        against 5.125 with fp32 block scales and 4.5 for ggml's Q4_0 (no zero point).

Decoding in numpy performs exactly the arithmetic onnxruntime's DequantizeLinear does (float32
(q - zp) times a float32 scale), so a weight decoded here is bit-identical to the one the graph
computes: the quality search measures fake-quantized weights and the gate then checks the real
graph (tests/test_quantize.py holds the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import SdcError

BLOCK_SIZES = (32, 64, 128)
SUPER = 8  # int4: blocks per super-block sharing one float scale for their 8-bit block scales
# int4: per block, the scale is chosen among (max - min) / 15 times these shrink factors, whichever
# gives the least squared error (clipping the extreme weight a little often rounds the rest much
# better: llama.cpp's Q4_K searches its scales the same way). 1.0 first: ties keep the plain scale.
_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass
class Encoded:
    """A quantized weight as the graph stores it. `q` holds one value per weight (unpacked: int4
    values are packed two per byte only when written). `axis` is the per-channel axis (int8) or
    the blocked axis (int4) of the weight *as stored* (after any transpose)."""

    fmt: str
    q: np.ndarray
    axis: int
    scale: np.ndarray | None = None  # int8: float per channel; int4: uint8 per block
    zero_point: np.ndarray | None = None  # int4: uint4 per block
    super_scale: np.ndarray | None = None  # int4: float per SUPER blocks
    block: int = 0
    dtype: str = "float32"  # the graph's float type the weight decodes to

    def nbytes(self) -> int:
        """Bytes on disk (int4 values and zero points packed two per byte)."""
        n = lambda a, bits=None: 0 if a is None else (  # noqa: E731
            (a.size * bits + 7) // 8 if bits else a.nbytes)
        if self.fmt == "int4":
            return n(self.q, 4) + n(self.zero_point, 4) + n(self.scale) + n(self.super_scale)
        return n(self.q) + n(self.scale)


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: int
    quantized: bool
    default_target_db: float | None  # the quality target a graph in this format must meet
    description: str = field(default="", compare=False)

    def encode(self, w: np.ndarray, axis: int, block: int = 32) -> Encoded:
        if self.name == "int8":
            return _encode_int8(w, axis)
        if self.name == "int4":
            return _encode_int4(w, axis, block)
        if self.name == "fp16":
            return Encoded("fp16", _to_fp16(w), axis, dtype=w.dtype.name)
        raise AssertionError(f"{self.name} weights are not encoded")

    def decode(self, e: Encoded) -> np.ndarray:
        """The weight the graph computes with, in its float type."""
        dt = np.dtype(e.dtype)
        if e.fmt == "fp16":
            return e.q.astype(dt)
        if e.fmt == "int8":
            return e.q.astype(dt) * _expand(e.scale, e.q.ndim, e.axis)
        scale = e.scale.astype(dt) * _repeat_blocks(e.super_scale, SUPER, e.scale.shape[e.axis],
                                                     e.axis)
        q = e.q.astype(np.int32) - _repeat_blocks(e.zero_point, e.block, e.q.shape[e.axis],
                                                   e.axis).astype(np.int32)
        return q.astype(dt) * _repeat_blocks(scale, e.block, e.q.shape[e.axis], e.axis)


# The targets: int8's 35 dB is Apple's fp16 conversion gate (weight-only int8 per channel measures
# 46-55 dB on sdc-tiny's graphs, so it fails only on real damage); int4's 25 dB is where sdc-tiny's
# 4-bit UNet lands at block 32 (24.3 dB with every weight 4-bit, 26.5 dB after the search keeps one
# group fp16) with adherence within 2 points of fp32 (README, "sdc eval"). fp16 keeps the fp16
# build's 35 dB. w8a8's 30 dB: with 8-bit activations one UNet call measures 36.8 dB on sdc-tiny
# and 31.5 dB on the full-size SD1.5 architecture (worst of the 14 gate inputs), so the gate
# passes a correct build and refuses a broken calibration (a wrong scale costs tens of dB).
FORMATS = {f.name: f for f in (
    WeightFormat("fp32", 32, False, None, "the source's float weights"),
    WeightFormat("fp16", 16, False, 35.0, "half-precision weights, computed in the graph's type"),
    WeightFormat("int8", 8, True, 35.0, "int8 per output channel"),
    WeightFormat("int4", 4, True, 25.0, "4-bit blocks with zero points, 8-bit block scales"),
    WeightFormat("w8a8", 8, True, 30.0, "int8 per output channel with uint8 activations "
                 "(static per-tensor scales), computed in integers"),
)}


def get(name: str) -> WeightFormat:
    if name not in FORMATS:
        raise SdcError(f"unknown weight format {name!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check_block(block) -> int:
    if block not in BLOCK_SIZES:
        raise SdcError(f"--block-size {block}: expected one of "
                       f"{', '.join(map(str, BLOCK_SIZES))} (weights per 4-bit block)")
    return int(block)


def _to_fp16(w: np.ndarray) -> np.ndarray:
    if not np.isfinite(w).all():
        raise SdcError("a weight holds NaN/Inf; the source build is damaged, rebuild it")
    big = float(np.abs(w).max(initial=0.0))
    if big > 65504:
        raise SdcError(f"a weight of magnitude {big:.4g} does not fit fp16 (max 65504); keep that "
                       "stage fp32 (--stage-precision STAGE=fp32)")
    return w.astype(np.float16)


def _expand(per_axis: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return per_axis.reshape(shape)


def _repeat_blocks(a: np.ndarray, block: int, length: int, axis: int) -> np.ndarray:
    """Per-block values broadcast back to one per element along `axis` (last block partial)."""
    return np.repeat(a, block, axis=axis).take(np.arange(length), axis=axis)


def _encode_int8(w: np.ndarray, axis: int) -> Encoded:
    dt = w.dtype
    red = tuple(a for a in range(w.ndim) if a != axis)
    absmax = np.abs(w).max(axis=red).astype(dt)
    scale = np.where(absmax > 0, absmax / dt.type(127), dt.type(1)).astype(dt)
    q = np.clip(np.rint(w / _expand(scale, w.ndim, axis)), -127, 127).astype(np.int8)
    return Encoded("int8", q, axis, scale=scale, dtype=dt.name)


def _blocks(w: np.ndarray, axis: int, block: int) -> np.ndarray:
    """w with `axis` moved last and cut into [..., n_blocks, block], the last block zero-padded."""
    x = np.moveaxis(w, axis, -1)
    pad = (-x.shape[-1]) % block
    if pad:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], pad), x.dtype)], axis=-1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _encode_int4(w: np.ndarray, axis: int, block: int) -> Encoded:
    dt = w.dtype
    length = w.shape[axis]
    wf = w.astype(np.float32)
    b = _blocks(wf, axis, block)  # [..., nb, B]
    lo = np.minimum(b.min(-1), 0.0)
    hi = np.maximum(b.max(-1), 0.0)
    span = hi - lo
    # Pick each block's scale: the one of the shrink candidates with the least squared error.
    best_err = best_scale = None
    for f in _SHRINK:
        s = np.where(span > 0, span * f / 15.0, 1.0)
        zp = np.clip(np.rint(-lo / s), 0, 15)
        deq = (np.clip(np.rint(b / s[..., None]) + zp[..., None], 0, 15) - zp[..., None]) * s[..., None]
        err = ((deq - b) ** 2).sum(-1)
        if best_err is None:
            best_err, best_scale = err, s
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, s, best_scale)
    # 8-bit block scales under one float scale per SUPER blocks (Q4_K's double quantisation).
    nb = best_scale.shape[-1]
    pad = (-nb) % SUPER
    sc = np.concatenate([best_scale, np.zeros((*best_scale.shape[:-1], pad), np.float32)], -1) \
        if pad else best_scale
    groups = sc.reshape(*sc.shape[:-1], -1, SUPER)
    sup = (groups.max(-1) / 255.0).astype(dt)
    sup = np.where(sup > 0, sup, dt.type(1)).astype(dt)
    s8 = np.clip(np.rint(groups / sup[..., None].astype(np.float32)), 1, 255).astype(np.uint8)
    s8 = s8.reshape(*sc.shape[:-1], -1)[..., :nb]
    scale = (s8.astype(dt) * np.repeat(sup, SUPER, axis=-1)[..., :nb]).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(b / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    q = q.reshape(*q.shape[:-2], -1)[..., :length]
    return Encoded("int4", np.moveaxis(q, -1, axis), axis, scale=np.moveaxis(s8, -1, axis),
                   zero_point=np.moveaxis(zp, -1, axis), super_scale=np.moveaxis(sup, -1, axis),
                   block=block, dtype=dt.name)


def pack4(values: np.ndarray) -> bytes:
    """ONNX's INT4/UINT4 layout: two values per byte, the first in the low nibble."""
    flat = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack4(raw: bytes, shape) -> np.ndarray:
    b = np.frombuffer(raw, np.uint8)
    out = np.empty(b.size * 2, np.uint8)
    out[0::2], out[1::2] = b & 0x0F, b >> 4
    return out[:int(np.prod(shape, dtype=np.int64))].reshape(shape)


IDENTICAL_DB = 200.0  # what psnr() reports for outputs equal to the reference (JSON has no inf)


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    """20 log10((max - min of ref) / RMSE), the gate's metric (export/parity.py), capped at
    IDENTICAL_DB (equal outputs)."""
    diff = out.astype(np.float64) - ref.astype(np.float64)
    rmse = float(np.sqrt(np.mean(diff ** 2)))
    if not np.isfinite(rmse):
        return float("-inf")
    peak = float(ref.max() - ref.min())
    if rmse == 0:
        return IDENTICAL_DB
    return min(IDENTICAL_DB, 20 * float(np.log10(max(peak, 1e-12) / rmse)))
