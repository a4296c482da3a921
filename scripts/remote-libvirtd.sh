#!/usr/bin/env bash
# A second libvirt "host" on this machine, for the test of remote URIs: a libvirtd (and its own
# virtlogd) in a network namespace of its own, listening on qemu+tcp:// at an address of its own
# on a veth pair, with private copies of libvirt's directories so that it sees none of the
# system daemon's domains.
#
#   bash scripts/remote-libvirtd.sh start DIR   # prints the URI, e.g. qemu+tcp://10.231.7.2/system
#   bash scripts/remote-libvirtd.sh restart DIR # libvirtd stopped and started again (its VMs run on)
#   bash scripts/remote-libvirtd.sh stop DIR    # its domains destroyed, daemons stopped, netns gone
#
# DIR (new or empty) holds the private directories, the pid files and the logs. As root.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/usr/bin:/sbin:/bin"

die() { echo "remote-libvirtd: error: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (network namespaces, bind mounts, libvirtd)"
[ $# -eq 2 ] || die "usage: $0 start|restart|stop DIR"
ACTION=$1
DIR=$(realpath -m "$2")
STATE="$DIR/state"

start() {
    mkdir -p "$DIR"
    [ ! -e "$STATE" ] || die "$DIR is in use already ($STATE exists); stop it first"
    # A free /24 of 10.231.0.0/16, so that test runs at the same time do not collide: the
    # namespace's name and the subnet's number claim it.
    local n ns=""
    for offset in $(seq 0 249); do
        n=$(( ($$ + offset) % 250 + 1 ))
        if ip netns add "vmc-remote-$n" 2>/dev/null; then
            if ip -o -4 addr show | grep -q " 10\.231\.$n\."; then
                ip netns del "vmc-remote-$n"
                continue
            fi
            ns="vmc-remote-$n"
            break
        fi
    done
    [ -n "$ns" ] || die "no free network namespace vmc-remote-1 to vmc-remote-250"
    local host_if="vmcr$n-h" ns_if="vmcr$n-n" addr="10.231.$n.2"
    printf 'NS=%s\nHOST_IF=%s\nADDR=%s\n' "$ns" "$host_if" "$addr" >"$STATE"

    ip link add "$host_if" type veth peer name "$ns_if"
    ip link set "$ns_if" netns "$ns"
    ip addr add "10.231.$n.1/24" dev "$host_if"
    ip link set "$host_if" up
    ip -n "$ns" addr add "$addr/24" dev "$ns_if"
    ip -n "$ns" link set "$ns_if" up
    ip -n "$ns" link set lo up

    # Private copies of what libvirtd keeps: no domain, pool or network definitions of the
    # system daemon (it would list and autostart them), nothing of its running domains.
    mkdir -p "$DIR/run" "$DIR/lib" "$DIR/cache" "$DIR/etc" "$DIR/log" "$DIR/bin"
    # Under names of their own, so that what looks for the system daemons by name (pgrep -x
    # libvirtd) does not take these for them.
    ln -sf /usr/sbin/libvirtd "$DIR/bin/libvirtd-remote"
    ln -sf /usr/sbin/virtlogd "$DIR/bin/virtlogd-remote"
    chmod 0755 "$DIR" "$DIR/run" "$DIR/lib" "$DIR/cache"
    cp -a /etc/libvirt/. "$DIR/etc/"
    rm -rf "$DIR"/etc/qemu/*.xml "$DIR/etc/qemu/autostart" "$DIR/etc/qemu/networks/autostart" \
        "$DIR/etc/storage"
    cp -a /var/lib/libvirt/. "$DIR/lib/"
    find "$DIR/lib" -mindepth 1 ! -type d -delete
    find "$DIR/lib" -depth -mindepth 2 -type d -name 'domain-*' -exec rm -rf {} +
    cp -a /var/cache/libvirt/. "$DIR/cache/"
    cat >>"$DIR/etc/libvirtd.conf" <<EOF

# remote-libvirtd.sh: the test's second host, on its own address, without authentication.
listen_tls = 0
listen_tcp = 1
listen_addr = "$addr"
auth_tcp = "none"
log_outputs = "3:file:$DIR/log/libvirtd.log"
EOF
    cat >>"$DIR/etc/virtlogd.conf" <<EOF
log_outputs = "3:file:$DIR/log/virtlogd.log"
EOF

    # The mounts live in a mount namespace of the daemons' own, which goes with them.
    ip netns exec "$ns" unshare --mount --propagation private /bin/sh -euc '
        mount --bind "$1/run" /run/libvirt
        mount --bind "$1/lib" /var/lib/libvirt
        mount --bind "$1/etc" /etc/libvirt
        mount --bind "$1/cache" /var/cache/libvirt
        "$1/bin/virtlogd-remote" -d -p "$1/virtlogd.pid"
        "$1/bin/libvirtd-remote" --listen -d -p "$1/libvirtd.pid"
    ' remote-libvirtd "$DIR" </dev/null >>"$DIR/log/start.log" 2>&1 \
        || die "the daemons did not start; see $DIR/log/"

    wait_for "qemu+tcp://$addr/system"
}

wait_for() {
    local uri=$1
    for _ in $(seq 1 120); do
        virsh -c "$uri" version >/dev/null 2>&1 && { echo "$uri"; return 0; }
        sleep 0.5
    done
    die "libvirtd does not answer on $uri after 60 s; see $DIR/log/libvirtd.log"
}

restart() {
    [ -e "$STATE" ] || die "nothing runs in $DIR"
    # shellcheck disable=SC1090
    . "$STATE"
    stop_pid "$DIR/libvirtd.pid"
    # Into the namespaces virtlogd still holds (network, and the mounts of the private copies).
    nsenter --target "$(cat "$DIR/virtlogd.pid")" --mount --net \
        "$DIR/bin/libvirtd-remote" --listen -d -p "$DIR/libvirtd.pid" </dev/null >>"$DIR/log/start.log" 2>&1 \
        || die "libvirtd did not start again; see $DIR/log/"
    wait_for "qemu+tcp://$ADDR/system"
}

stop_pid() {
    local file=$1 pid
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    [ -e "$STATE" ] || { rm -rf "$DIR"; return 0; }
    # shellcheck disable=SC1090
    . "$STATE"
    local uri="qemu+tcp://$ADDR/system" name
    # Its QEMU processes would outlive the daemon.
    for name in $(virsh -c "$uri" list --name 2>/dev/null); do
        virsh -c "$uri" destroy "$name" >/dev/null 2>&1 || true
    done
    stop_pid "$DIR/libvirtd.pid"
    stop_pid "$DIR/virtlogd.pid"
    ip link del "$HOST_IF" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$DIR"
}

case "$ACTION" in
    start) start ;;
    restart) restart ;;
    stop) stop ;;
    *) die "usage: $0 start|restart|stop DIR" ;;
esac
