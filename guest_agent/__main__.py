"""``python -m guest_agent run ...`` serves the host; ``... install`` installs the agent."""

from __future__ import annotations

import os
import sys

#: OpenSSL settings that put ChaCha20-Poly1305 first among the TLS 1.3 cipher suites.
CHACHA_FIRST = """\
openssl_conf = vmcontroller_agent
[vmcontroller_agent]
ssl_conf = vmcontroller_agent_ssl
[vmcontroller_agent_ssl]
system_default = vmcontroller_agent_tls
[vmcontroller_agent_tls]
Ciphersuites = TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256
"""


def cpu_has_aes(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has AES instructions (the ``aes`` flag); True when it cannot tell."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and "aes" in line.split(":", 1)[1].split() for line in f)
    except OSError:
        return True


def prefer_chacha_without_aes() -> None:
    """
    On a CPU without AES instructions (QEMU's emulated CPU under TCG, say), AES-GCM runs in
    software several times slower than ChaCha20-Poly1305 (``openssl speed`` in such a
    guest: about 6 against 28 MB/s), and it bounds every transfer. The agent is the TLS
    server and the server's order decides (Python sets ``OP_CIPHER_SERVER_PREFERENCE``),
    but Python's ``ssl`` cannot set TLS 1.3 suites: OpenSSL's configuration can, and it is
    read once, when ``ssl`` is first imported. So it is named in ``OPENSSL_CONF`` for that
    moment only (a file in memory: the agent may run from a zipapp), and the variable is
    gone before any job could inherit it.
    """
    if "ssl" in sys.modules or "OPENSSL_CONF" in os.environ or cpu_has_aes():
        return
    fd = os.memfd_create("vmcontroller-openssl.cnf", os.MFD_CLOEXEC)
    try:
        os.write(fd, CHACHA_FIRST.encode())
        os.environ["OPENSSL_CONF"] = f"/proc/self/fd/{fd}"
        import ssl  # noqa: F401  (OpenSSL reads its configuration now)
    finally:
        os.environ.pop("OPENSSL_CONF", None)
        os.close(fd)


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        from guest_agent import install

        return install.main(argv[1:])
    if argv[:1] == ["run"]:
        prefer_chacha_without_aes()
        from guest_agent import service

        return service.main(argv[1:])
    print("usage: python -m guest_agent {run|install} [options]  (--help after either)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
