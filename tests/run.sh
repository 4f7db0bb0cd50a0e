#!/usr/bin/env bash
# The whole test suite: one-process tests, then the MPI tests at 2, 3 and 4 ranks.
# Each MPI run has a hard timeout so that a hang fails instead of blocking CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -p no:cacheprovider tests --ignore=tests/mpi
for n in 2 3 4; do
    echo "== MPI tests on $n ranks =="
    timeout 1200 mpiexec -n "$n" python -m mpi4py -m pytest --with-mpi -q -p no:cacheprovider \
        tests/mpi 2>&1 | grep -v -E '^(MPICH|MPI vendor|mpi4py)' || exit 1
done
