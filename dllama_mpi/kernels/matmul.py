"""Q80-activation matmuls: the checks and the dispatch onto the slab / row-tile kernels.

``matmul_q80_q40`` / ``_q41`` / ``_q80`` check their arguments and run; ``bind_matmul`` checks
once and returns the bound kernel call (what the model uses at decode).  ``matmul_f32`` is
numpy's sgemm; ``matmul_f16`` widens float16 weights as it reads them (matmul_f16.py).
"""
from __future__ import annotations

from functools import partial

import numpy as np

from ..quant import QK, Q40Matrix, Q41Matrix, Q80Matrix
from . import _jit
from ._checks import _F32, _I8, _check, _check_out, _noop
from .matmul_f16 import _f16_rows_par, _f16_rows_serial
from .matmul_rows import (_ACC, _RT4, _RT8, _rbuffers, _rows_q4_generic, _rows_q4_par, _rows_q4_serial,
                          _rows_q8_generic, _rows_q8_par, _rows_q8_serial)
from .matmul_slab import (_S16, _q40_par_avx2, _q40_par_generic, _q40_serial_avx2, _q40_serial_generic,
                          _xbuffers)
from .matmul_vnni import VNNI_TAGS, _ACCV, _rows_q4_par_vnni, _rows_q4_serial_vnni, _rows_q8_par_vnni, _rows_q8_serial_vnni
from .simd import HOST_PATHS, KERNELS


def matmul_q80_q40(out: np.ndarray, xq: np.ndarray, xd: np.ndarray, w: Q40Matrix) -> None:
    """out[t, r] = sum_b d_w[r,b] * xd[t,b] * sum_i (nib - 8) * xq[t, i]  (exact int block dots, f32 scales).

    xq, xd: the activation in split Q80 form (``quantize_q80_act``); w: a Q40Matrix [rows, cols].
    Parallel (numba threads over row bands) when the matrix is large enough to pay for it.
    """
    _check_matmul(out, xq, xd, w, Q40Matrix)
    _bound_matmul(out, xq, xd, w, KERNELS)()


def matmul_q80_q41(out: np.ndarray, xq: np.ndarray, xd: np.ndarray, w: Q41Matrix) -> None:
    """out[t, r] = sum_b xd[t,b] * (d[r,b] * sum_i q_i xq[t,i] + m[r,b] * sum_i xq[t,i])  for a Q41Matrix
    (GGML Q4_1 weights d*q + m): exact int block dots, the offsets fused into the f32 scaling."""
    _check_matmul(out, xq, xd, w, Q41Matrix)
    _bound_matmul(out, xq, xd, w, KERNELS)()


def matmul_q80_q80(out: np.ndarray, xq: np.ndarray, xd: np.ndarray, w: Q80Matrix) -> None:
    """out[t, r] = sum_b d_w[r,b] * xd[t,b] * sum_i wq[r,i] xq[t,i]  for a Q80Matrix (int8 weights):
    exact int32 block dots, f32 scales."""
    _check_matmul(out, xq, xd, w, Q80Matrix)
    _bound_matmul(out, xq, xd, w, KERNELS)()


def bind_matmul(out: np.ndarray, xq: np.ndarray, xd: np.ndarray, w):
    """Check once, then return the kernel call out = (xq, xd) · w^T for these very arrays and
    matrix (Q40, Q41 or Q80), as a function of no arguments: what matmul_q80_* do, without
    their checks and dispatch on every call (a visible share of a decode step).
    The call is right as long as the arrays keep their shapes (the caller owns them) and the
    thread count stays as it was."""
    cls = type(w) if type(w) in (Q40Matrix, Q41Matrix, Q80Matrix) else Q40Matrix
    _check_matmul(out, xq, xd, w, cls)
    return _bound_matmul(out, xq, xd, w, KERNELS)


def _check_matmul(out, xq, xd, w, cls) -> None:
    if not _fast_ok(out, xq, xd, w, cls):
        _checks(out, xq, xd, w, cls)


def _kernel_path(use) -> str:
    """use: a path name (simd.KERNEL_PATHS), True (the host's path, simd.KERNELS) or False (generic)."""
    if use is True:
        return KERNELS
    if use is False:
        return "generic"
    if use not in HOST_PATHS:        # never compile a kernel the CPU lacks (LLVM could not select it)
        raise ValueError(f"kernel path {use!r}: this host runs {', '.join(HOST_PATHS)}")
    return use


