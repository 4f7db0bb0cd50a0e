#!/usr/bin/env bash
# The whole test suite: one-process tests, then the MPI tests at 2, 3 and 4 ranks.
# Each MPI run has a hard timeout so that a hang fails instead of blocking CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -p no:cacheprovider tests --ignore=tests/mpi
for n in 2 3 4; do
    echo "== MPI tests on $n ranks =="
    timeout 1200 mpiexec -n "$n" bash tests/mpi/run_rank.sh tests/mpi
done
