#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster on this machine (Debian 12, as root, no systemd).
#
#   sudo .ci/slurm_up.sh            # install (if needed), configure, start, wait until the node is idle
#   .ci/slurm_up.sh --status        # print daemons, sinfo, squeue; change nothing
#   .ci/slurm_up.sh --down          # stop slurmd, slurmctld (munged, slurmdbd, mariadbd stay up)
#
# Idempotent: with the daemons up and the same config a re-run only checks the node (< 1 s).
# What it sets up (and why):
#   - Debian packages (--no-install-recommends; apt-get update only when something is missing):
#     slurmctld slurmd slurm-client munge (8 packages), plus slurmdbd mariadb-server for accounting.
#   - munged as user munge with /etc/munge/munge.key (created if missing).
#   - Accounting (default on): slurmdbd over a local MariaDB (root over the unix socket), so
#     `sacct` works. submitit polls `sacct` for job states; without it every job is UNKNOWN and a
#     job killed before writing its result pickle leaves `job.result()` (and the Hydra launcher)
#     waiting forever. SLURM_UP_ACCOUNTING=0 skips it (then `scontrol show job` is the only
#     source of job state; it keeps finished jobs for MinJobAge=3600 s either way).
#   - /etc/slurm/slurm.conf for this host: one node (NodeName=$(hostname -s), NodeAddr=127.0.0.1,
#     CPUs/RealMemory from `slurmd -C`), one partition `debug` (Default=YES).
#     proctrack/linuxproc + task/none: no cgroups inside a container/VM without systemd.
#     select/cons_tres with CR_Core: CPUs are the consumable, memory is NOT (a job without --mem
#     would otherwise take the whole node's memory and serialise a sweep).
#     JobRequeue=1 (batch jobs may be requeued), ReturnToService=2 (a DOWN node comes back when
#     slurmd registers), KillWait=10 (SIGTERM → SIGKILL grace), AuthInfo=cred_expire=10 (a
#     requeued job waits cred_expire+1 s before it may start again; Slurm's default is 120 s),
#     sched_interval/bf_interval=2 s (so that wait ends promptly instead of at the next 30-60 s pass).
#   - slurmctld and slurmd as daemons (pid files under /run, logs under /var/log/slurm).
# Env: SLURM_UP_ACCOUNTING=0|1 (default 1), SLURM_UP_CPUS (advertise more CPU slots than cores,
# e.g. 8, so several 1-CPU jobs run at once; uses SlurmdParameters=config_overrides),
# SLURM_UP_TIMEOUT (s per wait, default 60), SLURM_UP_CRED_EXPIRE (s, default 10).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
DBD_PID=/run/slurmdbd.pid
CLUSTER=nanochat
ACCOUNTING=${SLURM_UP_ACCOUNTING:-1}
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
HOST=$(hostname -s)
T0=$(date +%s)

say() { echo "[slurm_up +$(( $(date +%s) - T0 ))s] $*"; }

diagnose() {
    echo "---- diagnostics ----------------------------------------------------------" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmdbd.log" \
             /var/log/munge/munged.log /var/log/mysql/error.log; do
        [[ -f $f ]] && { echo "== tail $f" >&2; tail -n 30 "$f" >&2; }
    done
    echo "== processes" >&2
    ps -eo pid,user,args | grep -E '[s]lurm|[m]unged|[m]ariadbd' >&2 || true
    echo "== sinfo" >&2
    timeout 10 sinfo -N -l >&2 || true
    timeout 10 scontrol show node "$HOST" >&2 || true
}

die() { echo "[slurm_up] ERROR: $*" >&2; diagnose; exit 1; }

# pid_alive FILE: true when FILE holds the pid of a running process
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
ctld_up() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
db_up() { mariadb -e 'select 1' >/dev/null 2>&1; }
dbd_up() { timeout 10 sacctmgr -n show cluster format=cluster >/dev/null 2>&1; }

# wait_for SECONDS CMD...: poll CMD every 0.5 s
wait_for() {
    local n=$(( $1 * 2 )); shift
    for _ in $(seq "$n"); do "$@" && return 0; sleep 0.5; done
    "$@"
}

stop_pid() {  # stop_pid PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local pid
    if pid_alive "$1"; then
        pid=$(cat "$1"); kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$1"
}

stop_daemons() { stop_pid "$SLURMD_PID"; stop_pid "$CTLD_PID"; }

# write_if_changed FILE MODE CONTENT: atomically (re)write FILE; true when it changed
write_if_changed() {
    if [[ -f $1 ]] && [[ "$(cat "$1")" == "$3" ]]; then return 1; fi
    printf '%s\n' "$3" >"$1.tmp" && chmod "$2" "$1.tmp" && mv "$1.tmp" "$1"
}

case "${1:-}" in
    --status)
        ps -eo pid,user,args | grep -E '[s]lurm(ctld|d|dbd)|[m]unged|[m]ariadbd' || true
        sinfo -N -l; squeue; exit 0 ;;
    --down)
        stop_daemons; say "slurmctld/slurmd stopped"; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--status|--down]" >&2; exit 2 ;;
