"""GGML block formats and their numpy reference implementations.

Distributed Llama calls GGML's Q4_0, Q4_1 and Q8_0 Q40, Q41 and Q80:

* Q40 block, 18 bytes for 32 values: float16 scale ``d`` (little-endian), then 16 bytes;
  byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble;
  value = (nibble - 8) * d.
* Q41 block, 20 bytes: float16 ``d``, float16 ``m``, then 16 nibble bytes in Q40's order;
  value = nibble * d + m.
* Q80 block, 34 bytes for 32 values: float16 scale ``d``, then 32 int8; value = q * d.

The Q40 / Q80 functions here are vectorised numpy and bit-identical to ``gguf.quants`` (tested);
the Q41 ones are ``gguf.quants`` itself.  They are the reference twins of the numba kernels in
:mod:`dllama_mpi.kernels`.  The runtime matrix layouts are in :mod:`dllama_mpi.quant.matrices`.
"""
from __future__ import annotations

import numpy as np

QK = 32                 # values per block (all formats)
Q40_BLOCK_BYTES = 18    # 2 (fp16 scale) + 16 (32 nibbles)
Q41_BLOCK_BYTES = 20    # 2 (fp16 d) + 2 (fp16 m) + 16 (32 nibbles)
Q80_BLOCK_BYTES = 34    # 2 (fp16 scale) + 32 (int8)

_CHUNK_VALUES = 1 << 22  # values per numpy chunk: bounds temporaries to ~100 MB


def _as_f32_rows(x: np.ndarray, what: str) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{what}: expected an array with a last axis, got a scalar")
    n = x.shape[-1]
    if n % QK != 0:
        raise ValueError(f"{what}: last axis ({n}) must be a multiple of {QK}")
    x2 = np.ascontiguousarray(x.reshape(-1, n) if x.size else x.reshape(0, n), dtype=np.float32)
    return x2, x.shape


def _as_u8_rows(raw: np.ndarray, block_bytes: int, what: str) -> tuple[np.ndarray, tuple[int, ...]]:
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 bytes, got {raw.dtype}")
    if raw.ndim == 0 or raw.shape[-1] % block_bytes != 0:
        raise ValueError(f"{what}: last axis must be a multiple of {block_bytes} bytes, got shape {raw.shape}")
    nbytes = raw.shape[-1]
    return np.ascontiguousarray(raw.reshape(-1, nbytes)), raw.shape


