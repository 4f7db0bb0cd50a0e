"""dllama_mpi: tensor-parallel LLM inference for CPU clusters on MPI."""
# numba's threading layer is chosen per run, before the first parallel call:
# see kernels.choose_threading_layer.
import os as _os

__version__ = "0.1.0"


def _kernels_digest(package: str | None = None) -> str:
    """A digest of the kernel sources (kernels/ and quant/, whose constants they use): numba
    checks only the file that defines a kernel, not the files of the functions it inlines, so
    a cache kept across a change of simd.py or q80.py would run the old code in the kernels of
    ffn.py or norm.py. One cache folder per digest: an upgrade compiles afresh."""
    import hashlib
    h = hashlib.sha1()
    here = package or _os.path.dirname(_os.path.abspath(__file__))
    for sub in ("kernels", "quant"):
        folder = _os.path.join(here, sub)
        for name in sorted(f for f in _os.listdir(folder) if f.endswith(".py")):
            h.update(name.encode())
            with open(_os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


def _default_numba_cache() -> None:
    """numba caches compiled kernels beside the sources unless NUMBA_CACHE_DIR says where
    (read when numba is imported: this runs first). Ours is in the user cache, next to the
    models, in a folder per version of the kernel sources (_kernels_digest): one cache for
    interactive runs, the tests and SLURM jobs (whose nodes see the home directory), wherever
    the package is installed; numba keys it by source path and CPU, and the root compiles
    before the other ranks read it."""
    if "NUMBA_CACHE_DIR" not in _os.environ:
        from .registry import cache_dir
        _os.environ["NUMBA_CACHE_DIR"] = _os.path.join(cache_dir(), "numba", _kernels_digest())
        import sys
        if "numba" in sys.modules:      # imported before us: make it read the variable again
            sys.modules["numba"].core.config.reload_config()


_default_numba_cache()
