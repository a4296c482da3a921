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
