#!/usr/bin/env bash
# Bring up a single-node SLURM for the SLURM tests: Debian's `slurmctld slurmd slurm-client
# munge` (installed with apt-get when missing), run as root without systemd, every file in one
# scratch folder, ports 16817/16818 (not the defaults: a site SLURM is left alone).
#
#   bash tests/slurm/slurm_up.sh [DIR]      # DIR: default $DLLAMA_SLURM_DIR or /tmp/dllama-slurm
#   export SLURM_CONF=DIR/slurm.conf        # then sbatch/squeue/scontrol talk to it
#   bash tests/slurm/slurm_down.sh [DIR]    # cancels its jobs and stops the daemons it started
#
# Exit 0: up (the node is idle). Exit 77: cannot be brought up here; the reason is printed as
# "SKIP: ..." and written to DIR/skip_reason (the tests report it as their skip reason).
# Facts behind the settings: ../shared/notes/mpi-slurm.md (daemons need stdin/stdout that are
# not closed; one key=value a line; MinJobAge small for sbatch --wait; config_overrides lets
# the node advertise more CPUs than it has).
set -euo pipefail
DIR=${1:-${DLLAMA_SLURM_DIR:-/tmp/dllama-slurm}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
rm -f "$DIR/skip_reason"

skip() {
    echo "SKIP: $*" | tee "$DIR/skip_reason"
    exit 77
}

[ "$(id -u)" = 0 ] || skip "bringing up slurmctld/slurmd/munged needs root"
need=(slurmctld slurmd munged sbatch scontrol sinfo)
missing() { for c in "${need[@]}"; do command -v "$c" >/dev/null || return 0; done; return 1; }
if missing; then
    command -v apt-get >/dev/null || skip "SLURM is not installed and there is no apt-get"
    echo "installing slurmctld slurmd slurm-client munge with apt-get (log: $DIR/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q slurmctld slurmd slurm-client munge >"$DIR/apt.log" 2>&1; then
        apt-get update -q >>"$DIR/apt.log" 2>&1 || true
        apt-get install -y -q slurmctld slurmd slurm-client munge >>"$DIR/apt.log" 2>&1 ||
            skip "apt-get install slurmctld slurmd slurm-client munge failed (see $DIR/apt.log)"
    fi
    missing && skip "SLURM commands still missing after apt-get install"
fi
id munge >/dev/null 2>&1 || skip "no 'munge' user (the munge package did not install cleanly)"

if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    echo "SLURM already up in $DIR"
    exit 0
fi

NODE=$(hostname -s)
getent hosts "$NODE" >/dev/null || skip "the host name $NODE does not resolve (hydra and slurmd need it: add it to /etc/hosts)"
# munge: the socket's folder must be reachable by all, the key's by munge alone
mkdir -p "$DIR/munge/private" "$DIR/state" "$DIR/spool"
chown -R munge: "$DIR/munge"
chmod 0755 "$DIR/munge"
chmod 0700 "$DIR/munge/private"
KEY=$DIR/munge/private/munge.key
if [ ! -f "$KEY" ]; then
    dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none
fi
chown munge: "$KEY"
chmod 0400 "$KEY"
SOCKET=$DIR/munge/munge.socket

cat >"$DIR/slurm.conf" <<CONF
ClusterName=dllamaci
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=pmi2
MinJobAge=5
KillWait=10
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=ci Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF

# munged as user munge; every daemon with stdin/stdout that are not closed
runuser -u munge -- munged --socket="$SOCKET" --key-file="$KEY" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/private/munged.log" \
    --seed-file="$DIR/munge/private/munged.seed" </dev/null >>"$DIR/munged.out" 2>&1 ||
    skip "munged did not start (see $DIR/munged.out and $DIR/munge/private/munged.log)"
export SLURM_CONF=$DIR/slurm.conf
slurmctld -f "$SLURM_CONF" </dev/null >>"$DIR/slurmctld.out" 2>&1 ||
    skip "slurmctld did not start (see $DIR/slurmctld.log)"
slurmd -f "$SLURM_CONF" </dev/null >>"$DIR/slurmd.out" 2>&1 ||
    skip "slurmd did not start (see $DIR/slurmd.log)"

for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    case "$state" in
        idle*) echo "SLURM up in $DIR (node $NODE idle): export SLURM_CONF=$SLURM_CONF"; exit 0 ;;
        down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
skip "the node did not become idle in 60 s (state: ${state:-none}; see $DIR/slurmctld.log)"
