#!/usr/bin/env bash
# A real Slurm on this machine, for the tests of slurm/ scripts: one node on the host, or N nodes, each a
# network + UTS namespace of its own (own host name and address), on a private bridge (docs/slurm.md).
#
#   scripts/slurm_local.sh start [--nodes N]   install (apt) if missing, configure, start, wait for idle nodes
#                                              N=1 (default): slurmd on the host, as always; N=2..4: see below
#   scripts/slurm_local.sh status              print what runs and what sinfo says
#   scripts/slurm_local.sh stop                stop the daemons this script started (by their recorded pid);
#                                              remove every namespace, link and file a multi-node start made
#   scripts/slurm_local.sh fail-node NAME      (multi-node) kill everything running on node NAME: its slurmd,
#                                              its job steps and ranks, as if it lost power; `start` restores it
#
# Multi-node (N >= 2): namespaces PREFIX-ctl (slurmctld, and bridge br0 at SUBNET.1) and PREFIX-node1..N
# (slurmd; eth0 at SUBNET.(10+i), a veth whose peer is on br0), each with its own UTS namespace and host name
# = its namespace's name, and /etc/netns/<ns>/hosts (bind-mounted by `ip netns exec`) naming all of them. The
# subnet exists only inside these namespaces: the host gets no address, route or link on it. Clients reach
# slurmctld at 127.0.0.1:PORT through scripts/netns_forward.py, one listener on the host and one in each node
# (so one slurm.conf serves the host, the daemons and the jobs' srun). munged is the host's, shared through
# its socket. Every node declares SLURM_LOCAL_CPUS CPUs (default 4; they all share this machine's cores).
#
# Needs root and a Debian/Ubuntu apt. Idempotent: `start` on a running cluster only reports it.
# Env: SLURM_LOCAL_TIMEOUT (seconds to wait for the nodes, default 60). A second, separate multi-node cluster
# (tests): SLURM_CONF (config path, default /etc/slurm/slurm.conf; clients read it too), SLURM_LOCAL_STATE
# (pid files, spool, logs; default /run/slurm_local), SLURM_LOCAL_PREFIX (namespace / host name prefix,
# default sayo), SLURM_LOCAL_PORT (slurmctld port, default 6817), SLURM_LOCAL_SUBNET (default 10.250.0).
set -euo pipefail

STATE_DIR=${SLURM_LOCAL_STATE:-/run/slurm_local}  # pid files of the daemons started by this script
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
LOG_DIR=/var/log/slurm
PREFIX=${SLURM_LOCAL_PREFIX:-sayo}
PORT=${SLURM_LOCAL_PORT:-6817}
SUBNET=${SLURM_LOCAL_SUBNET:-10.250.0}
MN_CPUS=${SLURM_LOCAL_CPUS:-4}
HERE=$(cd "$(dirname "$0")" && pwd)
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
HOST=$(hostname -s)
NCPU=$(nproc)

