"""
Build the Debian bookworm guest image that runs the vmcontroller guest agent.

The image is made with ``mmdebstrap`` (no loop mounts, no network for the guest), written as an
ext4 filesystem with ``mkfs.ext4 -d``, converted to qcow2, and booted directly from the kernel
and initrd extracted next to it. Images are cached by a hash of their recipe (this module's
source, the package list and the guest agent's source files) under
``/var/lib/vmcontroller/images/<hash>/``; each VM writes to a qcow2 overlay of its own, so a
cached image is never modified.

The agent goes in as one of two forms (:data:`AgentForm`): ``"package"``, this checkout's
``guest_agent`` package over Debian's ``python3-twisted``; or ``"bundle"``, the single-file
agent (:mod:`vmcontroller.agent_bundle`) on a bare ``python3``, as in an image that has no
Twisted package (a CernVM or any non-Debian image).

Command line: ``python -m vmcontroller.images build [--force] [--cache-dir DIR] [--agent
FORM]`` prints the image's paths; ``... prune`` deletes the cached images that no VM uses any
more.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from twisted.internet import utils
from twisted.internet.interfaces import IReactorProcess

from hypervisors.interface import VMSpec
from vmcontroller import agent_bundle
from vmcontroller.errors import ImageBuildError

__all__ = [
    "AGENT_FORMS",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_CMDLINE",
    "PACKAGES",
    "GuestImage",
    "build_image",
    "cached_image",
    "debian_sources",
    "prune_images",
    "recipe_hash",
]

DEFAULT_CACHE_DIR = Path("/var/lib/vmcontroller/images")
#: Where the libvirt driver keeps each VM's overlay disk (see hypervisors.libvirt_driver).
DEFAULT_VMS_DIR = Path("/var/lib/vmcontroller/vms")
SUITE = "bookworm"

#: What the guest is made of. ``dbus`` is there because systemd-logind, which turns the ACPI
#: power button into a clean shutdown, does not run without the system bus.
PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "python3",
    "python3-twisted",
    "linux-image-amd64",
    "initramfs-tools",
    "kmod",
    "procps",
    "iproute2",
    "coreutils",
    # The bench compares the channel's TLS cost with `openssl speed` in the guest.
    "openssl",
)

#: How the agent goes into the image: the package over Debian's Twisted, or the single file.
AgentForm = Literal["package", "bundle"]
AGENT_FORMS: tuple[AgentForm, ...] = ("package", "bundle")


#: A Debian package name (Debian Policy 5.6.1): it goes into mmdebstrap's argument list.
_DEBIAN_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def extra_package_set(extra_packages: Iterable[str] = ()) -> tuple[str, ...]:
    """
    ``extra_packages`` sorted and without repeats, so that the same set names the same image.

    :raises ValueError: a name is not a Debian package name.
    """
    names = tuple(sorted(set(extra_packages)))
    for name in names:
        if not _DEBIAN_PACKAGE_NAME.fullmatch(name):
            raise ValueError(
                f"extra package {name!r} is not a Debian package name (lower case, digits, + - .)"
            )
    return names


def packages(agent: AgentForm = "package", extra_packages: Iterable[str] = ()) -> tuple[str, ...]:
    """
    The image's Debian packages: the single-file agent brings its own Twisted;
    ``extra_packages`` come after :data:`PACKAGES` (see :func:`build_image`).
    """
    base = PACKAGES if agent == "package" else tuple(p for p in PACKAGES if p != "python3-twisted")
    return base + tuple(p for p in extra_package_set(extra_packages) if p not in base)


#: ``quiet`` keeps the kernel off the slow emulated serial port; ``systemd.show_status`` still
#: puts one line per unit in the console log, which is what one reads when a boot goes wrong.
DEFAULT_CMDLINE = "root=/dev/vda rootfstype=ext4 rw console=ttyS0 quiet systemd.show_status=1"

HOSTNAME = "vmcontroller-guest"

#: Size of the guest's root filesystem; sparse, so only the used blocks take host disk space.
DEFAULT_DISK_SIZE_MIB = 4096

# Units that only cost boot time in a throwaway VM, most of all under TCG emulation: no network
# for time sync or apt, and no long-lived disks worth scrubbing or trimming.
MASKED_UNITS: tuple[str, ...] = (
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-pstore.service",
    "remote-fs.target",
)

# Kernel modules the initramfs must hold to mount the root disk. An explicit list instead of
# MODULES=most: the initrd shrinks from ~36 MiB to a few, which boots faster under TCG (the
# firmware copies it in and the kernel unpacks it, both emulated).
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "ext4")

# Written before the kernel package is installed, so its first update-initramfs run uses it.
_ESSENTIAL_HOOK = (
    'mkdir -p "$1/etc/initramfs-tools/conf.d" && '
    'printf "MODULES=list\\n" > "$1/etc/initramfs-tools/conf.d/vmcontroller.conf" && '
    'printf "%s\\n" ' + " ".join(INITRAMFS_MODULES) + ' >> "$1/etc/initramfs-tools/modules"'
)

_CUSTOMIZE_HOOKS: tuple[str, ...] = (
    f'echo {HOSTNAME} > "$1/etc/hostname"',
    f'printf "127.0.0.1 localhost\\n127.0.1.1 {HOSTNAME}\\n" > "$1/etc/hosts"',
    'printf "/dev/vda / ext4 defaults 0 1\\n" > "$1/etc/fstab"',
    # virtio_console is a module; udev would load it on the device's modalias, but listing it
    # makes the agent's port appear even if coldplug is slow or skipped. qemu_fw_cfg shows
    # QEMU's fw_cfg entries in /sys/firmware/qemu_fw_cfg, where the agent reads its credentials
    # (it has no modalias udev would match).
    'mkdir -p "$1/etc/modules-load.d" && '
    'printf "virtio_console\\nvirtio_rng\\nqemu_fw_cfg\\n" > "$1/etc/modules-load.d/virtio.conf"',
    'ln -sf /lib/systemd/system/multi-user.target "$1/etc/systemd/system/default.target"',
    *(f'ln -sf /dev/null "$1/etc/systemd/system/{unit}"' for unit in MASKED_UNITS),
    # Stale enablement links of the masked units would only produce warnings.
    'rm -f "$1"/etc/systemd/system/*.wants/e2scrub_reap.service '
    '"$1"/etc/systemd/system/*.wants/systemd-pstore.service '
    '"$1"/etc/systemd/system/*.wants/remote-fs.target',
    # Each VM's systemd makes its own machine id on first boot.
    'truncate -s 0 "$1/etc/machine-id"',
)

# Documentation and translations are of no use in the guest and make the image bigger.
_DPKG_OPTS: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
)

_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "unshare": "util-linux",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
}

_DEBIAN_COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class GuestImage:
    """
    A built guest image.

    :ivar image_id: the recipe hash that names the image's cache directory.
    :ivar directory: the cache directory holding the files below.
    :ivar root_disk: the root filesystem, qcow2 (never written to: VMs use overlays).
    :ivar kernel: the kernel for direct kernel boot.
    :ivar initrd: its initial ramdisk.
    :ivar cmdline: the kernel command line the image is meant to boot with.
    """

    image_id: str
    directory: str
    root_disk: str
    kernel: str
    initrd: str
    cmdline: str = DEFAULT_CMDLINE

    def vm_spec(self, name: str, **overrides: Any) -> VMSpec:
        """
        A :class:`~hypervisors.interface.VMSpec` that boots this image.

        :param overrides: other ``VMSpec`` fields (``memory_mib``, ``vcpus``, ``accel``, ...).
        """
        fields: dict[str, Any] = {
            "disk": self.root_disk,
            "kernel": self.kernel,
            "initrd": self.initrd,
            "cmdline": self.cmdline,
        }
        fields.update(overrides)
        return VMSpec(name=name, **fields)


# -- recipe and cache -------------------------------------------------------------------------


def _agent_dir() -> Path:
    import guest_agent

    return Path(guest_agent.__file__).resolve().parent


def _agent_files(agent_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in agent_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )


def recipe_hash(
    agent_dir: Path | None = None, agent: AgentForm = "package", extra_packages: Iterable[str] = ()
) -> str:
    """
    The hash that names the image: it changes when anything that goes into the image does.

    Covers this module's source (packages, hooks, build steps), the extra packages, every
    file of the guest agent package and, for the single-file agent, everything bundled with
    it (Twisted and its dependencies as installed here). The Debian mirror is left out on
    purpose: it serves the same suite.
    """
    agent_dir = agent_dir or _agent_dir()
    h = hashlib.sha256()
    h.update(b"vmcontroller-image-v1\0")
    h.update(Path(__file__).read_bytes())
    recipe = [SUITE, packages(agent, extra_packages), _ESSENTIAL_HOOK, _CUSTOMIZE_HOOKS, _DPKG_OPTS]
    h.update(json.dumps(recipe).encode())
    for path in _agent_files(agent_dir):
        h.update(str(path.relative_to(agent_dir)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    if agent == "bundle":
        h.update(b"bundle\0" + agent_bundle.bundle_fingerprint().encode())
    return h.hexdigest()[:16]


def _image_from_dir(directory: Path) -> GuestImage | None:
    manifest = directory / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    image = GuestImage(
        image_id=data["image_id"],
        directory=str(directory),
        root_disk=str(directory / "root.qcow2"),
        kernel=str(directory / "vmlinuz"),
        initrd=str(directory / "initrd.img"),
        cmdline=data.get("cmdline", DEFAULT_CMDLINE),
    )
    if all(Path(p).is_file() for p in (image.root_disk, image.kernel, image.initrd)):
        return image
    return None


def cached_image(
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    agent: AgentForm = "package",
    extra_packages: Iterable[str] = (),
) -> GuestImage | None:
    """The image for the current recipe if it was built already, else ``None``."""
    return _image_from_dir(Path(cache_dir) / recipe_hash(agent=agent, extra_packages=extra_packages))


# -- Debian sources ---------------------------------------------------------------------------


def _parse_sources(list_text: Iterable[str], deb822_text: Iterable[str]) -> list[tuple[str, str, str]]:
    entries: list[tuple[str, str, str]] = []
    for text in list_text:
        for line in text.splitlines():
            # Drop comments and "[signed-by=...]" options.
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb":
                entries.append((words[1], words[2], " ".join(words[3:])))
    for text in deb822_text:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            key = None
            for raw in stanza.splitlines():
                if raw.startswith("#"):
                    continue
                if raw[:1].isspace() and key:
                    fields[key] += " " + raw.strip()
                elif ":" in raw:
                    key, value = raw.split(":", 1)
                    key = key.strip().lower()
                    fields[key] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    entries.append((uri, suite, fields.get("components", "main")))
    return entries


def debian_sources(etc_apt: Path = Path("/etc/apt"), environ: Mapping[str, str] = os.environ) -> list[str]:
    """
    One-line apt sources for the guest, taken from the host's Debian entries.

    Only the host's ``bookworm``, ``bookworm-updates`` and ``bookworm-security`` entries are
    used (third-party repositories are left out); ``VMCONTROLLER_DEBIAN_MIRROR`` overrides the
    mirror URL, and deb.debian.org is the fallback.
    """
    override = environ.get("VMCONTROLLER_DEBIAN_MIRROR")
    if override:
        return [f"deb {override} {SUITE} main"]
    list_files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    deb822_files = sorted((etc_apt / "sources.list.d").glob("*.sources"))

    def read(paths: Sequence[Path]) -> list[str]:
        texts = []
        for p in paths:
            try:
                texts.append(p.read_text())
            except OSError:
                continue
        return texts

    wanted = {SUITE, f"{SUITE}-updates", f"{SUITE}-security"}
    lines: list[str] = []
    for uri, suite, components in _parse_sources(read(list_files), read(deb822_files)):
        if suite in wanted:
            comps = " ".join(c for c in components.split() if c in _DEBIAN_COMPONENTS)
            line = f"deb {uri} {suite} {comps or 'main'}"
            if line not in lines:
                lines.append(line)
    if not any(line.split()[2] == SUITE for line in lines):
        lines.insert(0, f"deb http://deb.debian.org/debian {SUITE} main")
    return lines


# -- building ---------------------------------------------------------------------------------


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":" + _SYSTEM_PATH)
    if found is None:
        raise ImageBuildError(
            f"{name} is not installed: install the Debian package {_TOOLS[name]} "
            f"(scripts/setup-host.sh installs everything the image build needs)"
        )
    return found


def _with_private_mounts(argv: list[str]) -> list[str]:
    """
    ``argv`` run in a mount namespace of its own: what it mounts (mmdebstrap's /proc, /sys
    and /dev in the tree) goes away with it, even when it is killed, instead of staying
    mounted in the host's namespace and making the tree impossible to remove.
    """
    return [_tool("unshare"), "--mount", "--propagation", "private", *argv]


def _tail(data: bytes, lines: int = 30) -> str:
    return "\n".join(data.decode("utf-8", "replace").rstrip().splitlines()[-lines:])


async def _run(
    reactor: IReactorProcess,
    argv: Sequence[str],
    *,
    what: str,
    hint: str,
    path: str | None = None,
) -> bytes:
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + ":" + _SYSTEM_PATH
    env["LC_ALL"] = "C.UTF-8"
    out, err, code = await utils.getProcessOutputAndValue(
        argv[0], list(argv[1:]), env=env, path=path, reactor=reactor
    )
    if code != 0:
        raise ImageBuildError(
            f"{what} failed (exit status {code}) running {' '.join(argv[:2])} ...:\n"
            f"{_tail(err or out)}\n{hint}"
        )
    return out


def _chmod_tree_readable(directory: Path) -> None:
    # libvirt runs qemu as libvirt-qemu, which must read the base image, kernel and initrd.
    directory.chmod(0o755)
    for p in directory.iterdir():
        if p.is_file():
            p.chmod(0o644)


async def _build(
    reactor: IReactorProcess,
    work: Path,
    *,
    image_id: str,
    disk_size_mib: int,
    agent: AgentForm,
    extra_packages: tuple[str, ...] = (),
    log: Callable[[str], object],
) -> None:
    rootfs = work / "rootfs"
    agent_parent = _agent_dir().parent
    sources = debian_sources()
    included = packages(agent, extra_packages)
    if agent == "package":
        # The agent goes in with the host's python from this checkout, exactly as a user would
        # install it into any Debian tree.
        install_hook = (
            f"cd {_shell_quote(str(agent_parent))} && "
            f'{_shell_quote(sys.executable)} -m guest_agent install --root "$1"'
        )
    else:
        # The single file, installed by itself as an image builder would: `python3 FILE install`.
        bundle = work / agent_bundle.BUNDLE_NAME
        agent_bundle.build_bundle(bundle)
        install_hook = f'{_shell_quote(sys.executable)} {_shell_quote(str(bundle))} install --root "$1"'

    started = time.monotonic()

    def step(message: str) -> None:
        log(f"[{time.monotonic() - started:6.1f}s] {message}")

    step(f"mmdebstrap {SUITE} ({len(included)} packages) from {', '.join(s.split()[1] for s in sources)}")
    argv = [
        _tool("mmdebstrap"),
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        "--include=" + ",".join(included),
        *(f"--dpkgopt={opt}" for opt in _DPKG_OPTS),
        f"--essential-hook={_ESSENTIAL_HOOK}",
        f"--customize-hook={install_hook}",
        *(f"--customize-hook={hook}" for hook in _CUSTOMIZE_HOOKS),
        SUITE,
        str(rootfs),
        *sources,
    ]
    await _run(
        reactor,
        _with_private_mounts(argv),
        what="mmdebstrap",
        hint="Check that the Debian mirror above is reachable (VMCONTROLLER_DEBIAN_MIRROR overrides it) "
        "and that `python3 -m guest_agent install` works in this checkout.",
    )

    step("checking the kernel, initramfs and agent in the tree")
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageBuildError(
            f"no kernel or initrd under {rootfs / 'boot'} after mmdebstrap: the linux-image-amd64 "
            "or initramfs-tools installation failed; rebuild with force=True and read mmdebstrap's output"
        )
    if not (rootfs / "etc/systemd/system/multi-user.target.wants/vmcontroller-agent.service").is_symlink():
        raise ImageBuildError(
            "the guest agent's unit is not enabled in the image: `python3 -m guest_agent install` "
            "did not do its job; run it by hand with --root on an empty directory to see why"
        )
    if agent == "bundle" and list(rootfs.glob("usr/lib/python3*/dist-packages/twisted")):
        raise ImageBuildError(
            "the image for the single-file agent has Debian's Twisted, which it must not need: a "
            "package in vmcontroller.images.PACKAGES depends on python3-twisted; drop it"
        )
    listing = await _run(
        reactor,
        ["/usr/sbin/chroot", str(rootfs), "lsinitramfs", "/boot/" + initrds[-1].name],
        what="listing the initramfs",
        hint="The initramfs in the image is unreadable; rebuild the image with force=True.",
    )
    names = {Path(line).name.split(".ko")[0] for line in listing.decode().splitlines() if ".ko" in line}
    missing = [m for m in INITRAMFS_MODULES if m not in names]
    if missing:
        raise ImageBuildError(
            f"the initramfs lacks the modules {', '.join(missing)} needed to mount the root disk; "
            "check the hook that writes /etc/initramfs-tools/modules in vmcontroller/images.py"
        )
    shutil.copyfile(kernels[-1], work / "vmlinuz")
    shutil.copyfile(initrds[-1], work / "initrd.img")

    step(f"mkfs.ext4 -d ({disk_size_mib} MiB, sparse)")
    raw = work / "root.raw"
    await _run(
        reactor,
        [_tool("mkfs.ext4"), "-q", "-F", "-L", "vmc-root", "-d", str(rootfs), str(raw), f"{disk_size_mib}M"],
        what="mkfs.ext4",
        hint="mkfs.ext4 -d needs e2fsprogs >= 1.43 and free space in the cache directory.",
    )
    step("qemu-img convert -O qcow2")
    await _run(
        reactor,
        [_tool("qemu-img"), "convert", "-O", "qcow2", str(raw), str(work / "root.qcow2")],
        what="qemu-img convert",
        hint="Check the free space in the cache directory.",
    )
    raw.unlink()
    await _run(reactor, ["rm", "-rf", "--one-file-system", str(rootfs)], what="removing the tree", hint="")

    manifest = {
        "image_id": image_id,
        "suite": SUITE,
        "packages": list(included),
        "agent": agent,
        "kernel_version": kernels[-1].name[len("vmlinuz-") :],
        "cmdline": DEFAULT_CMDLINE,
        "sources": sources,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _chmod_tree_readable(work)
    step("done")


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


async def build_image(
    reactor: IReactorProcess,
    *,
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    force: bool = False,
    disk_size_mib: int = DEFAULT_DISK_SIZE_MIB,
    agent: AgentForm = "package",
    extra_packages: Iterable[str] = (),
    log: Callable[[str], object] = print,
) -> GuestImage:
    """
    Return the guest image for the current recipe, building it if it is not cached.

    A build goes to a temporary directory beside the cache entry and is renamed into place
    when complete, so an interrupted build never looks finished. Needs root (mmdebstrap's root
    mode, chroot) and takes about a minute, most of it mmdebstrap. After a build the cache is
    pruned to the images VM disks use plus the :data:`KEEP_RECENT_IMAGES` most recently used.

    :param reactor: runs the external tools.
    :param cache_dir: where images are kept; the parent directories must be readable by the
        ``libvirt-qemu`` user, which is why the default is under ``/var/lib``.
    :param force: rebuild even if the image is cached; refused while VM disks are overlays on it.
    :param disk_size_mib: size of the guest's root filesystem.
    :param agent: how the agent goes in (:data:`AgentForm`): the package over Debian's
        Twisted, or the single-file agent with no Twisted package in the image.
    :param extra_packages: Debian packages to install besides :data:`PACKAGES`, installed
        as any package is (their maintainer scripts run, their units are enabled as the
        package enables them). They are part of the recipe, so such an image is cached as an
        image of its own and the one without them stays as it is: the bench uses this for
        ``qemu-guest-agent``, which it measures beside ours.
    :param log: called with one line per build step.
    :raises ImageBuildError: a tool failed; the message has its last output lines.
    :raises ValueError: an unknown ``agent`` or a name in ``extra_packages`` that is not a
        Debian package name.
    """
    if agent not in AGENT_FORMS:
        raise ValueError(f"agent={agent!r}: use one of {', '.join(AGENT_FORMS)}")
    extras = extra_package_set(extra_packages)
    cache = Path(cache_dir)
    image_id = recipe_hash(agent=agent, extra_packages=extras)
    final = cache / image_id
    if not force:
        image = _image_from_dir(final)
        if image is not None:
            log(f"using the cached guest image {final}")
            os.utime(final / "manifest.json")  # most recently used: the last to be pruned
            return image
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building the guest image needs root (mmdebstrap --mode=root, chroot, file ownership); "
            "run as root, or build once with `sudo python -m vmcontroller.images build`"
        )
    for d in (cache.parent, cache):
        if not d.exists():
            # Explicit mode: a umask of 077 would hide the images from libvirt-qemu. Existing
            # directories are left alone (the cache could be under /tmp).
            d.mkdir(parents=True)
            d.chmod(0o755)
    if force and final.exists():
        users = _overlays_on(final, DEFAULT_VMS_DIR)
        if users:
            raise ImageBuildError(
                f"cannot rebuild {final} in place: the disks {', '.join(map(str, users))} are overlays on "
                "it and would be corrupted; undefine those VMs first"
            )
    work = cache / f".build-{image_id}-{uuid.uuid4().hex[:8]}"
    work.mkdir(mode=0o755)
    log(f"building guest image {image_id} in {work}")
    try:
        await _build(
            reactor, work, image_id=image_id, disk_size_mib=disk_size_mib, agent=agent,
            extra_packages=extras, log=log,
        )
        if recipe_hash(agent=agent, extra_packages=extras) != image_id:
            # The image holds whatever the agent's files were when mmdebstrap copied them; it
            # must not be cached under a name that says otherwise.
            raise ImageBuildError(
                f"the guest agent's files or the image recipe changed while image {image_id} was "
                "being built, so it may hold a mix of both versions; it was discarded: build again"
            )
        old = None
        if final.exists():
            old = cache / f".old-{image_id}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        try:
            work.rename(final)
        except OSError:
            # Another build of the same recipe finished first; its image is as good as ours.
            if _image_from_dir(final) is None:
                raise
        if old is not None:
            await _run(reactor, ["rm", "-rf", str(old)], what="removing the old image", hint="")
        for entry in _prunable(cache, DEFAULT_VMS_DIR, keep_recent=KEEP_RECENT_IMAGES):
            log(f"removing the cached image {entry}, which no VM uses")
            try:
                await _run(reactor, ["rm", "-rf", "--one-file-system", str(entry)], what="pruning", hint="")
            except ImageBuildError as e:
                # Housekeeping: the image just built is good whatever an old entry holds (a build
                # killed inside mmdebstrap by a version that ran it in the host's mount namespace
                # left /proc and /sys mounted in its tree).
                log(f"could not remove {entry}, left as it is: {e}")
    finally:
        if work.exists():
            await _run(reactor, ["rm", "-rf", "--one-file-system", str(work)], what="cleaning up", hint="")
    image = _image_from_dir(final)
    if image is None:
        raise ImageBuildError(f"the image built into {final} is incomplete; rebuild it with force=True")
    log(f"guest image ready: {final}")
    return image


# -- pruning --------------------------------------------------------------------------------


def _qcow2_backing_file(path: Path) -> str | None:
    # The qcow2 header: magic "QFI\xfb", version, then the backing file name's offset (u64)
    # and length (u32), big-endian.
    with open(path, "rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != b"QFI\xfb":
            return None
        offset = int.from_bytes(header[8:16], "big")
        size = int.from_bytes(header[16:20], "big")
        if offset == 0 or size == 0:
            return None
        f.seek(offset)
        return f.read(size).decode("utf-8", "replace")


def _overlays_on(image_dir: Path, vms_dir: Path | str) -> list[Path]:
    users = []
    for overlay in sorted(Path(vms_dir).glob("*/*.qcow2")):
        try:
            backing = _qcow2_backing_file(overlay)
        except OSError:
            continue
        if backing and Path(backing).resolve().parent == image_dir.resolve():
            users.append(overlay)
    return users


#: Finished images a build keeps besides the current one and those VM disks use, the most
#: recently used first: going back to an earlier version of the agent costs no rebuild, and
#: the cache stays a few images large instead of growing by one per agent change.
KEEP_RECENT_IMAGES = 2
#: A ``.build-*`` directory this old is a build that died, not one in progress.
STALE_BUILD_SECONDS = 3600.0


def _prunable(
    cache: Path, vms_dir: Path | str, *, keep_recent: int, stale_build_seconds: float = STALE_BUILD_SECONDS
) -> list[Path]:
    """The cache entries :func:`prune_images` deletes (see there); reads a little, deletes nothing."""
    if not cache.is_dir():
        return []
    in_use = {str((cache / recipe_hash(agent=form)).resolve()) for form in AGENT_FORMS}
    for overlay in Path(vms_dir).glob("*/*.qcow2"):
        try:
            backing = _qcow2_backing_file(overlay)
        except OSError:
            continue
        if backing:
            in_use.add(str(Path(backing).resolve().parent))
    doomed, finished = [], []
    now = time.time()
    for entry in sorted(cache.iterdir()):
        if not entry.is_dir() or str(entry.resolve()) in in_use:
            continue
        if entry.name.startswith(".build-"):
            if now - entry.stat().st_mtime >= stale_build_seconds:
                doomed.append(entry)
        elif entry.name.startswith(".old-"):
            doomed.append(entry)
        elif _image_from_dir(entry) is not None:
            finished.append(entry)
        # Anything else is not an image of ours: left alone.
    finished.sort(key=lambda entry: (entry / "manifest.json").stat().st_mtime, reverse=True)
    return doomed + finished[keep_recent:]


def prune_images(
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    vms_dir: Path | str = DEFAULT_VMS_DIR,
    *,
    keep_recent: int = 0,
    stale_build_seconds: float = STALE_BUILD_SECONDS,
) -> list[Path]:
    """
    Delete cached images that are neither the current recipe's nor the base of a VM's disk,
    but for the ``keep_recent`` most recently used ones.

    Every change to the guest agent makes a new image (about 700 MiB); :func:`build_image`
    prunes down to :data:`KEEP_RECENT_IMAGES` after each build. Images still backing an overlay
    under ``vms_dir`` are kept, and so are builds in progress (``.build-*`` younger than
    ``stale_build_seconds``); directories that are not images are left alone.
    Blocking: for the command line and scripts, not for the reactor thread.

    :return: the directories deleted.
    """
    removed = _prunable(
        Path(cache_dir), vms_dir, keep_recent=keep_recent, stale_build_seconds=stale_build_seconds
    )
    for entry in removed:
        shutil.rmtree(entry, ignore_errors=True)
    return removed


# -- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmcontroller.images build [--force] [--cache-dir DIR] [--json]``."""
    parser = argparse.ArgumentParser(prog="python -m vmcontroller.images")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the guest image (or reuse the cached one)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    build.add_argument("--json", action="store_true", help="print the paths as JSON")
    build.add_argument(
        "--agent",
        choices=AGENT_FORMS,
        default="package",
        help="the agent as this checkout's package over Debian's Twisted (default), or as the "
        "single-file agent in an image without Twisted",
    )
    hash_ = sub.add_parser("hash", help="print the recipe hash that names the image")
    hash_.add_argument("--agent", choices=AGENT_FORMS, default="package")
    for command in (build, hash_):
        command.add_argument(
            "--extra-package",
            action="append",
            default=[],
            metavar="NAME",
            help="a Debian package to add to the image, which makes it an image of its own (repeatable)",
        )
    prune = sub.add_parser("prune", help="delete cached images no VM uses, except the current one")
    prune.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    prune.add_argument("--keep", type=int, default=0, metavar="N", help="also keep the N most recently used")
    args = parser.parse_args(argv)
    if args.command == "hash":
        print(recipe_hash(agent=args.agent, extra_packages=args.extra_package))
        return 0
    if args.command == "prune":
        for path in prune_images(args.cache_dir, keep_recent=args.keep):
            print(f"removed {path}")
        return 0

    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    result: list[GuestImage] = []

    async def run(reactor: Any) -> None:
        result.append(
            await build_image(
                reactor,
                cache_dir=args.cache_dir,
                force=args.force,
                agent=args.agent,
                extra_packages=args.extra_package,
                log=lambda m: print(m, file=sys.stderr),
            )
        )

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code:
            return int(e.code)
    image = result[0]
    if args.json:
        print(json.dumps(asdict(image), indent=2))
    else:
        for key, value in asdict(image).items():
            print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
