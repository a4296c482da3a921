"""Argument checks shared by the operations: what the host sends is not trusted."""

from __future__ import annotations

import os
from typing import Any

from guest_agent.protocol.errors import BadRequest


def os_string(value: Any, what: str) -> str:
    """
    ``value`` if the kernel can take it as a path or argument: a string without NUL that
    encodes to bytes (lone surrogates other than those ``os.fsdecode`` makes of undecodable
    bytes cannot).

    :raises BadRequest: it is not one.
    """
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {_short(value)}")
    if "\0" in value:
        raise BadRequest(f"{what} contains a NUL character, which no path or argument can hold")
    try:
        os.fsencode(value)
    except UnicodeEncodeError as e:
        raise BadRequest(f"{what} contains {value[e.start:e.end]!r}, which is not a character a path or "
                         "argument can hold (a lone surrogate)") from None
    return value


def mode_arg(args: dict[str, Any], default: int | None) -> int | None:
    """The ``mode`` argument: permission bits, set-id and sticky included, or ``default``."""
    mode = args.get("mode", default)
    if mode is not None and (type(mode) is not int or not 0 <= mode <= 0o7777):
        raise BadRequest(f"'mode' must be permission bits from 0 to 0o7777 or null, got {_short(mode)}")
    return mode


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."
