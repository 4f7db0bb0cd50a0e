"""llama.cpp's K-quants and 5-bit types, read into our runtime forms.

GGML K-quants pack 256 values (``QK_K``) in a super-block with one or two float16 factors and
small integer scales per sub-block; the 5-bit types are 32-value blocks like Q4_0/Q4_1:

* Q4_K, 144 bytes: fp16 ``d``, fp16 ``dmin``, 12 bytes of 6-bit scales ``sc[8]`` and mins
  ``m[8]``, 128 nibble bytes; sub-block j (32 values) is  ``d*sc[j] * q - dmin*m[j]``, q in 0..15.
* Q5_K, 176 bytes: as Q4_K plus a fifth bit per value (q in 0..31).
* Q6_K, 210 bytes: 16 sub-blocks of 16 values, int8 scales, ``d*sc[j] * (q - 32)``, q in 0..63.
* Q5_0 / Q5_1: 32-value blocks, 5-bit q, like Q4_0 / Q4_1 (llama.cpp's fallback types when a
  row is not a multiple of 256).

What each becomes at run time (``config.RUNTIME_TYPE``), so that nothing is quantised twice where it
can be helped:

* **Q4_K -> q41**: each 32-value sub-block *is* a Q4_1 block, w = D*q + M with D = d*sc[j] and
  M = -dmin*m[j]; the nibbles are kept, only D and M are rounded from their exact f32 products
  to the f16 that Q4_1 stores (``q4k_to_q41``).  Exact where the products fit an f16 (11
  significant bits: sc a power of two always; other sc when d has enough trailing zero bits);
  elsewhere the error is at most half an f16 ulp, 2^-11 relative, on D and M:
  |w' - w| <= 2^-11 (15 |D| + |M|); measured, ~1 % of Q4_K's own rounding error in RMS
  (docs/models.md has the measurements).
* **Q5_K, Q6_K, Q5_0, Q5_1 -> q80** (Q8_0 blocks: d*q, q int8): dequantised by the ``gguf``
  package's reference and quantised to Q8_0.  A second rounding, of at most half a Q8_0 step
  (max|w| / 254 of the 32-value block): about an eighth of a 6-bit step, a sixteenth of a 5-bit one.
* Q8_0 -> q80, Q4_0 -> q40, Q4_1 -> q41: bit for bit.  F32/F16/BF16 -> f32.
"""
from __future__ import annotations

import numpy as np

from .blocks import Q41_BLOCK_BYTES, QK, quantize_q80

QK_K = 256                 # values per K-quant super-block
Q4_K_BLOCK_BYTES = 144     # 2 + 2 + 12 + 128
SUBBLOCKS = QK_K // QK     # 8 Q4_1 blocks per Q4_K super-block

K_TYPES = ("Q4_K", "Q5_K", "Q6_K")


def q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of Q4_K/Q5_K super-blocks ``uint8 [n, 12]`` -> (sc, m) ``uint8 [n, 8]``
    (6 bits each; the gguf package's ``Q4_K.get_scale_min``)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4k_parts(raw: np.ndarray):
    """uint8 [rows, nsb*144] -> rows, nsb, blocks [rows*nsb, 144]."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % Q4_K_BLOCK_BYTES:
        raise ValueError(f"Q4_K blocks: expected uint8 [rows, n*{Q4_K_BLOCK_BYTES}], got "
                         f"{raw.dtype} {raw.shape}")
    rows, nsb = raw.shape[0], raw.shape[1] // Q4_K_BLOCK_BYTES
    return rows, nsb, np.ascontiguousarray(raw).reshape(rows * nsb, Q4_K_BLOCK_BYTES)


def q4k_factors(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact f32 sub-block factors of Q4_K rows: (D = d*sc, M = -dmin*m), each f32
    ``[rows, nsb*8]`` -- w = D*q + M, as llama.cpp and the gguf package compute it."""
    rows, nsb, b = _q4k_parts(raw)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)          # [n, 1]
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = q4k_scale_min(b[:, 4:16])
    scale = d * sc.astype(np.float32)                                 # exact: 11 x 6 bits
    offset = -(dmin * mn.astype(np.float32))
    return scale.reshape(rows, nsb * SUBBLOCKS), offset.reshape(rows, nsb * SUBBLOCKS)


def q4k_to_q41(raw: np.ndarray) -> np.ndarray:
    """Q4_K rows ``uint8 [rows, nsb*144]`` -> GGML Q4_1 rows ``uint8 [rows, nsb*8*20]``: one Q4_1
    block per 32-value sub-block, the same nibbles, d = f16(d*sc[j]), m = f16(-dmin*m[j])."""
    rows, nsb, b = _q4k_parts(raw)
    n = rows * nsb
    scale, offset = q4k_factors(raw)
    with np.errstate(over="ignore"):
        d16, m16 = scale.astype(np.float16), offset.astype(np.float16)
    if not (np.isfinite(d16).all() and np.isfinite(m16).all()):
        raise ValueError("Q4_K block factors beyond the float16 range (or not finite)")
    qs = b[:, 16:].reshape(n, 4, 32)                  # 32 bytes: sub-blocks 2c (low), 2c+1 (high)
    nib = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, SUBBLOCKS, QK)   # values in order
    out = np.empty((n, SUBBLOCKS, Q41_BLOCK_BYTES), np.uint8)
    out[:, :, 0:2] = d16.reshape(n, SUBBLOCKS, 1).view(np.uint8)
    out[:, :, 2:4] = m16.reshape(n, SUBBLOCKS, 1).view(np.uint8)
    out[:, :, 4:] = nib[:, :, :16] | (nib[:, :, 16:] << np.uint8(4))       # Q4_1 nibble order
    return out.reshape(rows, nsb * SUBBLOCKS * Q41_BLOCK_BYTES)


def q4k_exact_fraction(raw: np.ndarray) -> float:
    """Share of the sub-blocks whose Q4_1 form (q4k_to_q41) is exact: D and M both f16 values."""
    scale, offset = q4k_factors(raw)
    exact = ((scale.astype(np.float16).astype(np.float32) == scale)
             & (offset.astype(np.float16).astype(np.float32) == offset))
    return float(exact.mean()) if exact.size else 1.0


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Any GGML type's rows -> f32 values (the gguf package's reference dequantisers)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    return np.ascontiguousarray(gguf_dequantize(np.ascontiguousarray(raw),
                                                GGMLQuantizationType[type_name]), dtype=np.float32)


def to_runtime_blocks(raw: np.ndarray, type_name: str, target: str) -> np.ndarray | None:
    """GGML rows of ``type_name`` straight into the block bytes of runtime ``target`` where a
    direct way exists (the same type: as they are; Q4_K -> q41: ``q4k_to_q41``); None where
    the rows must go through f32 values."""
    if (target, type_name) in (("q40", "Q4_0"), ("q41", "Q4_1"), ("q80", "Q8_0")):
        return np.ascontiguousarray(raw)
    if (target, type_name) == ("q41", "Q4_K"):
        return q4k_to_q41(raw)
    return None


def to_q80(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Rows of any GGML type -> Q8_0 block bytes (dequantised by the reference, then Q8_0)."""
    if type_name == "Q8_0":
        return np.ascontiguousarray(raw)
    return quantize_q80(dequantize(raw, type_name))
