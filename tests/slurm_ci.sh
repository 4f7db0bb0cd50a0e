#!/usr/bin/env bash
# The SLURM tests on a real single-node SLURM: bring one up (tests/slurm/slurm_up.sh: Debian's
# slurmctld slurmd slurm-client munge, installed with apt-get when missing), run
# tests/slurm/test_slurm_jobs.py, then cancel its jobs and stop the daemons it started.
# Where SLURM cannot be brought up the tests are reported as skipped, with the reason.
#     bash tests/slurm_ci.sh            (as root; ~5-10 min on 2 cores)
set -uo pipefail
cd "$(dirname "$0")/.."
export DLLAMA_SLURM_DIR=${DLLAMA_SLURM_DIR:-/tmp/dllama-slurm}
started=0
if [ -f "$DLLAMA_SLURM_DIR/slurmctld.pid" ] && kill -0 "$(cat "$DLLAMA_SLURM_DIR/slurmctld.pid")" 2>/dev/null; then
    echo "using the SLURM already up in $DLLAMA_SLURM_DIR"
    export SLURM_CONF=$DLLAMA_SLURM_DIR/slurm.conf
else
    bash tests/slurm/slurm_up.sh "$DLLAMA_SLURM_DIR"
    case $? in
        0) started=1; export SLURM_CONF=$DLLAMA_SLURM_DIR/slurm.conf ;;
        77) unset SLURM_CONF ;;            # the tests skip, saying why
        *) echo "slurm_up.sh failed"; exit 1 ;;
    esac
fi
if [ "$started" = 1 ]; then
    trap 'bash tests/slurm/slurm_down.sh "$DLLAMA_SLURM_DIR"' EXIT
fi
python -m pytest -v -rs -p no:cacheprovider tests/slurm
