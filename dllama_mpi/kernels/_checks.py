"""Argument checks of the public kernel wrappers: ``ValueError`` with a clear message."""
from __future__ import annotations

import numpy as np

_I8, _F32, _I32 = np.dtype(np.int8), np.dtype(np.float32), np.dtype(np.int32)
_DTYPES = {t: np.dtype(t) for t in (np.float32, np.int8, np.int16, np.int32, np.uint8, np.uint16, np.float16)}


def _check(name: str, arr, dtype, shape: tuple | None = None, ndim: int | None = None) -> np.ndarray:
    # hot (several calls per kernel call at decode): cheap comparisons first, messages only on failure
    if type(arr) is not np.ndarray and not isinstance(arr, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    dt = _DTYPES.get(dtype)
    if arr.dtype != (dt if dt is not None else np.dtype(dtype)):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {arr.dtype.name}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if shape is not None and arr.shape != shape and arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous")
    return arr


def _check_out(name: str, arr, dtype, shape) -> np.ndarray:
    _check(name, arr, dtype, shape)
    if not arr.flags.writeable:
        raise ValueError(f"{name}: array must be writeable")
    return arr


def _noop() -> None:
    """The bound call (bind_*) when there is nothing to compute."""
    return None
