"""The image builder's pure parts and the agent installer, without building anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from guest_agent import install
from vmcontroller import images


def test_sources_from_deb822_and_list_files(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "deb [signed-by=/x.gpg] https://packages.example.com/apt cloud-sdk-bookworm main\n"
        "# deb http://old.example.org/debian bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n"
        "# a comment\n"
        "URIs: http://mirror.example.org/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main contrib\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.example.org/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: https://deb.nodesource.com/node_20.x\n"
        "Suites: nodistro\n"
        "Components: main\n"
    )
    assert images.debian_sources(tmp_path, environ={}) == [
        "deb http://mirror.example.org/debian bookworm main contrib",
        "deb http://mirror.example.org/debian bookworm-updates main contrib",
        "deb http://mirror.example.org/debian-security bookworm-security main",
    ]


def test_sources_fallback_and_override(tmp_path: Path) -> None:
    assert images.debian_sources(tmp_path, environ={}) == ["deb http://deb.debian.org/debian bookworm main"]
    assert images.debian_sources(tmp_path, environ={"VMCONTROLLER_DEBIAN_MIRROR": "http://m/debian"}) == [
        "deb http://m/debian bookworm main"
    ]


def test_recipe_hash_follows_the_agent_sources(tmp_path: Path) -> None:
    agent = tmp_path / "guest_agent"
    agent.mkdir()
    (agent / "a.py").write_text("x = 1\n")
    first = images.recipe_hash(agent)
    (agent / "__pycache__").mkdir()
    (agent / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    assert images.recipe_hash(agent) == first
    (agent / "a.py").write_text("x = 2\n")
    assert images.recipe_hash(agent) != first
    assert len(first) == 16


def test_extra_packages_make_an_image_of_their_own(tmp_path: Path) -> None:
    agent = tmp_path / "guest_agent"
    agent.mkdir()
    (agent / "a.py").write_text("x = 1\n")
    plain = images.recipe_hash(agent)
    with_qga = images.recipe_hash(agent, extra_packages=["qemu-guest-agent"])
    assert with_qga != plain
    # The same set names the same image, however it is spelled.
    assert images.recipe_hash(agent, extra_packages=("qemu-guest-agent", "qemu-guest-agent")) == with_qga
    assert images.recipe_hash(agent, extra_packages=["bc", "qemu-guest-agent"]) == images.recipe_hash(
        agent, extra_packages=["qemu-guest-agent", "bc"]
    )
    assert images.packages("package", ["qemu-guest-agent", "udev"]) == (*images.PACKAGES, "qemu-guest-agent")
    assert images.packages("bundle", ["python3-twisted"])[-1] == "python3-twisted"
    assert images.packages() == images.PACKAGES


@pytest.mark.parametrize("name", ["--include=evil", "Qemu", "a b", "x", "pkg,other", ""])
def test_an_extra_package_must_be_a_debian_package_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not a Debian package name"):
        images.recipe_hash(tmp_path, extra_packages=[name])
    reactor = cast(IReactorProcess, Clock())
    build = images.build_image(reactor, cache_dir=tmp_path / "cache", extra_packages=[name], log=print)
    outcome = Deferred.fromCoroutine(build)
    failures: list[Failure] = []
    outcome.addErrback(failures.append)
    assert failures and failures[0].check(ValueError)
    assert not (tmp_path / "cache").exists()  # refused before anything was made


def test_cached_image_needs_every_file(tmp_path: Path) -> None:
    entry = tmp_path / images.recipe_hash()
    entry.mkdir()
    assert images.cached_image(tmp_path) is None
    for name in ("root.qcow2", "vmlinuz", "initrd.img"):
        (entry / name).write_bytes(b"")
    (entry / "manifest.json").write_text(json.dumps({"image_id": entry.name}))
    image = images.cached_image(tmp_path)
    assert image is not None
    assert image.root_disk == str(entry / "root.qcow2")
    spec = image.vm_spec("vm1", memory_mib=256)
    assert (spec.disk, spec.kernel, spec.initrd, spec.memory_mib) == (
        image.root_disk,
        image.kernel,
        image.initrd,
        256,
    )
    assert "root=/dev/vda" in spec.cmdline


def test_an_image_whose_recipe_changed_during_the_build_is_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashes = iter(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"])
    monkeypatch.setattr(images, "recipe_hash", lambda **kwargs: next(hashes))

    async def build(reactor: object, work: Path, **kwargs: object) -> None:
        for name in ("root.qcow2", "vmlinuz", "initrd.img"):
            (work / name).write_bytes(b"")
        (work / "manifest.json").write_text(json.dumps({"image_id": "aaaaaaaaaaaaaaaa"}))

    async def run(reactor: object, argv: list[str], **kwargs: object) -> bytes:
        assert argv[:2] == ["rm", "-rf"]
        shutil.rmtree(argv[-1])
        return b""

    monkeypatch.setattr(images, "_build", build)
    monkeypatch.setattr(images, "_run", run)
    cache = tmp_path / "images"
    reactor = cast(IReactorProcess, Clock())
    outcome = Deferred.fromCoroutine(images.build_image(reactor, cache_dir=cache, log=lambda line: None))
    failures: list[Failure] = []
    outcome.addErrback(failures.append)
    assert failures and failures[0].check(images.ImageBuildError)
    assert "changed while image aaaaaaaaaaaaaaaa was being built" in failures[0].getErrorMessage()
    assert list(cache.iterdir()) == []  # neither a cache entry nor a leftover build


def test_an_old_entry_that_cannot_be_removed_does_not_fail_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "recipe_hash", lambda **kwargs: "cccccccccccccccc")
    cache = tmp_path / "images"
    stuck = fake_image(cache / "dddddddddddddddd", 1)  # an old image no VM uses: pruned

    async def build(reactor: object, work: Path, **kwargs: object) -> None:
        for name in ("root.qcow2", "vmlinuz", "initrd.img"):
            (work / name).write_bytes(b"")
        (work / "manifest.json").write_text(json.dumps({"image_id": "cccccccccccccccc"}))

    async def run(reactor: object, argv: list[str], **kwargs: object) -> bytes:
        if argv[-1] == str(stuck):
            raise images.ImageBuildError("rm: cannot remove 'proc': Device or resource busy")
        shutil.rmtree(argv[-1])
        return b""

    monkeypatch.setattr(images, "_build", build)
    monkeypatch.setattr(images, "_run", run)
    monkeypatch.setattr(images, "KEEP_RECENT_IMAGES", 0)
    lines: list[str] = []
    reactor = cast(IReactorProcess, Clock())
    built: list[images.GuestImage] = []
    Deferred.fromCoroutine(images.build_image(reactor, cache_dir=cache, log=lines.append)).addCallback(
        built.append
    )
    assert built and built[0].image_id == "cccccccccccccccc"
    assert any(line.startswith(f"could not remove {stuck}") for line in lines)
    assert stuck.exists()


def fake_debian_root(root: Path) -> Path:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib/python3.11").mkdir(parents=True)
    os.symlink("python3.11", root / "usr/bin/python3")
    return root


def test_install_into_a_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fake_debian_root(tmp_path / "root")
    assert install.main(["install", "--root", str(root)]) == 0
    site = root / "usr/local/lib/python3.11/dist-packages/guest_agent"
    assert (site / "__init__.py").is_file()
    assert (site / "install.py").is_file()
    assert (site / "vmcontroller-agent.service").is_file()
    assert not list(site.rglob("__pycache__"))
    unit = root / "etc/systemd/system/vmcontroller-agent.service"
    assert "ExecStart=/usr/bin/python3 -m guest_agent run --virtio-port org.vmcontroller.agent.0" in (
        unit.read_text()
    )
    link = root / "etc/systemd/system/multi-user.target.wants/vmcontroller-agent.service"
    assert os.readlink(link) == "/etc/systemd/system/vmcontroller-agent.service"
    assert "enabled" in capsys.readouterr().out

    # Again, over the first install: replaces it, keeps no leftovers.
    shutil.rmtree(site / "protocol", ignore_errors=True)
    assert install.main(["--root", str(root)]) == 0
    assert (site / "protocol").is_dir()
    assert sorted(p.name for p in site.parent.iterdir()) == ["guest_agent"]


def test_install_python_version_from_lib_dir(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/python3.12").mkdir(parents=True)
    (tmp_path / "usr/lib/python3.9").mkdir(parents=True)
    assert install.guest_python_version(tmp_path) == "3.12"


def test_install_without_python(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install.main(["--root", str(tmp_path)]) == 1
    assert "python3" in capsys.readouterr().err
    assert install.main(["--root", str(tmp_path / "missing")]) == 2


def fake_image(directory: Path, last_used: float) -> Path:
    directory.mkdir(parents=True)
    for name in ("root.qcow2", "vmlinuz", "initrd.img"):
        (directory / name).write_bytes(b"")
    (directory / "manifest.json").write_text(json.dumps({"image_id": directory.name}))
    os.utime(directory / "manifest.json", (last_used, last_used))
    return directory


def test_prune_keeps_the_current_image_and_the_bases_of_vm_disks(tmp_path: Path) -> None:
    cache, vms = tmp_path / "images", tmp_path / "vms"
    current = fake_image(cache / images.recipe_hash(), 1)
    used = fake_image(cache / "used", 2)
    fake_image(cache / "unused", 3)
    stale_build, fresh_build, not_ours = cache / ".build-old", cache / ".build-new", cache / "lost+found"
    for d in (stale_build, fresh_build, not_ours, vms / "vm1"):
        d.mkdir(parents=True)
    os.utime(stale_build, (0, 0))
    backing = str(used / "root.qcow2").encode()
    # A minimal qcow2 header naming its backing file.
    header = b"QFI\xfb" + (3).to_bytes(4, "big") + (72).to_bytes(8, "big") + len(backing).to_bytes(4, "big")
    (vms / "vm1" / "disk.qcow2").write_bytes(header.ljust(72, b"\0") + backing)
    removed = images.prune_images(cache, vms)
    assert sorted(p.name for p in removed) == [".build-old", "unused"]
    kept = sorted([".build-new", current.name, "lost+found", "used"])
    assert sorted(p.name for p in cache.iterdir()) == kept


def test_prune_keeps_the_most_recently_used(tmp_path: Path) -> None:
    cache = tmp_path / "images"
    for name, last_used in (("a", 100), ("b", 300), ("c", 200), ("d", 50)):
        fake_image(cache / name, last_used)
    removed = images.prune_images(cache, tmp_path / "vms", keep_recent=2)
    assert sorted(p.name for p in removed) == ["a", "d"]


def test_init_system_of_a_root(tmp_path: Path) -> None:
    assert install.init_system(tmp_path) == "systemd"  # an empty tree being built
    (tmp_path / "etc/init.d").mkdir(parents=True)
    assert install.init_system(tmp_path) == "sysv"
    (tmp_path / "lib/systemd").mkdir(parents=True)
    (tmp_path / "lib/systemd/systemd").write_bytes(b"")
    assert install.init_system(tmp_path) == "systemd"
    (tmp_path / "sbin").mkdir()
    (tmp_path / "sbin/openrc-run").write_bytes(b"")
    assert install.init_system(tmp_path) == "openrc"


def test_the_agent_command_keeps_the_units_options() -> None:
    unit = (
        "[Service]\nExecStart=/usr/bin/python3 -m guest_agent run --serial /dev/ttyS1 --listen 'tcp:9000'\n"
    )
    options = ["run", "--serial", "/dev/ttyS1", "--listen", "tcp:9000"]
    assert install.agent_command(False, unit) == ["/usr/bin/python3", "-m", "guest_agent", *options]
    assert install.agent_command(True, unit) == [
        "/usr/bin/python3",
        f"/{install.BUNDLE_DIR}/{install.BUNDLE_FILE}",
        *options,
    ]


@pytest.mark.parametrize("manager", ["openrc", "sysv"])
def test_install_without_systemd(tmp_path: Path, manager: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = fake_debian_root(tmp_path / "root")
    assert install.main(["--root", str(root), "--init", manager]) == 0
    script = root / "etc/init.d/vmcontroller-agent"
    assert script.stat().st_mode & 0o777 == 0o755
    text = script.read_text()
    # The same command as the systemd unit's, and a script the shell accepts.
    assert "/usr/bin/python3" in text and "-m guest_agent run --virtio-port org.vmcontroller.agent.0" in text
    subprocess.run(["sh", "-n", str(script)], check=True)
    assert not (root / "etc/systemd").exists()
    if manager == "openrc":
        assert text.startswith("#!/sbin/openrc-run\n")
        assert "supervisor=supervise-daemon" in text
        link = root / "etc/runlevels/default/vmcontroller-agent"
        assert os.readlink(link) == "/etc/init.d/vmcontroller-agent"
    else:
        assert "### BEGIN INIT INFO" in text
        for level in "2345":
            assert (
                os.readlink(root / f"etc/rc{level}.d/S20vmcontroller-agent") == "../init.d/vmcontroller-agent"
            )
        for level in "016":
            assert (
                os.readlink(root / f"etc/rc{level}.d/K01vmcontroller-agent") == "../init.d/vmcontroller-agent"
            )
    assert ("OpenRC" if manager == "openrc" else "SysV") in capsys.readouterr().out


def test_the_sysv_script_supervises_and_stops_the_agent(tmp_path: Path) -> None:
    # Run the script for real with a stand-in agent command, its pid file and log moved into
    # tmp_path: start restarts the command when it exits, stop ends the loop and the command.
    marker = tmp_path / "runs"
    # The first two runs exit at once (to be restarted); the third stays, to be stopped.
    agent = f"echo $$ >> {marker}; [ $(wc -l < {marker}) -ge 3 ] && exec sleep 60; exec sleep 0.1"
    script_text = install._SYSV_SCRIPT.format(command=f"sh -c '{agent}'")
    script_text = script_text.replace("/run/vmcontroller-agent.pid", str(tmp_path / "pid")).replace(
        "/var/log/vmcontroller-agent.log", str(tmp_path / "log")
    )
    script = tmp_path / "vmcontroller-agent"
    script.write_text(script_text)
    script.chmod(0o755)
    subprocess.run([str(script), "start"], check=True)
    try:
        for _ in range(200):
            if marker.exists() and len(marker.read_text().split()) >= 3:
                break
            time.sleep(0.05)
        assert len(marker.read_text().split()) >= 3  # restarted after each exit
        assert subprocess.run([str(script), "status"], check=False).returncode == 0
    finally:
        subprocess.run([str(script), "stop"], check=True)
    assert subprocess.run([str(script), "status"], check=False, capture_output=True).returncode == 3
    pids = marker.read_text().split()
    time.sleep(1.5)
    assert marker.read_text().split() == pids  # nothing restarts it after stop
    # And the agent running at stop was ended with the loop (gone, or a zombie nobody reaped).
    stat_file = Path(f"/proc/{pids[-1]}/stat")
    assert not stat_file.exists() or stat_file.read_text().split(") ")[1][0] == "Z"
