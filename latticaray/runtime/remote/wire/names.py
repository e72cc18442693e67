"""`/latticaray/names/1`: named actors at their name's arbiter (claim, lookup, release, placed,
moved, hosted) and the replies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self, TypeAlias

from .fields import (
    MAX_CONTROL_MESSAGE,
    MAX_NAME,
    MAX_NODE_ID,
    MAX_OPTS,
    Message,
    WireError,
    field_flag,
    field_id,
    field_number,
    field_opt_map,
    field_opt_str,
    field_str,
    unpack_map,
)
from .views import NameRecord


# ========================================================================== /latticaray/names/1
@dataclass(slots=True, frozen=True)
class NameClaim(Message):
    """Claim ``ns/name`` for actor ``aid`` at its arbiter. ``host`` nil with ``pending``: the
    creation waits for DHT capacity (up to ``wait_s``) and sends `NamePlaced` when placed."""

    OP: ClassVar[str] = "claim"
    ns: str
    name: str
    aid: bytes
    owner: str
    host: str | None
    meta: dict[str, Any] | None
    get_if_exists: bool
    detached: bool
    pending: bool = False
    wait_s: float | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "op": "claim",
            "ns": self.ns,
            "name": self.name,
            "aid": self.aid,
            "owner": self.owner,
            "host": self.host,
            "meta": self.meta,
            "get_if_exists": self.get_if_exists,
            "detached": self.detached,
        }
        if self.pending:
            out["pending"] = True
            out["wait_s"] = self.wait_s
        return out

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> NameClaim:
        wait_s = field_number(m, "wait_s", "claim", optional=True)
        pending = field_flag(m, "pending", "claim", False)
        return cls(
            field_str(m, "ns", "claim", MAX_NAME),
            field_str(m, "name", "claim", MAX_NAME),
            field_id(m, "aid", "claim"),
            field_str(m, "owner", "claim", MAX_NODE_ID),
            field_opt_str(m, "host", "claim", MAX_NODE_ID),
            field_opt_map(m, "meta", "claim", MAX_OPTS),
            field_flag(m, "get_if_exists", "claim", False),
            field_flag(m, "detached", "claim", False),
            pending,
            None if wait_s is None or not pending else float(wait_s),  # only read when pending
        )


@dataclass(slots=True, frozen=True)
class NameLookup(Message):
    """The record of ``ns/name`` (answered with `NameLookupReply`)."""

    OP: ClassVar[str] = "lookup"
    ns: str
    name: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": "lookup", "ns": self.ns, "name": self.name}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> NameLookup:
        return cls(field_str(m, "ns", "lookup", MAX_NAME), field_str(m, "name", "lookup", MAX_NAME))


@dataclass(slots=True, frozen=True)
class _ActorName(Message):
    """The shape of `release` and `hosted`: a name and its actor id (``OP`` says which)."""

    OP: ClassVar[str]
    ns: str
    name: str
    aid: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "ns": self.ns, "name": self.name, "aid": self.aid}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> Self:
        where = cls.OP
        return cls(
            field_str(m, "ns", where, MAX_NAME),
            field_str(m, "name", where, MAX_NAME),
            field_id(m, "aid", where),
        )


@dataclass(slots=True, frozen=True)
class _ActorNameAt(Message):
    """The shape of `placed` and `moved`: a name, its actor id and the actor's host ``node``."""

    OP: ClassVar[str]
    ns: str
    name: str
    aid: bytes
    node: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "ns": self.ns, "name": self.name, "aid": self.aid, "node": self.node}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> Self:
        where = cls.OP
        return cls(
            field_str(m, "ns", where, MAX_NAME),
            field_str(m, "name", where, MAX_NAME),
            field_id(m, "aid", where),
            field_str(m, "node", where, MAX_NODE_ID),
        )


@dataclass(slots=True, frozen=True)
class NameRelease(_ActorName):
    """Give the name back (if ``aid`` still holds it)."""

    OP: ClassVar[str] = "release"


@dataclass(slots=True, frozen=True)
class NamePlaced(_ActorNameAt):
    """A pending claim's actor found its host ``node``."""

    OP: ClassVar[str] = "placed"


@dataclass(slots=True, frozen=True)
class NameMoved(_ActorNameAt):
    """The owner restarted the named actor on ``node`` (its host died)."""

    OP: ClassVar[str] = "moved"


@dataclass(slots=True, frozen=True)
class NameHosted(_ActorName):
    """Asked of the node hosting the actor: its method table (`NameHostedReply`)."""

    OP: ClassVar[str] = "hosted"


NamesRequest: TypeAlias = NameClaim | NameLookup | NameRelease | NamePlaced | NameMoved | NameHosted

NAMES_OPS: Final[dict[str, Callable[[dict[Any, Any]], NamesRequest]]] = {
    "claim": NameClaim.from_wire,
    "lookup": NameLookup.from_wire,
    "release": NameRelease.from_wire,
    "placed": NamePlaced.from_wire,
    "moved": NameMoved.from_wire,
    "hosted": NameHosted.from_wire,
}


def decode_names_request(data: bytes) -> NamesRequest:
    if len(data) > MAX_CONTROL_MESSAGE:
        raise WireError(f"names request of {len(data)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    m = unpack_map(data, "names request")
    op = m.get("op")
    decode = NAMES_OPS.get(op) if type(op) is str else None
    if decode is None:
        raise WireError(f"unknown names op {op!r}")
    return decode(m)


@dataclass(slots=True, frozen=True)
class NamesOk(Message):
    """``{"ok": true}``: a claim granted; the answer to release, placed and moved too."""

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True}


@dataclass(slots=True, frozen=True)
class ClaimRefused(Message):
    """A claim refused: the name is held (``existing``) for another actor by ``holder``."""

    existing: NameRecord
    holder: str

    def to_wire(self) -> dict[str, Any]:
        return {"ok": False, "existing": self.existing.to_wire(), "holder": self.holder}


@dataclass(slots=True, frozen=True)
class NameLookupReply(Message):
    """The record of a name, or nil."""

    existing: NameRecord | None

    def to_wire(self) -> dict[str, Any]:
        return {"existing": None if self.existing is None else self.existing.to_wire()}


@dataclass(slots=True, frozen=True)
class NameHostedReply(Message):
    """The hosted actor's method table; nil unless this node hosts that live actor under
    that name."""

    meta: dict[str, Any] | None

    def to_wire(self) -> dict[str, Any]:
        return {"meta": self.meta}


NamesReply: TypeAlias = NamesOk | ClaimRefused | NameLookupReply | NameHostedReply


def decode_names_reply(data: bytes) -> NamesReply:
    where = "names reply"
    m = unpack_map(data, where)
    if "ok" in m:
        if m["ok"] is True:
            return NamesOk()
        return ClaimRefused(
            NameRecord.from_wire(m.get("existing"), where),
            field_str(m, "holder", where, MAX_NODE_ID),
        )
    if "existing" in m:
        existing = m["existing"]
        return NameLookupReply(None if existing is None else NameRecord.from_wire(existing, where))
    if "meta" in m:
        return NameHostedReply(field_opt_map(m, "meta", where, MAX_OPTS))
    raise WireError(f"{where} has none of 'ok', 'existing', 'meta': {sorted(map(str, m))}")
