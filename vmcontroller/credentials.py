"""
Per-VM credentials: minted on the host when a VM is defined, kept in a directory only
root reads, handed to the guest out of band by its driver, removed with the VM.

Each VM gets two Ed25519 keys and a self-signed certificate for each, the host's and the
agent's.  The host keeps its key and pins the agent's certificate; the agent gets its key
and pins the host's certificate.  The host's key never leaves the host, so a guest that
leaks its own credentials gives away nothing but the right to pretend to be itself.

Layout under the store's directory (0700)::

    <vm>/host.json    the host's end (0600)
    <vm>/agent.json   the agent's end, what the driver provisions into the guest (0600)

Rotating writes new files in place (new keys, new certificates): the guest picks them up
at its next boot from the driver's out-of-band channel, with no image rebuild.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from guest_agent.protocol.errors import CredentialsUnavailable
from guest_agent.protocol.tls import Credentials

#: Where the libvirt driver keeps them unless told otherwise.
DEFAULT_CREDENTIALS_DIR = Path("/var/lib/vmcontroller/credentials")

HOST_FILE = "host.json"
AGENT_FILE = "agent.json"

# Pinning, not expiry, decides who is accepted; the guest's clock may be anything after a
# restored snapshot, so the validity window is as wide as X.509 allows.  Rotation replaces.
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)

_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def _certificate(key: ed25519.Ed25519PrivateKey, common_name: str, usage: x509.ObjectIdentifier) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(key, None)
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def _private_key() -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key, der


def mint() -> tuple[Credentials, Credentials]:
    """
    New credentials for one VM: ``(host's end, agent's end)``, each pinning the other.  The
    names in the certificates are the same for every VM (and short, for the guest property
    limit of 1 KiB); what tells VMs apart is the keys, which the pins fix.
    """
    host_key, host_key_der = _private_key()
    agent_key, agent_key_der = _private_key()
    host_cert = _certificate(host_key, "vmcontroller host", ExtendedKeyUsageOID.CLIENT_AUTH)
    agent_cert = _certificate(agent_key, "vmcontroller agent", ExtendedKeyUsageOID.SERVER_AUTH)
    return Credentials(host_key_der, host_cert, agent_cert), Credentials(agent_key_der, agent_cert, host_cert)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the start, replacing it atomically."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # mkstemp's mode already; said for the reader
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class CredentialStore:
    """
    The credentials of every VM of one driver, one directory per VM.

    Blocking file I/O of a few hundred bytes; drivers call it from their thread pool.

    :param directory: created with mode 0700 (and its mode enforced) on first use.
    """

    def __init__(self, directory: Path | str = DEFAULT_CREDENTIALS_DIR) -> None:
        self.directory = Path(directory)

    def _vm_dir(self, vm: str) -> Path:
        if not _VM_NAME.match(vm):
            raise ValueError(f"{vm!r} is not a VM name a credentials directory can be made for")
        return self.directory / vm

    def _private_dir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)

    def create(self, vm: str) -> None:
        """Mint and store new credentials for ``vm``, replacing any it had (see :meth:`rotate`)."""
        host, agent = mint()
        self._private_dir(self.directory)
        vm_dir = self._vm_dir(vm)
        self._private_dir(vm_dir)
        _write_private(vm_dir / AGENT_FILE, agent.to_json())
        _write_private(vm_dir / HOST_FILE, host.to_json())

    #: Rotation is minting anew: the old certificates stop being accepted at once; the guest
    #: must boot again (its driver provisions the new ones) before the host can reach it.
    rotate = create

    def exists(self, vm: str) -> bool:
        return (self._vm_dir(vm) / HOST_FILE).is_file()

    def _read(self, vm: str, file: str) -> Credentials:
        path = self._vm_dir(vm) / file
        try:
            return Credentials.from_json(path.read_bytes())
        except FileNotFoundError:
            raise CredentialsUnavailable(
                f"VM {vm!r} has no credentials ({path} is missing): define the VM with vmcontroller, "
                "or make them with CredentialStore.create"
            ) from None
        except (OSError, ValueError) as e:
            raise CredentialsUnavailable(
                f"the credentials of VM {vm!r} in {path} are unusable: {e}"
            ) from None

    def host_credentials(self, vm: str) -> Credentials:
        """The host's end for ``vm``: what :func:`vmcontroller.client.connect` needs."""
        return self._read(vm, HOST_FILE)

    def agent_credentials(self, vm: str) -> Credentials:
        return self._read(vm, AGENT_FILE)

    def agent_file(self, vm: str) -> Path:
        """The agent's end as a file, for a driver that hands the guest a file (QEMU fw_cfg)."""
        return self._vm_dir(vm) / AGENT_FILE

    def remove(self, vm: str) -> None:
        shutil.rmtree(self._vm_dir(vm), ignore_errors=True)


__all__ = ["DEFAULT_CREDENTIALS_DIR", "CredentialStore", "Credentials", "mint"]
