"""`/latticaray/stream/1`: a streaming generator's items asked for by a borrower."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from latticaray.runtime.ids import OBJECT_ID_LEN

from .fields import (
    MAX_CONTROL_MESSAGE,
    MAX_NODE_ID,
    Message,
    WireError,
    field_id,
    field_int,
    field_number,
    field_str,
    unpack_map,
)


# ========================================================================= /latticaray/stream/1
@dataclass(slots=True, frozen=True)
class StreamNext(Message):
    """Item ``i`` of a stream this node owns, waiting at most ``timeout`` s (the owner waits
    at most 20 s: the caller re-asks while it waits without a deadline)."""

    tid: bytes
    i: int
    timeout: float | None

    def to_wire(self) -> dict[str, Any]:
        return {"tid": self.tid, "i": self.i, "timeout": self.timeout}


def decode_stream_request(data: bytes) -> StreamNext:
    where = "stream request"
    if len(data) > MAX_CONTROL_MESSAGE:
        raise WireError(f"{where} of {len(data)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    m = unpack_map(data, where)
    timeout = field_number(m, "timeout", where, optional=True)
    return StreamNext(
        field_id(m, "tid", where),
        field_int(m, "i", where, 0, 2**63 - 1),
        None if timeout is None else float(timeout),
    )


@dataclass(slots=True, frozen=True)
class StreamItemRef(Message):
    """The item: a borrow of object ``oid`` owned by ``owner``."""

    oid: bytes
    owner: str

    def to_wire(self) -> dict[str, Any]:
        return {"oid": self.oid, "owner": self.owner}


@dataclass(slots=True, frozen=True)
class StreamEnd(Message):
    """The stream has no item ``i``: it ended before it."""

    def to_wire(self) -> dict[str, Any]:
        return {"end": True}


@dataclass(slots=True, frozen=True)
class StreamTimeout(Message):
    """Item ``i`` did not come within the request's timeout."""

    def to_wire(self) -> dict[str, Any]:
        return {"timeout": True}


StreamReply: TypeAlias = StreamItemRef | StreamEnd | StreamTimeout


def decode_stream_reply(data: bytes) -> StreamReply:
    where = "stream reply"
    m = unpack_map(data, where)
    if m.get("timeout"):
        return StreamTimeout()
    if m.get("end"):
        return StreamEnd()
    return StreamItemRef(
        field_id(m, "oid", where, OBJECT_ID_LEN), field_str(m, "owner", where, MAX_NODE_ID)
    )
