"""Small validators for the values typed collections store (bad input becomes a rule violation)."""

from __future__ import annotations

import math
from collections.abc import Set
from typing import Any

from ..mesh.identity import PeerId, PeerIdError
from .errors import MalformedDelta


def check_str(value: Any, name: str, max_len: int = 256) -> str | None:
    if not isinstance(value, str):
        return f"{name} must be a string"
    if len(value) > max_len:
        return f"{name} is longer than {max_len} characters"
    return None


def check_peer_id(value: Any, name: str) -> str | None:
    if not isinstance(value, str):
        return f"{name} must be a peer ID string"
    try:
        PeerId.from_string(value)
    except PeerIdError as exc:
        return f"{name}: {exc}"
    return None


def check_number(value: Any, name: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        return f"{name} must be a non-negative finite number"
    return None


def check_resources(value: Any, name: str, max_entries: int = 64) -> str | None:
    if not isinstance(value, dict):
        return f"{name} must be a map of resource name to amount"
    if len(value) > max_entries:
        return f"{name} has more than {max_entries} entries"
    for key, amount in value.items():
        problem = check_str(key, f"{name} key", 128) or check_number(amount, f"{name}[{key}]")
        if problem:
            return problem
    return None


def check_labels(value: Any, name: str, max_entries: int = 64) -> str | None:
    if not isinstance(value, dict):
        return f"{name} must be a map of strings"
    if len(value) > max_entries:
        return f"{name} has more than {max_entries} entries"
    for key, text in value.items():
        problem = check_str(key, f"{name} key", 128) or check_str(text, f"{name}[{key}]", 256)
        if problem:
            return problem
    return None


def check_fields(value: Any, required: set[str], optional: Set[str] = frozenset()) -> str | None:
    if not isinstance(value, dict):
        return "value must be a map"
    missing = required - value.keys()
    if missing:
        return f"value lacks {sorted(missing)}"
    extra = value.keys() - required - optional
    if extra:
        return f"value has unknown fields {sorted(map(str, extra))}"
    return None


#: What :func:`own_entry_value` gives for a well-formed tombstone (nothing more to check).
TOMBSTONE = object()


def own_entry_value(atom, allowed: bool, refusal: str) -> tuple[str | None, Any]:
    """The common start of a write rule for entries only their author may write.

    Returns ``(problem, None)`` when the write is refused (not ``allowed``, a tombstone with a value,
    an undecodable value), ``(None, TOMBSTONE)`` for a well-formed tombstone, else ``(None, value)``
    with the decoded value left for the collection's own checks.
    """
    if not allowed:
        return refusal, None
    if atom.tombstone:
        return (None, TOMBSTONE) if atom.value == b"" else ("a tombstone carries no value", None)
    try:
        return None, atom.decoded_value()
    except MalformedDelta as exc:
        return str(exc), None