die() { echo "slurm_local: ERROR: $*" >&2; exit 1; }
say() { echo "slurm_local: $*"; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# sinfo retries for ~10 s when no controller runs, so ask it only when a slurmctld process exists
ctld_running() { command -v sinfo >/dev/null && pgrep -x slurmctld >/dev/null; }

node_state() { ctld_running && sinfo -h -n "$HOST" -o '%t' 2>/dev/null | head -n1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get here"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed (is the Debian registry reachable?)"
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
}

write_conf() {
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" "$STATE_DIR"
    cat > "$CONF" <<EOF
# written by scripts/slurm_local.sh: a one-node test cluster
ClusterName=local
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${NCPU} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged already answers (ours or the system's)
    fi
    mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
    [ -f /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key
    su -s /bin/sh munge -c /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
}

start_daemon() {  # name
    local name=$1
    if pid_alive "$STATE_DIR/$name.pid"; then return; fi
    "/usr/sbin/$name" || die "$name did not start (see $LOG_DIR/$name.log)"
}

wait_idle() {
    local waited=0 state
    while [ "$waited" -lt "$TIMEOUT" ]; do
        state=$(node_state)
        case "$state" in
            idle|mix|alloc) say "node $HOST is $state"; return 0 ;;
            down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1; waited=$((waited + 1))
    done
    die "node $HOST not idle after ${TIMEOUT}s (state '${state:-none}'); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
}

cmd_start() {
    if [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]]; then
        say "already running: node $HOST is $(node_state)"; return 0
    fi
    [ "$(id -u)" = 0 ] || die "starting the daemons needs root"
    install_packages
    write_conf
    start_munge
    start_daemon slurmctld
    start_daemon slurmd
    wait_idle
}

wait_exit() {  # pid name: give a stopped daemon 15 s to exit, so a following start does not race it
    local i
    for i in $(seq 1 30); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
    echo "slurm_local: WARNING: $2 (pid $1) still running after 15 s" >&2
}

cmd_stop() {
    local name pid stopped=0
    for name in slurmd slurmctld munged; do
        if pid_alive "$STATE_DIR/$name.pid"; then
            pid=$(cat "$STATE_DIR/$name.pid")
            kill "$pid" && stopped=$((stopped + 1))
            wait_exit "$pid" "$name"
        fi
        rm -f "$STATE_DIR/$name.pid"
    done
    say "stopped $stopped daemon(s)"
}

cmd_status() {
    local name
    for name in munged slurmctld slurmd; do
        if pid_alive "$STATE_DIR/$name.pid"; then say "$name running (pid $(cat "$STATE_DIR/$name.pid"))"
        else say "$name not started by this script"; fi
    done
    if ctld_running && sinfo >/dev/null 2>&1; then sinfo; return 0; fi
    say "no Slurm controller answers"; return 1
}

# ---------------------------------------------------------------------------------------------------------
# Multi-node: namespaces on a private bridge
# ---------------------------------------------------------------------------------------------------------
CTL=${PREFIX}-ctl
MN_FILE=$STATE_DIR/nodes                 # the node count of the multi-node cluster this script started
node_name() { echo "${PREFIX}-node$1"; }
node_addr() { echo "${SUBNET}.$((10 + $1))"; }
mn_count() { if [ -f "$MN_FILE" ]; then cat "$MN_FILE"; else echo 0; fi; }

# "name state" per node, nothing when no slurmctld answers
mn_states() {
    pid_alive "$STATE_DIR/slurmctld.pid" || return 0
    timeout 15 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true
}

mn_write_conf() {  # N
    local n=$1 i
    mkdir -p "$(dirname "$CONF")" "$STATE_DIR/spool/ctld" "$STATE_DIR/log"
    {
        echo "# written by scripts/slurm_local.sh start --nodes $n: $n nodes in network namespaces (docs/slurm.md)"
        echo "ClusterName=local${PREFIX}"
        echo "SlurmctldHost=${CTL}(127.0.0.1)"
        echo "SlurmctldPort=${PORT}"
        echo "SlurmdPort=6818"
        echo "SlurmUser=root"
        echo "AuthType=auth/munge"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "SlurmdParameters=config_overrides"
        echo "ReturnToService=2"
        echo "SlurmdTimeout=20"
        echo "MessageTimeout=10"
        echo "KillWait=10"
        echo "MinJobAge=600"
        echo "StateSaveLocation=${STATE_DIR}/spool/ctld"
        echo "SlurmdSpoolDir=${STATE_DIR}/spool/%n"
        echo "SlurmctldPidFile=${STATE_DIR}/slurmctld.pid"
        echo "SlurmdPidFile=${STATE_DIR}/slurmd-%n.pid"
        echo "SlurmctldLogFile=${STATE_DIR}/log/slurmctld.log"
        echo "SlurmdLogFile=${STATE_DIR}/log/slurmd-%n.log"
        for i in $(seq 1 "$n"); do
            echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=${MN_CPUS} State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=${PREFIX}-node[1-$n] Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF"
}

mn_hosts_file() {  # NS N: /etc/netns/NS/hosts, which `ip netns exec NS` bind-mounts on /etc/hosts
    local ns=$1 n=$2 i
    mkdir -p "/etc/netns/$ns"
    {
        echo "# written by scripts/slurm_local.sh for namespace $ns"
        echo "127.0.0.1 localhost"
        echo "${SUBNET}.1 ${CTL}"
        for i in $(seq 1 "$n"); do echo "$(node_addr "$i") $(node_name "$i")"; done
    } > "/etc/netns/$ns/hosts"
}

has_ns() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

mn_network() {  # N: namespaces, bridge, veths, addresses (only what is missing)
    local n=$1 i ns
    command -v ip >/dev/null || die "iproute2 (ip) is missing: apt-get install iproute2"
    if ! has_ns "$CTL"; then
        ip netns add "$CTL" || die "cannot create network namespace $CTL (needs root and CAP_SYS_ADMIN)"
        ip -n "$CTL" link set lo up
        ip -n "$CTL" link add br0 type bridge
        ip -n "$CTL" addr add "${SUBNET}.1/24" dev br0
        ip -n "$CTL" link set br0 up
    fi
    mn_hosts_file "$CTL" "$n"
    for i in $(seq 1 "$n"); do
        ns=$(node_name "$i")
        if ! has_ns "$ns"; then
            ip netns add "$ns" || die "cannot create network namespace $ns"
            ip -n "$ns" link set lo up
            # made inside the namespaces: the host never holds either end
            ip -n "$CTL" link add "v$i" type veth peer name eth0 netns "$ns"
            ip -n "$CTL" link set "v$i" master br0 up
            ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
            ip -n "$ns" link set eth0 up
        fi
        mn_hosts_file "$ns" "$n"
    done
}

# in_ns NS COMMAND...: run COMMAND in network namespace NS, in a UTS namespace of its own whose host name is NS
# and a mount namespace of its own where /etc/netns/NS/hosts is /etc/hosts (what `ip netns exec` does, without
# its fresh /sys, which hides the cgroup mounts slurmd needs). /dev/shm, /tmp and the rest stay the host's.
in_ns() {
    local ns=$1; shift
    nsenter --net="/run/netns/$ns" unshare --mount --uts -- \
        /bin/sh -c 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$0" && exec "$@"' "$ns" "$@"
}

mn_forwarder() {  # LABEL WHERE (host | a node's namespace): a 127.0.0.1:PORT listener there reaching slurmctld
    local label=$1 where=$2 pidf="$STATE_DIR/forward-$1.pid" k
    pid_alive "$pidf" && return 0
    local cmd=(/usr/bin/python3 "$HERE/netns_forward.py" --listen "127.0.0.1:$PORT" --connect "${SUBNET}.1:$PORT"
               --pidfile "$pidf")
    rm -f "$pidf"
    if [ "$where" = host ]; then
        setsid "${cmd[@]}" --netns "/run/netns/$CTL" >>"$STATE_DIR/log/forward-$label.log" 2>&1 < /dev/null &
    else
        setsid ip netns exec "$where" "${cmd[@]}" >>"$STATE_DIR/log/forward-$label.log" 2>&1 < /dev/null &
    fi
    for k in $(seq 1 100); do pid_alive "$pidf" && return 0; sleep 0.1; done
    die "the forwarder to slurmctld ($label) did not start: $(tail -n 3 "$STATE_DIR/log/forward-$label.log")"
}

mn_wait_idle() {  # N
    local n=$1 waited=0 states="" idle
    while [ "$waited" -lt "$TIMEOUT" ]; do
        states=$(mn_states)
        idle=$(awk '$2 ~ /^(idle|mix|alloc)/' <<< "$states" | wc -l)
        if [ "$idle" -ge "$n" ]; then say "$n node(s) up:"; sed 's/^/    /' <<< "$states"; return 0; fi
        awk '$2 ~ /^(down|drain)/ {print $1}' <<< "$states" | while read -r name; do
            scontrol update NodeName="$name" State=RESUME 2>/dev/null || true
        done
        sleep 1; waited=$((waited + 1))
    done
    die "not all $n nodes idle after ${TIMEOUT}s (sinfo: $(tr '\n' ';' <<< "${states:-none}")); see $STATE_DIR/log/"
}

mn_start() {  # N
    local n=$1 i ns running
    running=$(mn_count)
    if [ "$running" -gt 0 ] && [ "$running" != "$n" ] && pid_alive "$STATE_DIR/slurmctld.pid"; then
        die "a $running-node cluster of this script runs; '$0 stop' it first"
    fi
    if pid_alive "$STATE_DIR/slurmd.pid"; then
        die "the one-node cluster of this script runs on the host; '$0 stop' it first (or set SLURM_LOCAL_STATE," \
            "SLURM_CONF, SLURM_LOCAL_PREFIX and SLURM_LOCAL_PORT for a separate cluster)"
    fi
    command -v unshare >/dev/null || die "unshare (util-linux) is missing"
    [ -x /usr/bin/python3 ] || die "/usr/bin/python3 is needed for scripts/netns_forward.py"
    mkdir -p "$STATE_DIR/log"
    mn_write_conf "$n"
    echo "$n" > "$MN_FILE"
    export SLURM_CONF=$CONF
    start_munge
    mn_network "$n"
    mn_forwarder host host
    if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
        in_ns "$CTL" /usr/sbin/slurmctld || die "slurmctld did not start (see $STATE_DIR/log/slurmctld.log)"
    fi
    for i in $(seq 1 "$n"); do
        ns=$(node_name "$i")
        mkdir -p "$STATE_DIR/spool/$ns"
        mn_forwarder "$ns" "$ns"
        pid_alive "$STATE_DIR/slurmd-$ns.pid" && continue
        in_ns "$ns" /usr/sbin/slurmd || die "slurmd of $ns did not start (see $STATE_DIR/log/slurmd-$ns.log)"
    done
    mn_wait_idle "$n"
}

ns_pids() { ip netns pids "$1" 2>/dev/null || true; }

kill_ns_processes() {  # NS: every process in the namespace (only this script starts anything there)
    local ns=$1 pids k
    pids=$(ns_pids "$ns")
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    for k in $(seq 1 50); do [ -z "$(ns_pids "$ns")" ] && return 0; sleep 0.1; done
    echo "slurm_local: WARNING: processes still in $ns: $(ns_pids "$ns" | tr '\n' ' ')" >&2
}

mn_fail_node() {  # NAME
    local ns=$1 n
    n=$(mn_count)
    [ "$n" -gt 0 ] || die "no multi-node cluster of this script runs"
    [ "$ns" != "$CTL" ] || die "$ns is the controller, not a node"
    has_ns "$ns" || die "$ns is not a node of this cluster (nodes: ${PREFIX}-node1..$n)"
    kill_ns_processes "$ns"
    rm -f "$STATE_DIR/slurmd-$ns.pid" "$STATE_DIR/forward-$ns.pid"
    say "node $ns lost: every process in it killed (its slurmd, job steps, ranks); '$0 start --nodes $n' restores it"
}

mn_stop() {
    local n i ns pid stopped=0
    n=$(mn_count)
    export SLURM_CONF=$CONF
    for i in $(seq 1 "$n"); do
        ns=$(node_name "$i")
        if pid_alive "$STATE_DIR/slurmd-$ns.pid"; then
            pid=$(cat "$STATE_DIR/slurmd-$ns.pid"); kill "$pid" && stopped=$((stopped + 1))
            wait_exit "$pid" "slurmd $ns"
        fi
    done
    if pid_alive "$STATE_DIR/slurmctld.pid"; then
        pid=$(cat "$STATE_DIR/slurmctld.pid"); kill "$pid" && stopped=$((stopped + 1)); wait_exit "$pid" slurmctld
    fi
    for i in $(seq 1 "$n"); do
        ns=$(node_name "$i")
        if has_ns "$ns"; then
            kill_ns_processes "$ns"               # job steps, ranks, the node's forwarder
            ip netns del "$ns"                    # takes its veth (and the peer on the bridge) with it
        fi
        rm -rf "/etc/netns/$ns"
        rm -f "$STATE_DIR/slurmd-$ns.pid" "$STATE_DIR/forward-$ns.pid"
    done
    if pid_alive "$STATE_DIR/forward-host.pid"; then kill "$(cat "$STATE_DIR/forward-host.pid")"; fi
    if has_ns "$CTL"; then
        kill_ns_processes "$CTL"
        ip netns del "$CTL"                       # takes the bridge with it
    fi
    rm -rf "/etc/netns/$CTL"
    rmdir /etc/netns 2>/dev/null || true
    rm -f "$STATE_DIR/slurmctld.pid" "$STATE_DIR/forward-host.pid" "$MN_FILE"
    if pid_alive "$STATE_DIR/munged.pid"; then
        pid=$(cat "$STATE_DIR/munged.pid"); kill "$pid" && stopped=$((stopped + 1)); wait_exit "$pid" munged
    fi
    rm -f "$STATE_DIR/munged.pid"
    say "stopped $stopped daemon(s); removed the namespaces $CTL and ${PREFIX}-node1..$n"
}

mn_status() {
    local n i name
    n=$(mn_count)
    say "$n-node cluster (namespaces $CTL, ${PREFIX}-node1..$n; subnet ${SUBNET}.0/24; config $CONF)"
    export SLURM_CONF=$CONF
    for name in slurmctld $(for i in $(seq 1 "$n"); do echo "slurmd-$(node_name "$i")"; done); do
        if pid_alive "$STATE_DIR/$name.pid"; then say "$name running (pid $(cat "$STATE_DIR/$name.pid"))"
        else say "$name not running"; fi
    done
    if pid_alive "$STATE_DIR/slurmctld.pid" && timeout 15 sinfo >/dev/null 2>&1; then sinfo -N; return 0; fi
    say "no Slurm controller answers"; return 1
}

NODES=
parse_nodes() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) [ $# -ge 2 ] || die "--nodes needs a number"; NODES=$2; shift 2 ;;
            --nodes=*) NODES=${1#--nodes=}; shift ;;
            *) die "unknown option $1 (usage: $0 start [--nodes N])" ;;
        esac
    done
    if [ -n "$NODES" ] && ! [[ $NODES =~ ^[1-4]$ ]]; then die "--nodes must be 1 to 4, got '$NODES'"; fi
}

