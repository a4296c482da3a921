"""
The agent prefers ChaCha20-Poly1305 on a CPU without AES instructions (a guest under TCG),
and leaves no trace of how in the environment its jobs inherit. A fresh interpreter each
time: OpenSSL reads its configuration once per process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from guest_agent.__main__ import cpu_has_aes

PROBE = """
import os, guest_agent.__main__ as agent_main
agent_main.cpu_has_aes = lambda: {has_aes}
agent_main.prefer_chacha_without_aes()
from guest_agent.protocol.tls import Authenticator
from vmcontroller.credentials import mint
host, agent = mint()
client = Authenticator.from_credentials(host, server_side=False).session()
server = Authenticator.from_credentials(agent, server_side=True).session()
class Discard:  # the handshake only: no plaintext comes
    def room(self): return None
    def filled(self, size): pass
    def received(self, plaintext): pass
client.start()
for _ in range(5):
    server.receive(client.ciphertext(), Discard())
    client.receive(server.ciphertext(), Discard())
print(server.cipher, client.cipher, "OPENSSL_CONF" in os.environ)
"""


def negotiated(has_aes: bool) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(has_aes=has_aes)], capture_output=True, check=True, text=True
    ).stdout
    return out.split()


def test_without_aes_the_agent_picks_chacha_and_leaves_the_environment_alone() -> None:
    assert negotiated(has_aes=False) == ["TLS_CHACHA20_POLY1305_SHA256"] * 2 + ["False"]


def test_with_aes_openssl_keeps_its_order() -> None:
    assert negotiated(has_aes=True) == ["TLS_AES_256_GCM_SHA384"] * 2 + ["False"]


def test_cpu_flags(tmp_path: Path) -> None:
    with_aes = tmp_path / "with"
    with_aes.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx\n")
    without = tmp_path / "without"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx aes_fake\n")
    assert cpu_has_aes(str(with_aes)) and not cpu_has_aes(str(without))
    assert cpu_has_aes(str(tmp_path / "missing"))  # cannot tell: OpenSSL's own order
