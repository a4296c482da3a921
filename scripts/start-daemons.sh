#!/usr/bin/env bash
# Start virtlogd and libvirtd when they are not running (PID 1 may not be systemd: containers,
# CI). Used by setup-host.sh and by the test that restarts libvirtd.
set -euo pipefail

# libvirtd's QEMU processes are daemons: when one dies its parent is PID 1, and libvirt reports
# the VM stopped only once that process is reaped. An init that reaps at once (systemd) makes
# that immediate; a container's PID 1 may take seconds. Then libvirtd runs under tini as a
# subreaper, which reaps its orphans at once.
#
# A daemon runs when the pid in its pid file is alive: not "a process of that name", which may
# be another host's daemon (scripts/remote-libvirtd.sh runs a second libvirtd in a namespace).
running() {
    local pid
    pid=$(cat "/run/$1.pid" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}
for daemon in virtlogd libvirtd; do
    if running "$daemon"; then
        echo "setup-host: $daemon is running"
    elif [ "$daemon" = libvirtd ] && [ "$(cat /proc/1/comm)" != systemd ]; then
        echo "setup-host: starting $daemon under tini -s (PID 1 is $(cat /proc/1/comm), not systemd)"
        mkdir -p /var/log/libvirt
        setsid tini -s -- /usr/sbin/libvirtd </dev/null >>/var/log/libvirt/libvirtd-foreground.log 2>&1 &
    else
        echo "setup-host: starting $daemon"
        "/usr/sbin/$daemon" -d
    fi
done
