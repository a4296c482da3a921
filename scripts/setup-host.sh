#!/usr/bin/env bash
# Prepare a Debian bookworm host to build guest images and run VMs: host packages, the
# libvirt daemons, and the project's virtual environment. Idempotent and quick on re-run.
# Run as root from anywhere: bash scripts/setup-host.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
URI="qemu:///system"
# boinc-client: the real BOINC client, which tests/local/test_boinc_client.py runs the wrapper under.
# iproute2 and util-linux (unshare, nsenter): the second libvirt host of the remote-URI test
# (scripts/remote-libvirtd.sh).
PACKAGES=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils mmdebstrap
          libvirt-dev pkg-config python3-dev python3-venv e2fsprogs gcc tini boinc-client iproute2 util-linux)

step() { echo "setup-host: $*"; }
die() { echo "setup-host: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (installs packages, starts libvirtd, builds images)"

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when they are missing or a day old.
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
        step "apt-get update"
        apt-get update -qq >/dev/null || step "apt-get update reported errors; trying the install anyway"
    fi
    # boinc-client's postinst makes its user with adduser --gecos, which runs chfn; where PAM
    # refuses chfn (containers) the install fails. The user made beforehand, adduser is skipped.
    if ! getent passwd boinc >/dev/null; then
        getent group boinc >/dev/null || groupadd --system boinc
        useradd --system --gid boinc --home-dir /var/lib/boinc-client --no-create-home \
            --shell /usr/sbin/nologin --comment "BOINC core client" boinc
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed; run it by hand to see why"
else
    step "host packages already installed"
fi

# Without udev the kernel leaves /dev/kvm root:root 0600: libvirtd (root) then finds KVM while
# QEMU (user libvirt-qemu) cannot open it, and libvirt re-probes QEMU on every domain lookup (a
# define takes about a minute instead of 0.03 s). Set what Debian's udev rule sets.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    step "/dev/kvm is root:kvm 0660, as Debian's udev rule leaves it"
fi

# The tests run their own BOINC client in a directory of their own; the system one (started by
# the package under systemd) would only look for work from projects this machine has none of.
if [ -d /run/systemd/system ] && systemctl is-active --quiet boinc-client 2>/dev/null; then
    systemctl disable --now boinc-client >/dev/null 2>&1 || true
    step "stopped and disabled the system boinc-client service"
fi

# PID 1 may not be systemd (containers, CI): start the daemons ourselves when not running.
bash "$REPO/scripts/start-daemons.sh" || die "the libvirt daemons did not start; see /var/log/libvirt"
for _ in $(seq 1 60); do
    virsh -c "$URI" version >/dev/null 2>&1 && break
    sleep 0.5
done
virsh -c "$URI" version >/dev/null 2>&1 || die "libvirtd does not answer on $URI after 30 s"
step "libvirt answers on $URI"

# Images and VM disks live where QEMU (user libvirt-qemu) can reach them, not under /root.
install -d -m 0755 /var/lib/vmcontroller /var/lib/vmcontroller/images /var/lib/vmcontroller/vms
step "state directories under /var/lib/vmcontroller"

VENV="$REPO/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV"
    /usr/bin/python3 -m venv "$VENV"
fi
# Re-install only when the packaging metadata changed (or the venv is new).
THIRDPARTY="$REPO/tests/thirdparty_driver"
STAMP="$VENV/.setup-host-$(cat "$REPO/setup.cfg" "$REPO/pyproject.toml" "$THIRDPARTY/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -e "$STAMP" ] && "$VENV/bin/python" -c "import vmcontroller, hypervisors, libvirt, tox, vmc_thirdparty_driver" 2>/dev/null; then
    step "virtual environment up to date"
else
    step "pip install -e '.[test,lint]' tox (into $VENV)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$REPO[test,lint]" tox \
        || die "pip install failed; libvirt-python needs libvirt-dev, pkg-config and gcc"
    # The conformance suite's third-party driver, a package of its own (as in tox.ini).
    "$VENV/bin/python" -m pip install -q "$THIRDPARTY" || die "pip install $THIRDPARTY failed"
    rm -f "$VENV"/.setup-host-*
    touch "$STAMP"
fi
step "done"
