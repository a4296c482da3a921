"""
Coverage-guided fuzzing (atheris, libFuzzer) of the frame decoder and both protocol engines.

Each input is read twice: as raw bytes for a :class:`FrameDecoder`, and as a script of steps
(tests/fuzz/harness.py) for a host and an agent engine joined by pipes, where hostile steps
carry the input's bytes as frames, junk and markers.  The script's first byte chooses the
mode: development (no authentication) or TLS (both engines authenticate; frames travel
inside the hostile side's own TLS session, records and bits are forged below it).  A crash
is any exception other than our ProtocolError from the decoder or the host engine (the
harness resynchronises the host as the client does), or any broken invariant
(:class:`Violation`).  See tests/fuzz/README.md.

    .venv/bin/python -m tests.fuzz.fuzz_protocol -runs=1000000 -max_len=512 -dict=tests/fuzz/protocol.dict
"""

from __future__ import annotations

import sys
from collections import Counter

import atheris

# Only the code under test is instrumented: coverage of the harness would guide nothing.
with atheris.instrument_imports(include=["guest_agent.protocol"]):
    from guest_agent.protocol.connection import Limits
    from guest_agent.protocol.errors import ProtocolError
    from guest_agent.protocol.frames import FrameDecoder, FrameType
    from tests.fuzz.harness import AGENT, HOST, KINDS, Duel, Step

MAX_STEPS = 32
#: Inputs run per mode, printed as libFuzzer prints its progress: the run's share of TLS.
_modes: Counter[str] = Counter()


def _limits(data: atheris.FuzzedDataProvider) -> Limits:
    return Limits(
        data.ConsumeIntInRange(1024, 4096),
        data.ConsumeIntInRange(1024, 16 * 1024),
        data.ConsumeIntInRange(1, 4),
    )


def _step(data: atheris.FuzzedDataProvider) -> Step:
    return Step(
        kind=KINDS[data.ConsumeIntInRange(0, len(KINDS) - 1)],
        side=HOST if data.ConsumeBool() else AGENT,
        slot=data.ConsumeIntInRange(0, 7),
        channel=data.ConsumeIntInRange(0, 3),
        size=data.ConsumeIntInRange(0, 2500),
        frame_type=data.ConsumeIntInRange(1, len(FrameType)),
        flags=data.ConsumeIntInRange(0, 255),
        request_id=data.ConsumeIntInRange(0, 0xFFFFFFFF) if data.ConsumeBool() else 0,
        payload=data.ConsumeBytes(data.ConsumeIntInRange(0, 256)),
    )


def _decode(raw: bytes) -> None:
    decoder = FrameDecoder(1024)
    decoder.feed(raw)
    try:
        while decoder.next() is not None:
            pass
    except ProtocolError:
        pass


def test_one_input(raw: bytes) -> None:
    _decode(raw)
    data = atheris.FuzzedDataProvider(raw)
    tls = data.ConsumeBool()
    _tally("tls" if tls else "development")
    host_limits, agent_limits = _limits(data), _limits(data)
    # Half the inputs start from an open session, half fuzz the handshake too.
    if data.ConsumeBool():
        duel = Duel.opened(host_limits, agent_limits, tls=tls)
    else:
        duel = Duel(host_limits, agent_limits, tls=tls)
    steps: list[Step] = []
    while data.remaining_bytes() and len(steps) < MAX_STEPS:
        steps.append(_step(data))
    duel.run(steps)
    duel.settle()


def _tally(mode: str) -> None:
    """Count the input; at powers of two and every 100,000 inputs, print the counts so far."""
    _modes[mode] += 1
    total = _modes.total()
    if total & (total - 1) == 0 or total % 100_000 == 0:
        print(f"#{total}\tMODES  tls: {_modes['tls']} development: {_modes['development']}", file=sys.stderr)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
