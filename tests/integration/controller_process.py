"""
A controller in a process of its own, for the restart test: the test kills it with SIGKILL
and starts another.

``python controller_process.py CREDENTIALS SOCKET start EXEC_ID ARGV...`` connects to the agent
behind the unix socket ``SOCKET``, authenticated with the host's end of the VM's credentials in
the private file ``CREDENTIALS``, starts ``ARGV`` as retained command ``EXEC_ID`` and copies its output
to stdout as it arrives (until it is killed).

``python controller_process.py CREDENTIALS SOCKET collect EXEC_ID`` connects, lists the agent's commands,
attaches to ``EXEC_ID``, acknowledges it and prints one JSON object: the listing's entry, the
exit status and the whole output (hex).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import react

from guest_agent.credentials import read_credentials_file
from vmcontroller.client import connect


def _write(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


async def _main(
    reactor: Any, credentials: str, socket: str, mode: str, exec_id: str, argv: list[str]
) -> None:
    client = await connect(
        reactor,
        UNIXClientEndpoint(reactor, socket),
        credentials=read_credentials_file(credentials),
        timeout=300,
    )
    if mode == "start":
        await client.exec(argv, exec_id=exec_id, on_stdout=_write).result()
        return
    listed = [info for info in await client.commands() if info.exec_id == exec_id]
    result = await client.attach(exec_id).result()
    await client.acknowledge(exec_id)
    remaining = [info.exec_id for info in await client.commands()]
    await client.close()
    _write(json.dumps({
        "listed": [{"running": info.running, "argv": list(info.argv)} for info in listed],
        "exit_code": result.exit_code,
        "signal": result.signal,
        "stdout": result.stdout.hex(),
        "stderr": result.stderr.hex(),
        "output_complete": result.output_complete,
        "remaining": remaining,
    }).encode())


if __name__ == "__main__":
    credentials, socket, mode, exec_id, *argv = sys.argv[1:]
    react(lambda reactor: Deferred.fromCoroutine(_main(reactor, credentials, socket, mode, exec_id, argv)))
