"""msgpack encoding of NAT-traversal messages, with size bounds and field validation.

Every message is a msgpack map with a string ``"t"`` (its type). Decoding checks the size before
parsing and each field's type and bounds before a core sees it, so cores only ever handle
well-formed values; anything else becomes :class:`MalformedMessage`.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import msgpack

from .addresses import Endpoint, check_endpoint
from .errors import MalformedMessage

MAX_MESSAGE_SIZE = 8192
"""Default bound on one NAT control message (bytes)."""


def encode(msg_type: str, **fields: Any) -> bytes:
    fields["t"] = msg_type
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


def decode(data: bytes, max_size: int = MAX_MESSAGE_SIZE) -> dict[str, Any]:
    if len(data) > max_size:
        raise MalformedMessage(f"message of {len(data)} bytes exceeds the {max_size}-byte limit")
    try:
        msg = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=1024,
            max_map_len=64,
            max_str_len=max_size,
            max_bin_len=max_size,
        )
    except Exception as exc:
        raise MalformedMessage(f"not a valid msgpack message: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise MalformedMessage("message must be a map with a string 't' (type) field")
    return msg


@overload
def get_str(
    msg: dict[str, Any], key: str, max_len: int = ..., optional: Literal[False] = ...
) -> str: ...
@overload
def get_str(msg: dict[str, Any], key: str, max_len: int = ..., *, optional: bool) -> str | None: ...
def get_str(
    msg: dict[str, Any], key: str, max_len: int = 256, optional: bool = False
) -> str | None:
    value = msg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise MalformedMessage(f"field {key!r} must be a string of at most {max_len} characters")
    return value


def get_bytes(msg: dict[str, Any], key: str, max_len: int = 256, min_len: int = 0) -> bytes:
    value = msg.get(key)
    if not isinstance(value, bytes) or not min_len <= len(value) <= max_len:
        raise MalformedMessage(f"field {key!r} must be {min_len}..{max_len} bytes")
    return value


@overload
def get_int(
    msg: dict[str, Any], key: str, lo: int, hi: int, optional: bool = ..., *, default: int
) -> int: ...
@overload
def get_int(
    msg: dict[str, Any], key: str, lo: int, hi: int, optional: Literal[False] = ...
) -> int: ...
@overload
def get_int(
    msg: dict[str, Any], key: str, lo: int, hi: int, optional: bool, default: None = ...
) -> int | None: ...
def get_int(
    msg: dict[str, Any],
    key: str,
    lo: int,
    hi: int,
    optional: bool = False,
    default: int | None = None,
) -> int | None:
    value = msg.get(key)
    if value is None and optional:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise MalformedMessage(f"field {key!r} must be an integer in {lo}..{hi}")
    return value


def get_float(msg: dict[str, Any], key: str, lo: float, hi: float) -> float:
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise MalformedMessage(f"field {key!r} must be a number in {lo}..{hi}")
    return float(value)


def get_endpoints(msg: dict[str, Any], key: str, max_count: int) -> list[Endpoint]:
    value = msg.get(key)
    if not isinstance(value, list) or len(value) > max_count:
        raise MalformedMessage(f"field {key!r} must be a list of at most {max_count} endpoints")
    return [check_endpoint(item, key) for item in value]


def get_str_list(msg: dict[str, Any], key: str, max_count: int, max_len: int = 256) -> list[str]:
    value = msg.get(key)
    if not isinstance(value, list) or len(value) > max_count:
        raise MalformedMessage(f"field {key!r} must be a list of at most {max_count} strings")
    for item in value:
        if not isinstance(item, str) or len(item) > max_len:
            raise MalformedMessage(f"field {key!r} items must be strings of at most {max_len}")
    return list(value)


def expect_type(msg: dict[str, Any], msg_type: str) -> None:
    """Raise :class:`MalformedMessage` unless ``msg`` is a ``msg_type`` message."""
    if msg["t"] != msg_type:
        raise MalformedMessage(f"expected a {msg_type!r} message, got {msg['t']!r}")
