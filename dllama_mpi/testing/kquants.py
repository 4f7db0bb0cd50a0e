"""K-quant blocks for test and benchmark GGUFs: Q4_K, Q5_K and Q6_K quantisers (the ``gguf``
package only dequantises these) and random valid blocks.

The quantisers are simple (per sub-block min/max or max-abs, then the sub-block scales
quantised against the super-block's f16 factor), not llama.cpp's searched ones, but the bytes
are laid out exactly as GGML's, and the tests check them against ``gguf.quants.dequantize``.
"""
from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _blocks(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} values, got {x.shape[-1]}")
    return np.ascontiguousarray(x).reshape(-1, QK_K), x.shape


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def _pack_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """6-bit sc, m ``[n, 8]`` -> the 12 packed bytes of Q4_K / Q5_K."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _asym(b: np.ndarray, levels: int):
    """Per 32-value sub-block: w ~ D*q - Mn with D = d*sc, Mn = dmin*m (6-bit sc, m).
    Returns d, dmin (f16 [n]), sc, m ([n, 8]) and q ([n, 8, 32], 0..levels)."""
    n = b.shape[0]
    sub = b.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0)               # llama.cpp keeps min <= 0
    hi = sub.max(axis=-1)
    scale = (hi - lo) / levels
    minv = -lo
    d = _f16(scale.max(axis=-1) / 63)
    dmin = _f16(minv.max(axis=-1) / 63)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d.astype(np.float32)[:, None]), 0)
        mn = np.where(dmin[:, None] > 0, np.rint(minv / dmin.astype(np.float32)[:, None]), 0)
        sc, mn = np.clip(sc, 0, 63), np.clip(mn, 0, 63)
        eff_d = d.astype(np.float32)[:, None] * sc
        eff_m = dmin.astype(np.float32)[:, None] * mn
        q = np.where(eff_d[..., None] > 0,
                     np.rint((sub + eff_m[..., None]) / eff_d[..., None]), 0)
    return d, dmin, sc, mn, np.clip(q, 0, levels).astype(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """f32 [..., n] (n % 256 == 0) -> GGML Q4_K bytes [..., n/256*144]."""
    b, shape = _blocks(x)
    d, dmin, sc, mn, q = _asym(b, 15)
    n = b.shape[0]
    out = np.empty((n, 144), np.uint8)
    out[:, 0:2] = d.reshape(n, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(n, 1).view(np.uint8)
    out[:, 4:16] = _pack_scale_min(sc, mn)
    q = q.reshape(n, 4, 2, 32)                          # chunk c: sub-blocks 2c, 2c+1
    out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return out.reshape(shape[:-1] + (shape[-1] // QK_K * 144,))


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """f32 [..., n] (n % 256 == 0) -> GGML Q5_K bytes [..., n/256*176]."""
    b, shape = _blocks(x)
    d, dmin, sc, mn, q = _asym(b, 31)
    n = b.shape[0]
    out = np.empty((n, 176), np.uint8)
    out[:, 0:2] = d.reshape(n, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(n, 1).view(np.uint8)
    out[:, 4:16] = _pack_scale_min(sc, mn)
    high = (q >> 4) & 1                                 # [n, 8, 32]: bit j of qh[i]
    out[:, 16:48] = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    low = (q & 0x0F).reshape(n, 4, 2, 32)
    out[:, 48:] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    return out.reshape(shape[:-1] + (shape[-1] // QK_K * 176,))


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """f32 [..., n] (n % 256 == 0) -> GGML Q6_K bytes [..., n/256*210]."""
    b, shape = _blocks(x)
    n = b.shape[0]
    sub = b.reshape(n, 16, 16)
    imax = np.abs(sub).argmax(axis=-1)[..., None]
    scale = np.take_along_axis(sub, imax, axis=-1)[..., 0] / -32     # the largest |x| -> q = -32
    d = _f16(np.abs(scale).max(axis=-1) / 127)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d.astype(np.float32)[:, None]), 0)
        sc = np.clip(sc, -128, 127)
        eff = d.astype(np.float32)[:, None] * sc
        q = np.where(eff[..., None] != 0, np.rint(sub / eff[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)   # halves of 128
    out = np.empty((n, 210), np.uint8)
    low = (q & 0x0F).reshape(n, 2, 2, 64)               # value h*128 + s*64 + k
    out[:, 0:128] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)                # value h*128 + t*32 + k
    out[:, 128:192] = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4)
                       | (high[:, :, 3] << 6)).reshape(n, 64)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = d.reshape(n, 1).view(np.uint8)
    return out.reshape(shape[:-1] + (shape[-1] // QK_K * 210,))


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0,
                  scale: float = 1e-3) -> np.ndarray:
    """Valid random blocks: random integer fields (every bit pattern of the scales and
    quants is valid), f16 factors drawn around `scale` (finite, positive). uint8 [rows, bytes]."""
    rng = np.random.default_rng(seed)
    nb = rows * cols // QK_K
    size = BLOCK_BYTES[type_name]
    b = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    f = _f16(np.abs(rng.standard_normal((nb, 2))) * scale + scale / 16)
    if type_name == "Q6_K":
        b[:, 208:210] = f[:, :1].view(np.uint8)
    else:
        b[:, 0:4] = f.view(np.uint8).reshape(nb, 4)
    return b.reshape(rows, cols // QK_K * size)
