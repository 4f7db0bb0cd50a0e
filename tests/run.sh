#!/usr/bin/env bash
# The whole test suite: one-process tests (in parallel with pytest-xdist: one worker per
# core, at most 4; PYTEST_WORKERS=N to choose, 0 for none), then the MPI tests at 2, 3
# and 4 ranks. Each MPI run has a hard timeout so that a hang fails instead of blocking CI.
set -euo pipefail
cd "$(dirname "$0")/.."
cores=$(python -c 'import os; print(len(os.sched_getaffinity(0)))')
workers=${PYTEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
xdist=()
if [ "$workers" -gt 1 ] && python -c 'import xdist' 2>/dev/null; then
    xdist=(-n "$workers")
fi
start=$SECONDS
python -m pytest -q -p no:cacheprovider "${xdist[@]}" tests --ignore=tests/mpi
echo "== one-process tests: $(( SECONDS - start )) s (pytest ${xdist[*]:-without xdist}) =="
for n in 2 3 4; do
    echo "== MPI tests on $n ranks (the suite so far: $(( SECONDS - start )) s) =="
    timeout 1200 mpiexec -n "$n" bash tests/mpi/run_rank.sh tests/mpi
done
# The SLURM tests on a real single-node SLURM, brought up and stopped by the script (as root,
# with apt-get where SLURM is missing); where one cannot be brought up they are reported as
# skipped, with the reason. DLLAMA_SLURM_TESTS=0 leaves them out.
if [ "${DLLAMA_SLURM_TESTS:-1}" != 0 ]; then
    echo "== SLURM tests (the suite so far: $(( SECONDS - start )) s) =="
    timeout 1800 bash tests/slurm_ci.sh
fi
echo "== all tests: $(( SECONDS - start )) s =="
