#!/usr/bin/env bash
# Stop what tests/slurm/slurm_up.sh started in DIR: cancel its jobs, then stop slurmd,
# slurmctld and munged by the PIDs in their own pid files (nothing else is touched).
set -uo pipefail
DIR=${1:-${DLLAMA_SLURM_DIR:-/tmp/dllama-slurm}}
[ -d "$DIR" ] || exit 0
export SLURM_CONF=$DIR/slurm.conf
if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 30); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 1
        done
    fi
fi
stop() {     # stop NAME PIDFILE: TERM, then KILL after 10 s
    local pidfile=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        echo "stopped $1 ($pid)"
    fi
    rm -f "$pidfile"
}
stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
stop munged "$DIR/munge/munged.pid"
exit 0
