#!/usr/bin/env bash
# A two-node Slurm test cluster on ONE machine: each slurmd runs in its own Linux network (and
# UTS) namespace with its own address on a private bridge, so a 2-node job really crosses a
# network between two "hosts". Sibling of .ci/slurm_up.sh; it never touches that cluster.
#
#   .ci/slurm_2node.sh            # build (idempotent), start, wait until both nodes are idle
#   .ci/slurm_2node.sh --status   # print namespaces, daemons, sinfo; change nothing
#   .ci/slurm_2node.sh --down     # stop the daemons, kill what runs in the namespaces, remove the network
#   .ci/slurm_2node.sh --env      # print `export SLURM_CONF=... GLOO_SOCKET_IFNAME=...` for a shell
#
# Use it with SLURM_CONF=/etc/slurm-2node/slurm.conf (sbatch/squeue/scontrol/sacct then talk to
# this cluster) and GLOO_SOCKET_IFNAME=ncnet0 (the namespaces' interface, as NCCL_SOCKET_IFNAME
# would name the fabric on a real cluster).
#
# What it builds (and why):
#   - bridge nc2br0 = 10.77.0.1/24 in the root namespace; slurmctld listens there (port 6827), so
#     both namespaces reach it. It reuses the running munged (a unix socket: namespace-blind) and,
#     when slurmdbd is up (.ci/slurm_up.sh), registers cluster `nc2node` in it so `sacct` works
#     (submitit polls it; see slurm_up.sh). Nothing of the single-node cluster is changed.
#   - namespaces nc2n0 / nc2n1, each with a veth `ncnet0` = 10.77.0.10 / .11 on the bridge, its own
#     hostname (unshare --uts) and /etc/hosts (/etc/netns/<ns>/hosts bound over it in a private mount
#     namespace, the filesystem otherwise shared),
#     its own slurmd (port 6828, spool /var/lib/nc2node/spool/<node>), pinned to its own CPU
#     (taskset) and advertised as CPUs=1: the node's CPU share.
#   - partition `debug` with both nodes (the name slurm_up.sh uses, so hydra/launcher=slurm needs no
#     change). SlurmdTimeout=30 s: a node whose slurmd stops answering is DOWN (its jobs NODE_FAIL,
#     then requeued) within ~30-40 s instead of the default 300 s; longer than the tests'
#     hardware.dist_timeout_s=15, so the surviving ranks record the failure themselves first.
#     ReturnToService=2: a restarted slurmd brings its node back. KillWait=5, cred_expire=10.
# Needs root, iproute2 (ip), util-linux (unshare, taskset) and the Slurm packages (slurm_up.sh
# installs those). Exits 3 when the kernel refuses network namespaces (tests skip on that).
# Env: NC2_TIMEOUT (s per wait, default 60).
set -euo pipefail

CLUSTER=nc2node
CONF_DIR=/etc/slurm-2node
CONF=$CONF_DIR/slurm.conf
VAR=/var/lib/nc2node
LOG_DIR=/var/log/slurm-2node
CTLD_PID=$VAR/slurmctld.pid
BRIDGE=nc2br0
NET=10.77.0
IFNAME=ncnet0
NODES=(nc2n0 nc2n1)
ADDRS=("$NET.10" "$NET.11")
CTLD_PORT=6827
SLURMD_PORT=6828
TIMEOUT=${NC2_TIMEOUT:-60}
HOST=$(hostname -s)
T0=$(date +%s)
export SLURM_CONF=$CONF

say() { echo "[slurm_2node +$(( $(date +%s) - T0 ))s] $*"; }

