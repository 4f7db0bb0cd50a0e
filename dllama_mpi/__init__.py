"""dllama_mpi: tensor-parallel LLM inference for CPU clusters on MPI."""
# numba's threading layer is chosen per run, before the first parallel call:
# see kernels.choose_threading_layer.

__version__ = "0.1.0"