mn_running() { [ "$(mn_count)" -gt 0 ] && pid_alive "$STATE_DIR/slurmctld.pid"; }

cmd=${1:-}; shift || true
case "$cmd" in
    start)
        parse_nodes "$@"
        if [ -z "$NODES" ] && mn_running; then
            say "a $(mn_count)-node cluster of this script runs"; export SLURM_CONF=$CONF; mn_wait_idle "$(mn_count)"
        elif [ "${NODES:-1}" -gt 1 ]; then
            [ "$(id -u)" = 0 ] || die "starting the daemons and namespaces needs root"
            install_packages; mn_start "$NODES"
        else
            if mn_running; then die "a $(mn_count)-node cluster of this script runs; '$0 stop' it first"; fi
            cmd_start
        fi ;;
    stop) if [ "$(mn_count)" -gt 0 ]; then mn_stop; else cmd_stop; fi ;;
    status) if [ "$(mn_count)" -gt 0 ]; then mn_status; else cmd_status; fi ;;
    fail-node) [ $# -eq 1 ] || die "usage: $0 fail-node NODE_NAME"; export SLURM_CONF=$CONF; mn_fail_node "$1" ;;
    *) echo "usage: $0 start [--nodes N] | stop | status | fail-node NODE" >&2; exit 2 ;;
esac
