"""`/latticaray/ref/1`: borrowers' reference-count operations for an owner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .fields import (
    BORROW,
    MAX_CONTROL_MESSAGE,
    MAX_REF_OPS,
    UNBORROW,
    Message,
    WireError,
    checked,
    is_counted_id,
    unpack_map,
)


# ============================================================================ /latticaray/ref/1
def _ops(value: object) -> bool:
    return (
        type(value) is list
        and len(value) <= MAX_REF_OPS
        and all(
            type(op) is list
            and len(op) == 2
            and (op[0] == BORROW or op[0] == UNBORROW)
            and type(op[0]) is int
            and is_counted_id(op[1])
            for op in value
        )
    )


@dataclass(slots=True, frozen=True)
class RefOps(Message):
    """Borrow (`BORROW`) and unborrow (`UNBORROW`) registrations at an object's (or an actor
    handle's: an actor id) owner, in the order the borrower made them (at most `MAX_REF_OPS`).
    The reply is empty (no bytes)."""

    ops: list[list[Any]]

    def to_wire(self) -> dict[str, Any]:
        return {"ops": self.ops}


def decode_ref(data: bytes) -> RefOps:
    if len(data) > MAX_CONTROL_MESSAGE:
        raise WireError(f"reference update of {len(data)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    m = unpack_map(data, "reference update")
    return RefOps(checked(m, "ops", "reference update", _ops, "[[0|1, object or actor id], ...]"))
