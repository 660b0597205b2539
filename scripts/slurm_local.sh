#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the tests of slurm/ scripts.
#
#   scripts/slurm_local.sh start    install (apt) if missing, configure, start, wait for an idle node
#   scripts/slurm_local.sh status   print what runs and what sinfo says
#   scripts/slurm_local.sh stop     stop the daemons this script started (by their recorded pid)
#
# Needs root and a Debian/Ubuntu apt. Idempotent: `start` on a running cluster only reports it.
# Env: SLURM_LOCAL_TIMEOUT (seconds to wait for the node, default 60).
set -euo pipefail

STATE_DIR=/run/slurm_local          # pid files of the daemons started by this script
CONF=/etc/slurm/slurm.conf
LOG_DIR=/var/log/slurm
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

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
