"""The bench's own logic that needs no guest: the order of its series, its parsers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed


def test_operations_take_turns_in_blocks_in_alternating_order(bench_importable: None) -> None:
    from bench.run import _series

    calls: list[str] = []

    def operation(name: str) -> Callable[[], Deferred[Any]]:
        def once() -> Deferred[Any]:
            calls.append(name)
            return succeed(None)

        return once

    series = Deferred.fromCoroutine(_series(5, 1, 2, [operation("a"), operation("b")]))
    latencies: list[Any] = []
    series.addCallback(latencies.extend)
    warmup, blocks = calls[:2], calls[2:]
    assert warmup == ["a", "b"]
    assert blocks == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "b"]
    assert [latency.count for latency in latencies] == [5, 5]


def test_openssl_speed_parsing(bench_importable: None) -> None:
    from bench.run import parse_openssl_speed

    output = "+DT:aes-256-gcm:2:16384\n+R:9000:aes-256-gcm:2.00\n+H:16384\n+F:25:AES-256-GCM:73728000.00\n"
    assert parse_openssl_speed(output) == {"aes-256-gcm": 73728000.0}


def test_the_table_gives_each_figure_its_sample_count_and_verdict(bench_importable: None) -> None:
    from bench.ctools import TransferRound
    from bench.qga import QGAFigures
    from bench.report import table
    from bench.run import DevelopmentMode, Results, Settings
    from bench.stats import Latency, Throughput

    mib = 1 << 20

    def latency(seconds: float) -> Latency:
        return Latency.of([seconds] * 200)

    def rate(mb_per_s: float, size: int = 64 * mib) -> Throughput:
        return Throughput(size, size / 1e6 / mb_per_s)

    # cksum, the fastest, is not judged: the reference is the faster of tee and dd.
    rounds = tuple(
        TransferRound(
            rate(20), rate(36), {"tee": rate(15), "dd": rate(30), "cksum": rate(80)},
            {"tee": rate(30), "dd": rate(45), "cksum": rate(144)},
        )
        for _ in range(3)
    )
    results = Results(
        vm="vm", virtualization="qemu", agent={}, settings=Settings(rounds=3),
        ping=latency(0.0008), exec_true=latency(0.013), push=rate(20), pull=rate(36),
        echo_rtt=latency(0.0002), echo_bulk=rate(100), sha256="0" * 64,
        development=DevelopmentMode(latency(0.0005), latency(0.013), rate(25), rate(60)),
        transfer_rounds=rounds,
        qga=QGAFigures("7.2", latency(0.0004), latency(0.02), 5.0, rate(4, 16 * mib), rate(12, 16 * mib)),
    )
    rows = {line[:48].strip(): line[48:].split() for line in table(results).splitlines() if len(line) > 48}
    assert rows["push 64 MiB"][:5] == ["3", "20.00", "MB/s", "push/C-tools", "0.67"]
    assert rows["push 64 MiB"][-1] == "met"
    assert rows["pull 64 MiB"][3:5] == ["pull/C-tools", "0.80"]
    assert rows["C-tools push, cksum (**)"] == ["3", "80.00", "MB/s", "push/cksum", "0.25", "(not", "judged)"]
    assert rows["C-tools pull, dd (**)"] == ["3", "45.00", "MB/s"]
    assert rows["development mode: push 64 MiB"][:6] == ["3", "25.00", "MB/s", "auth/dev", "0.80", ">="]
    assert rows["development mode: push 64 MiB"][-1] == "met"
    assert rows["development mode: pull 64 MiB"][:5] == ["3", "60.00", "MB/s", "auth/dev", "0.60"]
    assert rows["development mode: pull 64 MiB"][-1] == "MISSED"
    assert rows["QEMU guest agent: push 16 MiB"][0] == "3"
    assert rows["QEMU guest agent 7.2: ping"][-6:] == ["ours", "x2.00", "SLOWER", ">=", "1", "MISSED"]
    qga_exec = rows["QEMU guest agent: exec /bin/true (5.0 polls)"]
    assert qga_exec[-6:] == ["ours", "x1.54", "faster", ">=", "1", "met"]
