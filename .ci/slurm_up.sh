#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster on this machine (Debian 12, as root, no systemd).
#
#   sudo .ci/slurm_up.sh            # install (if needed), configure, start, wait until the node is idle
#   .ci/slurm_up.sh --status        # print sinfo/squeue and the daemons' pids, change nothing
#   .ci/slurm_up.sh --down          # stop slurmd, slurmctld (munged stays up)
#
# Idempotent: re-running with the daemons already up and the same config only checks the node.
# What it sets up (and why):
#   - Debian packages slurmctld slurmd slurm-client munge (--no-install-recommends: 8 packages,
#     no mail server, no MariaDB). apt-get update runs only when something must be installed.
#   - munged as user munge with /etc/munge/munge.key (created if missing).
#   - /etc/slurm/slurm.conf for this host: one node (NodeName=$(hostname -s), NodeAddr=127.0.0.1,
#     CPUs/RealMemory from `slurmd -C`), one partition `debug` (Default=YES).
#     proctrack/linuxproc + task/none: no cgroups inside a container/VM without systemd.
#     select/cons_tres with CR_Core: CPUs are the consumable; memory is NOT (a job without --mem
#     would otherwise take the whole node's memory and serialise a sweep).
#     No slurmdbd: `sacct` does not work here. Job state comes from `scontrol show job`, which
#     keeps finished jobs for MinJobAge=3600 s. submitit therefore sees state UNKNOWN and relies on
#     its result pickle to know a job is done (see tests/slurm_cluster.py).
#     JobRequeue=1 (batch jobs may be requeued), ReturnToService=2 (a DOWN node comes back when
#     slurmd registers), KillWait=10 (SIGTERM → SIGKILL grace, short for tests).
#   - slurmctld and slurmd as daemons (pid files under /run, logs under /var/log/slurm).
# Env overrides: SLURM_UP_CPUS (advertise more CPU slots than cores, e.g. 8, so several 1-CPU
# test jobs run at once; uses SlurmdParameters=config_overrides), SLURM_UP_TIMEOUT (s, default 60).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
HOST=$(hostname -s)
T0=$(date +%s)

say() { echo "[slurm_up +$(( $(date +%s) - T0 ))s] $*"; }

diagnose() {
    echo "---- diagnostics ----------------------------------------------------------" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [[ -f $f ]] && { echo "== tail $f" >&2; tail -n 30 "$f" >&2; }
    done
    echo "== processes" >&2
    ps -eo pid,user,args | grep -E '[s]lurm|[m]unged' >&2 || true
    echo "== sinfo" >&2
    timeout 10 sinfo -N -l >&2 || true
    timeout 10 scontrol show node "$HOST" >&2 || true
}

die() { echo "[slurm_up] ERROR: $*" >&2; diagnose; exit 1; }

# pid_alive FILE: true when FILE holds the pid of a running process
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

ctld_up() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

stop_daemons() {
    local f pid
    for f in "$SLURMD_PID" "$CTLD_PID"; do
        if pid_alive "$f"; then
            pid=$(cat "$f"); kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$f"
    done
}

case "${1:-}" in
    --status)
        ps -eo pid,user,args | grep -E '[s]lurm(ctld|d)|[m]unged' || true
        sinfo -N -l; squeue; exit 0 ;;
    --down)
        stop_daemons; say "slurmctld/slurmd stopped"; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--status|--down]" >&2; exit 2 ;;
esac

[[ $(id -u) -eq 0 ]] || { echo "[slurm_up] must run as root (installs packages, starts daemons)" >&2; exit 1; }

# ---------------------------------------------------------------------------------------- packages
missing=()
for b in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge; do
    command -v "${b%%:*}" >/dev/null 2>&1 || missing+=("${b##*:}")
done
if (( ${#missing[@]} )); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# ------------------------------------------------------------------------------------------- munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    pid_alive /run/munge/munged.pid && kill "$(cat /run/munge/munged.pid)" && sleep 0.5
    rm -f /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 || die "munged failed to start"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || die "munge credential round trip failed"
fi

# -------------------------------------------------------------------------------------- slurm.conf
# `slurmd -C` prints "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
hw=$(slurmd -C | head -n 1)
field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$hw"; }
cpus=$(field CPUs); mem=$(field RealMemory)
sockets=$(field SocketsPerBoard); cores=$(field CoresPerSocket); threads=$(field ThreadsPerCore)
[[ -n $cpus && -n $mem ]] || die "could not parse 'slurmd -C': $hw"
node_hw="CPUs=$cpus SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads"
overrides=""
if [[ -n ${SLURM_UP_CPUS:-} && ${SLURM_UP_CPUS} != "$cpus" ]]; then
    # advertised slots != real cores: let the config win instead of draining the node
    node_hw="CPUs=$SLURM_UP_CPUS"
    overrides="SlurmdParameters=config_overrides"
fi

mkdir -p /etc/slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
new_conf=$(cat <<EOF
# Generated by .ci/slurm_up.sh for host $HOST: a single-node test cluster. Re-run the script to regenerate.
ClusterName=nanochat
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
AuthInfo=cred_expire=${SLURM_UP_CRED_EXPIRE:-10}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmdTimeout=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$overrides
NodeName=$HOST NodeAddr=127.0.0.1 $node_hw RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    printf '%s\n' "$new_conf" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    conf_changed=1
    say "wrote $CONF ($node_hw RealMemory=$mem)"
fi

# ----------------------------------------------------------------------------------------- daemons
if (( conf_changed )) && { pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; }; then
    say "config changed: restarting slurmctld/slurmd"
    stop_daemons
fi
if ! pid_alive "$CTLD_PID"; then
    say "starting slurmctld"
    /usr/sbin/slurmctld </dev/null >>"$LOG_DIR/slurmctld.stdout" 2>&1 || die "slurmctld failed to start"
fi
for _ in $(seq $(( TIMEOUT * 2 ))); do ctld_up && break; sleep 0.5; done
ctld_up || die "slurmctld does not answer 'scontrol ping' after ${TIMEOUT}s"
if ! pid_alive "$SLURMD_PID"; then
    say "starting slurmd"
    /usr/sbin/slurmd </dev/null >>"$LOG_DIR/slurmd.stdout" 2>&1 || die "slurmd failed to start"
fi

# -------------------------------------------------------------------------------- wait for the node
# sinfo -h -o %T gives e.g. idle, mixed, allocated, down*, drained, unknown*
deadline=$(( $(date +%s) + TIMEOUT ))
resumed=0
while :; do
    state=$(timeout 10 sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*)
            if (( ! resumed )) && pid_alive "$SLURMD_PID"; then
                reason=$(timeout 10 sinfo -h -n "$HOST" -o %E 2>/dev/null || true)
                say "node is $state (reason: ${reason:-none}): resuming it"
                scontrol update nodename="$HOST" state=resume || true
                resumed=1
            fi ;;
    esac
    (( $(date +%s) < deadline )) || die "node $HOST is '${state:-?}' after ${TIMEOUT}s (want idle)"
    pid_alive "$SLURMD_PID" || die "slurmd is not running"
    sleep 0.5
done
say "cluster ready: node $HOST is $state ($(sinfo -h -o '%P %D %c CPUs %m MB' | head -n 1)), took $(( $(date +%s) - T0 ))s"
