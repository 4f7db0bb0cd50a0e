# Sourced by the job scripts in jobs/: the site's settings, the environment every rank needs,
# and the launch. `set -u` safe: nothing here relies on $USER or other variables a batch
# environment may not set. Every setting can be exported before sbatch (or `bash jobs/X`).

# --- site settings --------------------------------------------------------------------------
DLLAMA_HOME=${DLLAMA_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}  # the repository
VENV=${VENV:-$DLLAMA_HOME/.venv}       # where `pip install -e .` put dllama_mpi
LAUNCHER=${LAUNCHER:-mpiexec}          # mpiexec: the MPI's own launcher (PyPI MPICH's hydra
                                       #   starts its ranks through srun inside a job);
                                       # srun: `srun --mpi=pmi2` (a site MPI built with PMI2)
# module load mpi                      # a site MPI, with mpi4py built against it (README)

# --- the environment of every rank ---------------------------------------------------------
if [ -x "$VENV/bin/python" ]; then
    export VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH
fi
PYTHON=${PYTHON:-python}
NTASKS=${SLURM_NTASKS:-${NTASKS:-2}}             # ranks (outside SLURM: NTASKS, default 2)
# Since Slurm 22.05 --cpus-per-task is not passed to srun by itself.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-${CPUS_PER_TASK:-1}}
export NUMBA_NUM_THREADS=$SRUN_CPUS_PER_TASK
NTHREADS=$SRUN_CPUS_PER_TASK                      # threads per rank
# Kernels: the same numba cache as interactive runs (~/.cache/dllama_mpi/numba/<digest>, or
# $NUMBA_CACHE_DIR when exported), so a job after an interactive run compiles nothing. Rank 0
# compiles first and the others load after it; numba writes each cache file under a temporary
# name and renames it, so nodes sharing the home directory never read half a file, and a node
# with another CPU model keeps its own entries beside them.
# Compute nodes often have no internet: run `python -m dllama_mpi pull smollm2-135m` on a login
# node beforehand (the cache, ~/.cache/dllama_mpi or $DLLAMA_MPI_CACHE, must be shared).

# dllama_command ARGS...: DLLAMA_CMD=(the command that runs `python -m dllama_mpi ARGS` on
# $NTASKS ranks with $LAUNCHER). Run it as "${DLLAMA_CMD[@]}" (in the background: `&`, and $!
# is the launcher itself, which passes the signals it gets on to every rank).
dllama_command() {
    case "$LAUNCHER" in
        srun) DLLAMA_CMD=(srun --mpi=pmi2 --ntasks="$NTASKS"
                          --cpus-per-task="$SRUN_CPUS_PER_TASK" "$PYTHON" -m dllama_mpi "$@") ;;
        mpiexec|mpirun) DLLAMA_CMD=("$LAUNCHER" -n "$NTASKS" "$PYTHON" -m dllama_mpi "$@") ;;
        *) echo "error: LAUNCHER must be mpiexec, mpirun or srun, got '$LAUNCHER'" >&2
           exit 2 ;;
    esac
}

# dllama_wait PID: wait for PID through the signals this script traps (a trapped signal ends
# `wait` early, with a status > 128); sets DLLAMA_RC to PID's exit code.
dllama_wait() {
    local pid=$1 rc again
    while :; do
        wait "$pid" && rc=0 || rc=$?
        [ "$rc" -le 128 ] && break
        if ! kill -0 "$pid" 2>/dev/null; then       # gone: its status, if not consumed yet
            wait "$pid" 2>/dev/null && again=0 || again=$?
            [ "$again" -ne 127 ] && rc=$again
            break
        fi
    done
    DLLAMA_RC=$rc
}
