"""
What each operation's result must look like before the host uses it.

The agent runs in a guest nobody vetted: a result is checked here, in one place, and a
malformed one (not an object, a missing or absurd mode, an exit code as a string, ...)
becomes a :class:`ProtocolError` instead of an ``AttributeError``, ``KeyError`` or
``OverflowError`` deep in the caller's code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from guest_agent.protocol.checksums import CHECKSUMS
from vmcontroller.errors import ProtocolError

_INT32 = 2**31


class _Malformed(Exception):
    """One field is wrong; :func:`check_result` says which operation it was."""


def _object(result: Any, fields: dict[str, Callable[[Any], bool]]) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise _Malformed(f"a JSON object was expected, got {type(result).__name__}")
    for name, valid in fields.items():
        if not valid(result.get(name)):
            raise _Malformed(f"{name!r} is missing or invalid: {_short(result.get(name))}")
    return result


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _int(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: type(value) is int and low <= value <= high


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _str(value: Any) -> bool:
    return isinstance(value, str)


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _file_name(value: Any) -> bool:
    """One path component: callers join it to a host directory (e.g. ``vmcontroller cp``)."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\0" not in value


def _hex(digits: int) -> Callable[[Any], bool]:
    pattern = re.compile(f"[0-9a-f]{{{digits}}}")
    return lambda value: isinstance(value, str) and pattern.fullmatch(value) is not None


def _file_type(value: Any) -> bool:
    return value in ("file", "dir", "symlink", "other")


_SIZE = _int(0, 2**63 - 1)
#: Permission bits with set-id and sticky, as ``stat`` reports them.
_MODE = _int(0, 0o7777)
_ID = _int(0, 2**32 - 1)

_TRANSFER = {"path": _str, "size": _SIZE, "mode": _MODE,
             **{name: _optional(_hex(digits)) for name, digits in CHECKSUMS.items()}}
_ENTRY = {"name": _file_name, "type": _file_type, "size": _SIZE, "mode": _MODE, "mtime": _number}
_STAT = {**_ENTRY, "path": _str, "uid": _ID, "gid": _ID, "target": _optional(_str)}
del _STAT["name"]
_EXEC = {"exit_code": _optional(_int(-_INT32, _INT32 - 1)), "signal": _optional(_str)}


def _nothing(result: Any) -> None:
    if result is not None:
        raise _Malformed(f"no result was expected, got {_short(result)}")


def _transfer(result: Any) -> dict[str, Any]:
    """A push's or pull's result: the file's facts and its checksum by one name or more."""
    _object(result, _TRANSFER)
    if not CHECKSUMS.keys() & result.keys():
        raise _Malformed(f"a checksum ({' or '.join(map(repr, CHECKSUMS))}) is missing")
    return result


def _entries(result: Any) -> list[dict[str, Any]]:
    if not isinstance(result, list):
        raise _Malformed(f"a JSON array was expected, got {type(result).__name__}")
    return [_object(entry, _ENTRY) for entry in result]


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "ping": lambda result: _object(result, {"time": _number, "version": _str}),
    "info": lambda result: _object(result, {}),
    "exec": lambda result: _object(result, _EXEC),
    "push": _transfer,
    "pull": _transfer,
    "stat": lambda result: _object(result, _STAT),
    "list": _entries,
    "mkdir": _nothing,
    "remove": _nothing,
    "shutdown": _nothing,
    "reboot": _nothing,
    "resize": _nothing,
}


def check_result(op: str, result: Any) -> Any:
    """
    ``result`` if it has the shape ``op``'s result must have (any result of an operation
    not listed here).

    :raises ProtocolError: it does not.
    """
    check = _CHECKS.get(op)
    if check is None:
        return result
    try:
        check(result)
    except _Malformed as e:
        raise ProtocolError(f"the agent answered {op} with a malformed result: {e}") from None
    return result


__all__ = ["check_result"]
