#!/usr/bin/env bash
# One MPI rank of the test suite (started by tests/run.sh under mpiexec). Rank 0 prints
# pytest's report; the others print theirs only when they fail (verdicts are computed on
# the root and broadcast, so every rank passes or fails alike).
rank=${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}
cmd=(python -m mpi4py -m pytest --with-mpi -q -p no:cacheprovider "$@")
if [ "$rank" = 0 ]; then
    exec "${cmd[@]}"
fi
out=$("${cmd[@]}" 2>&1) || { printf 'rank %s:\n%s\n' "$rank" "$out"; exit 1; }