esac

[[ $(id -u) -eq 0 ]] || { echo "[slurm_up] must run as root (installs packages, starts daemons)" >&2; exit 1; }

# ---------------------------------------------------------------------------------------- packages
want=(slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge)
(( ACCOUNTING )) && want+=(slurmdbd:slurmdbd mariadbd:mariadb-server)
missing=()
for b in "${want[@]}"; do
    command -v "${b%%:*}" >/dev/null 2>&1 || [[ -x /usr/sbin/${b%%:*} ]] || missing+=("${b##*:}")
done
if (( ${#missing[@]} )); then
    say "installing ${missing[*]}"
    mkdir -p "$LOG_DIR"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$LOG_DIR/apt.log" 2>&1 || { tail -n 20 "$LOG_DIR/apt.log" >&2; die "apt-get update failed"; }
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOG_DIR/apt.log" 2>&1 \
        || { tail -n 30 "$LOG_DIR/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
fi

# ------------------------------------------------------------------------------------------- munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    say "starting munged"
    pid_alive /run/munge/munged.pid && kill "$(cat /run/munge/munged.pid)" && sleep 0.5
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 || die "munged failed to start"
    wait_for 10 munge_ok || die "munge credential round trip failed"
fi

# -------------------------------------------------------------------------------------- slurm.conf
# `slurmd -C` prints "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
hw=$(slurmd -C | head -n 1)
field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$hw"; }
cpus=$(field CPUs); mem=$(field RealMemory)
[[ -n $cpus && -n $mem ]] || die "could not parse 'slurmd -C': $hw"
node_hw="CPUs=$cpus SocketsPerBoard=$(field SocketsPerBoard) CoresPerSocket=$(field CoresPerSocket) ThreadsPerCore=$(field ThreadsPerCore)"
overrides=""
if [[ -n ${SLURM_UP_CPUS:-} && ${SLURM_UP_CPUS} != "$cpus" ]]; then
    node_hw="CPUs=$SLURM_UP_CPUS"                 # advertised slots != cores: the config wins
    overrides="SlurmdParameters=config_overrides"  # instead of draining the node
fi
if (( ACCOUNTING )); then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
    accounting="AccountingStorageType=accounting_storage/none"
fi

mkdir -p /etc/slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
slurm_conf=$(cat <<EOF
# Generated by .ci/slurm_up.sh for host $HOST: a single-node test cluster. Re-run the script to regenerate.
ClusterName=$CLUSTER
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
$accounting
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$overrides
NodeName=$HOST NodeAddr=127.0.0.1 $node_hw RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if write_if_changed "$CONF" 644 "$slurm_conf"; then
    conf_changed=1
    say "wrote $CONF ($node_hw RealMemory=$mem, accounting=$ACCOUNTING)"
fi

# ------------------------------------------------------------------------ accounting (MariaDB + slurmdbd)
if (( ACCOUNTING )); then
    mkdir -p /run/mysqld /var/log/mysql && chown mysql:mysql /run/mysqld /var/log/mysql
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        say "initialising MariaDB in /var/lib/mysql"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql --auth-root-authentication-method=socket \
            >"$LOG_DIR/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG_DIR/mariadb-install.log)"
    fi
    if ! db_up; then
        say "starting mariadbd"
        setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
            --pid-file=/run/mysqld/mysqld.pid --log-error=/var/log/mysql/error.log --bind-address=127.0.0.1 \
            --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
        wait_for "$TIMEOUT" db_up || die "mariadbd did not come up in ${TIMEOUT}s"
    fi
    dbd_conf=$(cat <<EOF
# Generated by .ci/slurm_up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$DBD_PID
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
)
    if write_if_changed "$DBD_CONF" 600 "$dbd_conf"; then
        stop_pid "$DBD_PID"
    fi
    if ! pid_alive "$DBD_PID"; then
        say "starting slurmdbd"
        /usr/sbin/slurmdbd </dev/null >>"$LOG_DIR/slurmdbd.stdout" 2>&1 || die "slurmdbd failed to start"
    fi
    wait_for "$TIMEOUT" dbd_up || die "slurmdbd does not answer 'sacctmgr show cluster' after ${TIMEOUT}s"
    if ! timeout 10 sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        timeout 10 sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
        say "registered cluster $CLUSTER in slurmdbd"
        conf_changed=1  # a running slurmctld must reconnect to register
    fi
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
wait_for "$TIMEOUT" ctld_up || die "slurmctld does not answer 'scontrol ping' after ${TIMEOUT}s"
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
if (( ACCOUNTING )); then
    timeout 10 sacct -n -X -S now-1minutes >/dev/null 2>&1 || die "sacct does not work although accounting is on"
fi
say "cluster ready: node $HOST is $state ($(sinfo -h -o '%P %D nodes %c CPUs %m MB' | head -n 1)), accounting=$ACCOUNTING, took $(( $(date +%s) - T0 ))s"