diagnose() {
    echo "---- diagnostics ----------------------------------------------------------" >&2
    for f in "$LOG_DIR"/*.log; do [[ -f $f ]] && { echo "== tail $f" >&2; tail -n 25 "$f" >&2; }; done
    ip -br addr >&2 || true
    ip netns list >&2 || true
    timeout 10 sinfo -N -l >&2 || true
}
die() { echo "[slurm_2node] ERROR: $*" >&2; diagnose; exit 1; }

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
ctld_up() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
wait_for() { local n=$(( $1 * 2 )); shift; for _ in $(seq "$n"); do "$@" && return 0; sleep 0.5; done; "$@"; }
write_if_changed() {  # FILE MODE CONTENT; true when it changed
    if [[ -f $1 ]] && [[ "$(cat "$1")" == "$3" ]]; then return 1; fi
    printf '%s\n' "$3" >"$1.tmp" && chmod "$2" "$1.tmp" && mv "$1.tmp" "$1"
}
stop_pid() {  # PIDFILE: SIGTERM, up to 10 s, then SIGKILL
    local pid
    if pid_alive "$1"; then
        pid=$(cat "$1"); kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}
slurmd_pid() { echo "$VAR/slurmd.$1.pid"; }

# start_slurmd I: slurmd of node I inside its namespace, with its hostname and CPU
start_slurmd() {
    local node=${NODES[$1]}
    mkdir -p "$VAR/spool/$node"
    # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup fs slurmd probes. Own mount
    # namespace only to bind this node's /etc/hosts; the rest of the filesystem stays shared.
    nsenter --net="/run/netns/$node" unshare --uts --mount sh -c "mount --bind /etc/netns/$node/hosts /etc/hosts \
        && hostname $node && exec taskset -c $(( $1 % $(nproc) )) /usr/sbin/slurmd -f $CONF -N $node" \
        </dev/null >>"$LOG_DIR/slurmd.$node.stdout" 2>&1 || die "slurmd of $node failed to start"
}

# kill_netns NS: SIGKILL every process inside the namespace (slurmd, slurmstepd, job processes)
kill_netns() {
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
}

down() {
    for i in "${!NODES[@]}"; do stop_pid "$(slurmd_pid "${NODES[$i]}")"; done
    stop_pid "$CTLD_PID"
    for node in "${NODES[@]}"; do
        kill_netns "$node"
        ip netns del "$node" 2>/dev/null || true
        rm -rf "/etc/netns/$node"
    done
    for node in "${NODES[@]}"; do ip link del "v${node}h" 2>/dev/null || true; done
    ip link del "$BRIDGE" 2>/dev/null || true
}

case "${1:-}" in
    --status)
        ip netns list; ip -br addr show "$BRIDGE" 2>/dev/null || true
        ps -eo pid,args | grep -E "[s]lurm.*($CONF|nc2n)" || true
        timeout 10 sinfo -N -l || true; exit 0 ;;
    --down) [[ $(id -u) -eq 0 ]] || { echo "[slurm_2node] must run as root" >&2; exit 1; }
        down; say "two-node cluster stopped and its network removed"; exit 0 ;;
    --env) echo "export SLURM_CONF=$CONF GLOO_SOCKET_IFNAME=$IFNAME"; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--status|--down|--env]" >&2; exit 2 ;;
esac

[[ $(id -u) -eq 0 ]] || { echo "[slurm_2node] must run as root (namespaces, daemons)" >&2; exit 1; }
for b in ip unshare nsenter taskset; do command -v $b >/dev/null || die "$b missing: apt-get install iproute2 util-linux"; done
[[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd ]] || die "Slurm is not installed: run .ci/slurm_up.sh first"
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munged is not running: run .ci/slurm_up.sh first"

# --------------------------------------------------------------------------------- the network
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge 2>/dev/null || { echo "[slurm_2node] kernel refuses a bridge device" >&2; exit 3; }
    ip addr add "$NET.1/24" dev "$BRIDGE"
    say "bridge $BRIDGE = $NET.1/24"
fi
ip link set "$BRIDGE" up
for i in "${!NODES[@]}"; do
    node=${NODES[$i]}; addr=${ADDRS[$i]}
    if ! ip netns list | grep -qw "$node"; then
        ip netns add "$node" 2>/dev/null || { echo "[slurm_2node] kernel refuses network namespaces" >&2; exit 3; }
    fi
    if ! ip netns exec "$node" ip -br addr show "$IFNAME" 2>/dev/null | grep -q "$addr/"; then
        ip link del "v${node}h" 2>/dev/null || true
        ip link add "v${node}h" type veth peer name "v${node}n" || { echo "[slurm_2node] kernel refuses veth" >&2; exit 3; }
        ip link set "v${node}n" netns "$node"
        ip netns exec "$node" ip link set "v${node}n" name "$IFNAME"
        ip netns exec "$node" ip addr add "$addr/24" dev "$IFNAME"
        say "namespace $node: $IFNAME = $addr"
    fi
    ip link set "v${node}h" master "$BRIDGE"
    ip link set "v${node}h" up
    ip netns exec "$node" ip link set lo up
    ip netns exec "$node" ip link set "$IFNAME" up
    mkdir -p "/etc/netns/$node"
    hosts="127.0.0.1 localhost
$addr $node
$NET.1 $HOST nc2ctl"
    for j in "${!NODES[@]}"; do [[ $j == "$i" ]] || hosts+=$'\n'"${ADDRS[$j]} ${NODES[$j]}"; done
    write_if_changed "/etc/netns/$node/hosts" 644 "$hosts" || true
done

# -------------------------------------------------------------------------------- slurm.conf
mem=$(( $(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo) / 1024 / 4 ))  # a quarter each: a share, not a claim
accounting="AccountingStorageType=accounting_storage/none"
# the probe and registration go through the single-node cluster's config: it names the running slurmdbd
dbd() { SLURM_CONF=/etc/slurm/slurm.conf timeout 10 sacctmgr "$@"; }
if [[ -f /etc/slurm/slurm.conf ]] && dbd -n show cluster format=cluster >/dev/null 2>&1; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
fi
node_lines=""
for i in "${!NODES[@]}"; do
    node_lines+="NodeName=${NODES[$i]} NodeHostname=${NODES[$i]} NodeAddr=${ADDRS[$i]} CPUs=1 RealMemory=$mem State=UNKNOWN"$'\n'
done
mkdir -p "$CONF_DIR" "$VAR/state" "$LOG_DIR"
conf=$(cat <<EOF
# Generated by .ci/slurm_2node.sh: two nodes in network namespaces on host $HOST. Re-run to regenerate.
ClusterName=$CLUSTER
SlurmctldHost=$HOST($NET.1)
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$VAR/state
SlurmdSpoolDir=$VAR/spool/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$VAR/slurmd.%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.%n.log
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
KillWait=5
InactiveLimit=0
SlurmdTimeout=30
$accounting
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
${node_lines}PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
write_if_changed "$CONF" 644 "$conf" && { conf_changed=1; say "wrote $CONF"; }
if [[ $accounting == *slurmdbd* ]] && ! dbd -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    dbd -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    say "registered cluster $CLUSTER in the running slurmdbd"
    conf_changed=1
fi

# ----------------------------------------------------------------------------------- daemons
if (( conf_changed )); then
    for node in "${NODES[@]}"; do stop_pid "$(slurmd_pid "$node")"; done
    stop_pid "$CTLD_PID"
fi
if ! pid_alive "$CTLD_PID"; then
    say "starting slurmctld on $NET.1:$CTLD_PORT"
    /usr/sbin/slurmctld -f "$CONF" </dev/null >>"$LOG_DIR/slurmctld.stdout" 2>&1 || die "slurmctld failed to start"
fi
wait_for "$TIMEOUT" ctld_up || die "slurmctld does not answer 'scontrol ping' after ${TIMEOUT}s"
for i in "${!NODES[@]}"; do
    if ! pid_alive "$(slurmd_pid "${NODES[$i]}")"; then
        kill_netns "${NODES[$i]}"  # leftovers of a dead node (stepds, job processes) die with it
        say "starting slurmd of ${NODES[$i]} in its namespace"
        start_slurmd "$i"
    fi
done

# ------------------------------------------------------------------------- wait for the nodes
deadline=$(( $(date +%s) + TIMEOUT ))
for node in "${NODES[@]}"; do
    resumed=0
    while :; do
        state=$(timeout 10 sinfo -h -n "$node" -o %T 2>/dev/null | head -n 1 || true)
        case "$state" in
            idle|mixed|allocated|completing) break ;;
            down*|drain*|fail*)
                if (( ! resumed )); then scontrol update nodename="$node" state=resume 2>/dev/null || true; resumed=1; fi ;;
        esac
        (( $(date +%s) < deadline )) || die "node $node is '${state:-?}' after ${TIMEOUT}s (want idle)"
        sleep 0.5
    done
done
say "cluster $CLUSTER ready: ${NODES[*]} ($(sinfo -h -o '%P %D nodes %T' | tr '\n' ' ')), took $(( $(date +%s) - T0 ))s"
