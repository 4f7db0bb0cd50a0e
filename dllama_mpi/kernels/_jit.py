"""Numba flags and threads: the one place.

Every kernel module takes its decorators from here and spells out no numba flag itself:

* ``_serial`` / ``_parallel``: fastmath kernels (one thread / ``prange`` over the threads);
* ``_exact``: exact IEEE semantics, for code whose rounding must match GGML bit for bit;
* ``_inline``: fastmath helpers inlined into their callers (numba IR inlining);
* ``_inline_plain``: inlined helpers with numba's default flags (no fastmath).

The thread count and the thresholds that depend on it are module state: other modules read
them as ``_jit._NUM_THREADS`` / ``_jit._PAR_MIN_BLOCKS`` at call time, never import them by
name (``set_num_threads`` rebinds them).

Caching (``cache=True``): compiled kernels go to ``$NUMBA_CACHE_DIR``, which dllama_mpi sets
(before numba is imported) to ``numba/<digest of kernels/ and quant/>`` in the user cache
(``~/.cache/dllama_mpi/``, see ``dllama_mpi/__init__.py``) unless it is set already:
interactive runs, tests and batch jobs share it. numba checks only the file that defines a
kernel, not the modules it calls into; the digest makes any edit of these sources a new
folder. With ``$NUMBA_CACHE_DIR`` set by hand, clear it after editing ``simd``, ``q80`` or
any other module whose kernels are called from another file.
"""
from __future__ import annotations

import os

import numba
from numba import njit

_FLAGS = dict(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)
_serial = njit(parallel=False, **_FLAGS)
_parallel = njit(parallel=True, **_FLAGS)
# exact IEEE semantics (rounding must match GGML bit for bit)
_exact = njit(parallel=False, cache=True, fastmath=False, nogil=True, error_model="numpy", boundscheck=False)
_inline = njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
_inline_plain = njit(inline="always", cache=True)

# elements of work under which a serial call beats a parallel launch
_PAR_MIN_WORK = 1 << 16
# the same for the fused norm and silu·mul with their Q80 output on several rows: their
# rows split over the threads from far less work, because a serial call between two
# parallel matmuls lets the idle threads fall asleep (GOMP_SPINCOUNT, below), and waking
# them costs the next matmul more than the split costs
_PAR_MIN_ROWS_WORK = 1 << 12
# row-tile matmuls go parallel from this many weight blocks x tokens (set with the thread
# count): OpenMP threads start a parallel region quickly; waking workqueue threads costs
# more than a small FFN matrix takes on one core
_PAR_MIN_BLOCKS = 1 << 17

_NUM_THREADS = numba.config.NUMBA_NUM_THREADS   # as numba.get_num_threads(), which is slow to call


def choose_threading_layer(weights_float_type: str) -> None:
    """Before the first parallel call: OpenMP for 4-bit weights (cheap parallel regions; no
    BLAS in the hot path), workqueue for f32 weights (OpenMP's idle threads spin and starve
    numpy's BLAS threads, which then run the f32 matmuls far slower). A user's
    NUMBA_THREADING_LAYER wins; once threads are running the layer is fixed.

    OpenMP (GNU libgomp) threads spin ~300000 times before sleeping when they wait: with
    another busy process on the node, every parallel region then waits for a thread that
    spins or is descheduled, and decoding collapses. We set GOMP_SPINCOUNT=1000 unless the
    user chose a wait policy: as fast as the default alone, and robust beside a busy process."""
    if "NUMBA_THREADING_LAYER" in os.environ or numba.np.ufunc.parallel._is_initialized:
        return
    numba.config.THREADING_LAYER = "workqueue" if weights_float_type == "f32" else "omp"
    if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
        os.environ["GOMP_SPINCOUNT"] = "1000"    # read by libgomp when numba first loads it


def max_threads() -> int:
    """The most threads a run may ask for: numba's NUMBA_NUM_THREADS (by default the machine's
    CPUs; the environment variable lowers or raises it), fixed when numba is imported."""
    return int(numba.config.NUMBA_NUM_THREADS)


def set_num_threads(n: int) -> None:
    """Set the number of numba threads used by the parallel kernels (1..NUMBA_NUM_THREADS)."""
    global _PAR_MIN_BLOCKS, _NUM_THREADS
    numba.set_num_threads(int(n))
    _NUM_THREADS = int(n)
    _PAR_MIN_BLOCKS = (1 << 14) if numba.threading_layer() == "omp" else (1 << 17)


def get_num_threads() -> int:
    return _NUM_THREADS
