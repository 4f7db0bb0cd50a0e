"""dllama_mpi: tensor-parallel LLM inference for CPU clusters on MPI."""
import os as _os

# numba's OpenMP layer keeps its threads spinning after a parallel region, which starves
# the BLAS threads numpy uses for F32 and prefill matmuls (measured here: 26 tok/s with
# workqueue, 0.7 tok/s with omp on F32 SmolLM2). workqueue threads sleep when idle.
_os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

__version__ = "0.1.0"
