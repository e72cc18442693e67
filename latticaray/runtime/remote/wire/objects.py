"""`/latticaray/object/1`: an object asked for by id or CID (or where it lies, on this host), and
the reply header."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from latticaray.runtime.ids import OBJECT_ID_LEN

from .fields import (
    MAX_ADDR,
    MAX_CID,
    MAX_CONTROL_MESSAGE,
    MAX_MANIFEST,
    MAX_REASON,
    Message,
    WireError,
    field_id,
    field_int,
    field_opt_bin,
    field_opt_str,
    field_str,
    unpack_map,
)


# ========================================================================= /latticaray/object/1
@dataclass(slots=True, frozen=True)
class ObjectById(Message):
    """Ask an object's owner for it by object id (it waits until the object is sealed, and
    recovers a lost one). ``blocks``: a store object may come in its store form."""

    oid: bytes
    blocks: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"oid": self.oid, "blocks": True} if self.blocks else {"oid": self.oid}


@dataclass(slots=True, frozen=True)
class ObjectByCid(Message):
    """Ask any holder for an object by CID. ``blocks``: a store object may come in its store
    form."""

    cid: str
    blocks: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"cid": self.cid, "blocks": True} if self.blocks else {"cid": self.cid}


@dataclass(slots=True, frozen=True)
class ObjectWhere(Message):
    """A peer on this host (over the same-host Unix path) asks where the object lies: the
    reply is `ObjectPlace` naming this node's store, which the asker copies the object from
    (checking every block) instead of the bytes crossing a socket; else `ObjectMissing`. An
    older node takes it for `ObjectByCid` and sends the bytes: the asker then hangs up."""

    cid: str

    def to_wire(self) -> dict[str, Any]:
        return {"cid": self.cid, "where": True}


ObjectRequest: TypeAlias = ObjectById | ObjectByCid | ObjectWhere


def decode_object_request(data: bytes) -> ObjectRequest:
    if len(data) > MAX_CONTROL_MESSAGE:
        raise WireError(f"object request of {len(data)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    m = unpack_map(data, "object request")
    blocks = m.get("blocks") is True
    if "oid" in m:
        return ObjectById(field_id(m, "oid", "object request", OBJECT_ID_LEN), blocks)
    if m.get("where") is True:
        return ObjectWhere(field_str(m, "cid", "object request", MAX_CID))
    return ObjectByCid(field_str(m, "cid", "object request", MAX_CID), blocks)


@dataclass(slots=True, frozen=True)
class ObjectHeader(Message):
    """The first frame of an object reply: status ``s`` (0 ok, 1 error: the bytes are a
    pickled exception) and the object's CID, then raw chunks of at most `CHUNK` adding up to
    ``size`` bytes. ``man`` (a store object in its store form, for a request with ``blocks``):
    the object's manifest block, whose CID is ``cid``; the chunks are then its payload, whose
    blocks the manifest names."""

    s: int
    size: int
    cid: str | None
    man: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"s": self.s, "size": self.size, "cid": self.cid}
        if self.man is not None:
            out["man"] = self.man
        return out


@dataclass(slots=True, frozen=True)
class ObjectMissing(Message):
    """The object reply when this node does not have the object (and will not)."""

    why: str

    def to_wire(self) -> dict[str, Any]:
        return {"missing": True, "why": self.why}


@dataclass(slots=True, frozen=True)
class ObjectPlace(Message):
    """The reply to `ObjectWhere`: the root directory of the store that holds the object."""

    root: str

    def to_wire(self) -> dict[str, Any]:
        return {"root": self.root}


def decode_object_header(data: bytes) -> ObjectHeader | ObjectMissing | ObjectPlace:
    m = unpack_map(data, "object reply header")
    where = "object reply header"
    if m.get("missing"):
        why = m.get("why")
        return ObjectMissing(why[:MAX_REASON] if type(why) is str else "not found")
    if "root" in m:
        return ObjectPlace(field_str(m, "root", where, MAX_ADDR))
    return ObjectHeader(
        field_int(m, "s", where, 0, 1),
        field_int(m, "size", where, 0, 2**63 - 1),
        field_opt_str(m, "cid", where, MAX_CID),
        field_opt_bin(m, "man", where, MAX_MANIFEST),
    )
