"""dllama_mpi: tensor-parallel LLM inference for CPU clusters on MPI."""
# numba's threading layer is chosen per run, before the first parallel call:
# see kernels.choose_threading_layer.
import os as _os

__version__ = "0.1.0"


def _default_numba_cache() -> None:
    """numba caches compiled kernels beside the sources unless NUMBA_CACHE_DIR says where
    (read when numba is imported: this runs first). Ours is in the user cache, next to the
    models: one cache for interactive runs, the tests and SLURM jobs (whose nodes see the home
    directory), wherever the package is installed; numba keys it by source path and CPU, and
    the root compiles before the other ranks read it."""
    if "NUMBA_CACHE_DIR" not in _os.environ:
        from .registry import cache_dir
        _os.environ["NUMBA_CACHE_DIR"] = _os.path.join(cache_dir(), "numba")
        import sys
        if "numba" in sys.modules:      # imported before us: make it read the variable again
            sys.modules["numba"].core.config.reload_config()


_default_numba_cache()