def _row_chunks(n_rows: int, row_len: int):
    step = max(1, _CHUNK_VALUES // max(row_len, 1))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


# ---------------------------------------------------------------- Q40 (GGML Q4_0)

def _q40_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f32 [nb, 32] -> (fp16 scale [nb], packed nibbles uint8 [nb, 16]); same ops as GGML/gguf."""
    imax = np.abs(blocks).argmax(axis=-1)[:, None]          # first index of the largest |x|
    vmax = np.take_along_axis(blocks, imax, axis=-1)         # signed value of largest magnitude
    d = vmax / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8)
    np.minimum(q, 15, out=q)
    packed = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return d[:, 0].astype(np.float16), packed


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """f32 ``[..., n]`` (n % 32 == 0) -> uint8 ``[..., n//32*18]`` GGML Q4_0 blocks."""
    x2, shape = _as_f32_rows(x, "quantize_q40")
    rows, n = x2.shape
    nb = n // QK
    out = np.empty((rows, nb, Q40_BLOCK_BYTES), dtype=np.uint8)
    for r0, r1 in _row_chunks(rows, n):
        d, packed = _q40_blocks(x2[r0:r1].reshape(-1, QK))
        o = out[r0:r1].reshape(-1, Q40_BLOCK_BYTES)
        o[:, :2] = d.view(np.uint8).reshape(-1, 2)
        o[:, 2:] = packed
    return out.reshape(shape[:-1] + (nb * Q40_BLOCK_BYTES,))


def split_q40(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 Q4_0 bytes ``[rows, nb*18]`` -> (fp16 scales ``[rows, nb]``, nibble bytes ``[rows, nb, 16]``)."""
    r2, _ = _as_u8_rows(raw, Q40_BLOCK_BYTES, "split_q40")
    rows, nb = r2.shape[0], r2.shape[1] // Q40_BLOCK_BYTES
    b = r2.reshape(rows, nb, Q40_BLOCK_BYTES)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16).reshape(rows, nb)
    return d, np.ascontiguousarray(b[:, :, 2:])


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """packed nibble bytes ``[..., 16]`` -> uint8 nibbles ``[..., 32]`` (0..15) in element order."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def dequantize_q40(raw: np.ndarray) -> np.ndarray:
    """uint8 ``[..., nb*18]`` GGML Q4_0 blocks -> f32 ``[..., nb*32]``."""
    r2, shape = _as_u8_rows(raw, Q40_BLOCK_BYTES, "dequantize_q40")
    rows, nbytes = r2.shape
    nb = nbytes // Q40_BLOCK_BYTES
    out = np.empty((rows, nb * QK), dtype=np.float32)
    for r0, r1 in _row_chunks(rows, nb * QK):
        d, qs = split_q40(r2[r0:r1])
        q = unpack_nibbles(qs).astype(np.int8) - np.int8(8)            # [r, nb, 32]
        vals = d.astype(np.float32)[:, :, None] * q.astype(np.float32)
        out[r0:r1] = vals.reshape(r1 - r0, nb * QK)
    return out.reshape(shape[:-1] + (nb * QK,))


# ---------------------------------------------------------------- Q80 (GGML Q8_0)

def roundf(v: np.ndarray) -> np.ndarray:
    """Round half away from zero, exactly like C ``roundf`` (float32 in, float32 out)."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.sign(v) * (fl + np.floor(np.float32(2) * (a - fl)))


def quantize_q80_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f32 ``[..., n]`` -> (int8 q ``[..., n]``, f32 scales ``[..., n//32]`` = float32(float16(d))).

    This is the split form the activation kernel produces (``kernels.quantize_q80_act``).
    """
    x2, shape = _as_f32_rows(x, "quantize_q80_parts")
    rows, n = x2.shape
    nb = n // QK
    qs = np.empty((rows, n), dtype=np.int8)
    ds = np.empty((rows, nb), dtype=np.float32)
    for r0, r1 in _row_chunks(rows, n):
        blocks = x2[r0:r1].reshape(-1, QK)
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        qs[r0:r1] = roundf(blocks * inv).astype(np.int8).reshape(r1 - r0, n)
        ds[r0:r1] = d.astype(np.float16).astype(np.float32).reshape(r1 - r0, nb)
    return qs.reshape(shape), ds.reshape(shape[:-1] + (nb,))


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """f32 ``[..., n]`` (n % 32 == 0) -> uint8 ``[..., n//32*34]`` GGML Q8_0 blocks."""
    x2, shape = _as_f32_rows(x, "quantize_q80")
    rows, n = x2.shape
    nb = n // QK
    qs, ds = quantize_q80_parts(x2)
    out = np.empty((rows, nb, Q80_BLOCK_BYTES), dtype=np.uint8)
    out[:, :, :2] = ds.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    out[:, :, 2:] = qs.view(np.uint8).reshape(rows, nb, QK)
    return out.reshape(shape[:-1] + (nb * Q80_BLOCK_BYTES,))


def dequantize_q80(raw: np.ndarray) -> np.ndarray:
    """uint8 ``[..., nb*34]`` GGML Q8_0 blocks -> f32 ``[..., nb*32]``."""
    r2, shape = _as_u8_rows(raw, Q80_BLOCK_BYTES, "dequantize_q80")
    rows, nbytes = r2.shape
    nb = nbytes // Q80_BLOCK_BYTES
    b = r2.reshape(rows, nb, Q80_BLOCK_BYTES)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16).astype(np.float32)   # [rows, nb, 1]
    q = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).astype(np.float32)
    return (q * d).reshape(shape[:-1] + (nb * QK,))


def dequantize_q80_parts(qs: np.ndarray, ds: np.ndarray) -> np.ndarray:
    """(int8 ``[..., n]``, f32 ``[..., n//32]``) -> f32 ``[..., n]``."""
    qs = np.asarray(qs)
    n = qs.shape[-1]
    q = qs.reshape(-1, n // QK, QK).astype(np.float32)
    return (q * np.asarray(ds, dtype=np.float32).reshape(-1, n // QK, 1)).reshape(qs.shape)


# ---------------------------------------------------------------- Q41 (GGML Q4_1)

def quantize_q41(x: np.ndarray) -> np.ndarray:
    """f32 [..., n] -> GGML Q4_1 bytes [..., n/32*20] (the gguf package's reference)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    return quantize(np.ascontiguousarray(x, dtype=np.float32), GGMLQuantizationType.Q4_1)


def dequantize_q41(raw: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    return dequantize(np.ascontiguousarray(raw), GGMLQuantizationType.Q4_1)