def _bound_matmul(out, xq, xd, w, use):
    """The kernel call for checked arguments (functools.partial: no Python frame of ours), on
    kernel path `use` (``_kernel_path``; never one the host lacks: simd.KERNELS is the best)."""
    path = _kernel_path(use)
    T = xq.shape[0]
    if T == 0 or w.rows == 0:
        return _noop
    tiles = q4_row_tiles(w)
    if tiles is not None:
        return _bound_rows_q4(out, xq, xd, *tiles, path)
    if type(w) is not Q40Matrix:                       # Q80Matrix
        xi, xf = _rbuffers(T, w.nb)
        if path == "generic":
            return partial(_rows_q8_generic, out, xq, xd, xi, xf, w.buf, w.rows, w.nb, w.stride, _ACC)
        serial = w.rows * w.nb * T < _jit._PAR_MIN_BLOCKS or w.rows <= 2 * _RT8 or _jit._NUM_THREADS == 1
        if path in VNNI_TAGS:                          # (256-bit vpdpbusd on both VNNI paths)
            fn = _rows_q8_serial_vnni if serial else _rows_q8_par_vnni
            return partial(fn, out, xq, xd, xi, xf, w.buf, w.rows, w.nb, w.stride, _ACCV)
        return partial(_rows_q8_serial if serial else _rows_q8_par, out, xq, xd, xi, xf, w.buf, w.rows, w.nb,
                       w.stride, _ACC)
    xl, xh, xinit = _xbuffers(T, w.nslab)
    args = (out, xq, xd, w.qs, w.d.view(np.uint16), w.rows, w.nb, w.nslab, xl, xh, xinit, _S16)
    avx2 = path != "generic"                           # (no VNNI kernel for the slab layout)
    if w.rows * w.cols * T < 1 << 18 or w.rows < 16:
        return partial(_q40_serial_avx2 if avx2 else _q40_serial_generic, *args)
    return partial(_q40_par_avx2 if avx2 else _q40_par_generic, *args)


def q4_row_tiles(w):
    """(buffer, rows, blocks a row, record bytes, has offsets) of a Q4 matrix on the row-tile
    layout (Q41, or Q40 with layout "rows"), what the row-tile kernels take; else None."""
    if type(w) is Q41Matrix:
        return w.buf, w.rows, w.nb, w.stride, 1
    if type(w) is Q40Matrix and w.layout == "rows":
        return w.qs, w.rows, w.nb, 288, 0
    return None


def _matmul_unchecked(out, xq, xd, w, use) -> None:
    """matmul_q80_* without the checks, on kernel path `use` (``_kernel_path``; tests)."""
    _bound_matmul(out, xq, xd, w, use)()


def _fast_ok(out, xq, xd, w, cls) -> bool:
    try:
        T = xq.shape[0]
        return (type(w) is cls and xq.dtype == _I8 and xd.dtype == _F32 and out.dtype == _F32
                and xq.ndim == 2 and xq.shape[1] == w.cols and xd.shape == (T, w.nb) and out.shape == (T, w.rows)
                and xq.flags.c_contiguous and xd.flags.c_contiguous and out.flags.c_contiguous
                and out.flags.writeable)
    except (AttributeError, IndexError, TypeError):
        return False


def _checks(out, xq, xd, w, cls) -> None:
    if not isinstance(w, cls):
        raise ValueError(f"w: expected a {cls.__name__}, got {type(w).__name__}")
    _check("xq", xq, np.int8, ndim=2)
    T, cols = xq.shape
    if cols != w.cols:
        raise ValueError(f"xq: has {cols} columns but w is {w.rows}x{w.cols}")
    _check("xd", xd, np.float32, (T, cols // QK))
    _check_out("out", out, np.float32, (T, w.rows))


def _bound_rows_q4(out, xq, xd, buf, rows, nb, sb, hasm, path: str):
    T = xq.shape[0]
    xi, xf = _rbuffers(T, nb)
    if path == "generic":
        return partial(_rows_q4_generic, out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, _ACC)
    serial = rows * nb * T < _jit._PAR_MIN_BLOCKS or rows <= 2 * _RT4 or _jit._NUM_THREADS == 1
    if path in VNNI_TAGS:
        fn = _rows_q4_serial_vnni if serial else _rows_q4_par_vnni
        return partial(fn, VNNI_TAGS[path], out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, _ACCV)
    return partial(_rows_q4_serial if serial else _rows_q4_par, out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, _ACC)


# ---------------------------------------------------------------- f16 weights

def matmul_f16(out: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """out[T, rows] = x[T, cols] @ f32(w[rows, cols]).T for float16 weights (f32 products and
    sums; matmul_f16's module docstring)."""
    _check("x", x, np.float32, ndim=2)
    _check("w", w, np.float16, ndim=2)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x: has {x.shape[1]} columns but w is {w.shape[0]}x{w.shape[1]}")
    _check_out("out", out, np.float32, (x.shape[0], w.shape[0]))
    (rows, cols), T = w.shape, x.shape[0]
    if T == 0 or rows == 0:
        return
    serial = rows * cols * T < 1 << 18 or _jit._NUM_THREADS == 1
    (_f16_rows_serial if serial else _f16_rows_par)(out, x, w.view(np.uint16), rows, cols, T)


# ---------------------------------------------------------------- f32 matmul

def matmul_f32(out: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """out[T, rows] = x[T, cols] @ w[rows, cols].T  (numpy / OpenBLAS sgemm)."""
    _check("x", x, np.float32, ndim=2)
    _check("w", w, np.float32, ndim=2)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x: has {x.shape[1]} columns but w is {w.shape[0]}x{w.shape[1]}")
    _check_out("out", out, np.float32, (x.shape[0], w.shape[0]))
    np.matmul(x, w.T, out=out)
