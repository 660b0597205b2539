#!/usr/bin/env bash
# A Debian root with another Python, for the compatibility matrix (docs/compat.md).
#
#   scripts/debian_root.sh build ROOT [SUITE] [PYTHON]   # debootstrap, once (skipped when ROOT/usr/bin/PYTHON exists)
#   scripts/debian_root.sh run ROOT -- COMMAND...        # COMMAND inside ROOT, the repository at its own path
#
# `run` works in a private mount namespace (unshare -m): proc, /dev, a private /dev/shm and devpts, and the
# repository are mounted there and vanish with the command, so nothing stays mounted on the host and deleting or
# copying ROOT never reaches the host's /dev or /proc. Needs root (chroot) and debootstrap (Debian's package).
set -euo pipefail

die() { echo "debian_root: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: $0 build ROOT [SUITE] [PYTHON] | run ROOT -- COMMAND..."
action=$1; root=$(realpath -m "$2"); shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts); run it as root or skip the Python 3.13 cell"

# The host's CA bundle (it may hold a proxy's certificate), resolver and hosts file, copied in before every use:
# without the hosts file torchrun hangs resolving this host's name, without the bundle pip's TLS check fails.
copy_host_files() {
    mkdir -p "$root/etc/ssl/certs"
    cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/host-ca.crt"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    cp -L /etc/hosts "$root/etc/hosts"
    hostname > "$root/etc/hostname"
}

case "$action" in
build)
    suite=${1:-trixie}; python=${2:-python3.13}
    if [ -x "$root/usr/bin/$python" ]; then
        echo "debian_root: $root has $python (cached)"; copy_host_files; exit 0
    fi
    command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"
    tmp="$root.partial"
    # A partial root from an interrupted build is ours; it is never mounted (debootstrap unmounts on exit,
    # `run` mounts only in a private namespace), so removing it cannot reach the host's devices.
    if [ -e "$tmp" ]; then
        grep -q " $tmp/" /proc/self/mounts && die "$tmp has mounts under it; unmount them first"
        rm -rf --one-file-system "$tmp"
    fi
    mkdir -p "$(dirname "$root")"
    t0=$(date +%s)
    debootstrap --variant=minbase --include="$python,$python-venv,python3-pip,ca-certificates" \
        "$suite" "$tmp" http://deb.debian.org/debian >"$tmp.log" 2>&1 \
        || { tail -20 "$tmp.log" >&2; die "debootstrap $suite failed (log: $tmp.log)"; }
    mv "$tmp" "$root"; rm -f "$tmp.log"
    copy_host_files
    echo "debian_root: built $root ($suite, $python) in $(( $(date +%s) - t0 )) s"
    ;;
run)
    [ "${1:-}" = "--" ] && shift
    [ $# -ge 1 ] || die "run: no command"
    [ -d "$root/usr" ] || die "$root is not a root (build it first)"
    copy_host_files
    exec unshare --mount --propagation private -- bash -c '
        set -e; root=$1; repo=$2; shift 2
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
        mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
        mkdir -p "$root$repo"                # after the tmpfs: a repository under /tmp lives on it
        mount --bind "$repo" "$root$repo"
        exec chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin \
            LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/host-ca.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt \
            REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
            PIP_DEFAULT_TIMEOUT=180 bash -c "cd \"$repo\" && exec \"\$@\"" bash "$@"
    ' bash "$root" "$repo" "$@"
    ;;
*) die "unknown action $action (build | run)";;
esac
