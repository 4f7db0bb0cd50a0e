# Sourced by the job scripts: the environment every rank needs under SLURM.
VENV=${VENV:-$SLURM_SUBMIT_DIR/.venv}   # where `pip install -e .` put dllama_mpi
# module load mpi                  # a site MPI, with mpi4py built against it (see README)

source "$VENV/bin/activate"
# Since Slurm 22.05 --cpus-per-task is not passed to srun by itself.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export NUMBA_NUM_THREADS=$SRUN_CPUS_PER_TASK
# Each node compiles numba kernels into its own cache (shared-filesystem caches race).
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/$USER-numba-cache}
# Rank 0 reads the model and sends each rank its slice (--load direct: every rank reads its
# own from a shared filesystem). Compute nodes often have no internet: run
# `python -m dllama_mpi pull smollm2-135m` on a login node beforehand.
