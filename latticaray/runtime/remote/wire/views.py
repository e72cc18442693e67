"""`/latticaray/runtime-view/1`: the view a member pushes (resources, load, peers, named-actor
records, incarnation, leaving)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .fields import (
    MAX_ADDR,
    MAX_ADDRS,
    MAX_INCARNATION,
    MAX_NAME,
    MAX_NODE_ID,
    MAX_OPTS,
    MAX_VIEW_NAMES,
    MAX_VIEW_PEERS,
    Message,
    WireError,
    bad_field,
    checked,
    describe,
    field_flag,
    field_id,
    field_int,
    field_number,
    field_opt_bin,
    field_opt_map,
    field_opt_str,
    field_str,
    is_amounts,
    unpack_map,
)


# ===================================================================== /latticaray/runtime-view/1
@dataclass(slots=True, frozen=True)
class NameRecord(Message):
    """A named actor's record at its name's arbiter: ``node`` its host (nil while the claim is
    pending placement), ``owner`` the claimant. ``wait_s`` (the claimant's placement wait) is
    kept once a claim was pending."""

    aid: bytes
    node: str | None
    owner: str
    meta: dict[str, Any] | None
    detached: bool
    pending: bool = False
    wait_s: float | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "aid": self.aid,
            "node": self.node,
            "owner": self.owner,
            "meta": self.meta,
            "detached": self.detached,
        }
        if self.pending:
            out["pending"] = True
        if self.pending or self.wait_s is not None:
            out["wait_s"] = self.wait_s
        return out

    @classmethod
    def from_wire(cls, m: object, where: str) -> NameRecord:
        if type(m) is not dict:
            raise WireError(f"{where}: a name record must be a map, not {describe(m)}")
        wait_s = field_number(m, "wait_s", where, optional=True)
        return cls(
            field_id(m, "aid", where),
            field_opt_str(m, "node", where, MAX_NODE_ID),
            field_str(m, "owner", where, MAX_NODE_ID),
            field_opt_map(m, "meta", where, MAX_OPTS),
            field_flag(m, "detached", where, False),
            field_flag(m, "pending", where, False),
            None if wait_s is None else float(wait_s),
        )


def _peer_addrs(value: object) -> bool:
    return (
        type(value) is dict
        and len(value) <= MAX_VIEW_PEERS
        and all(
            type(k) is str
            and len(k) <= MAX_NODE_ID
            and type(v) is list
            and len(v) <= MAX_ADDRS
            and all(type(a) is str and len(a) <= MAX_ADDR for a in v)
            for k, v in value.items()
        )
    )


@dataclass(slots=True, frozen=True)
class RuntimeView(Message):
    """A node's resources and load, the members it knows (``peers``: node id -> multiaddrs)
    and the named-actor records it arbitrates (pending ones left out), pushed every 0.3 s.
    ``inc``: the sending process's incarnation (a new one: it restarted under the same peer id);
    ``bye``: it is leaving the mesh (sent as it stops); ``qlimit``: the bound of its fair task
    queue (a peer's task that finds it full is `rejected`; absent: unbounded); ``drop``: it stays
    a member but takes the receiver out of its neighbourhood (sparse peering: it stops pushing
    views to it)."""

    total: dict[str, float]
    avail: dict[str, float]
    queued: int
    running: int
    peers: dict[str, list[str]]
    names: list[tuple[str, str, NameRecord]]
    inc: bytes | None = None
    bye: bool = False
    #: how many tasks its fair queue takes from peers before it rejects them (None: unbounded)
    qlimit: int | None = None
    drop: bool = False

    def to_wire(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "total": self.total,
            "avail": self.avail,
            "queued": self.queued,
            "running": self.running,
            "peers": self.peers,
            "names": [[ns, name, record.to_wire()] for ns, name, record in self.names],
        }
        if self.inc is not None:
            m["inc"] = self.inc
        if self.bye:
            m["bye"] = True
        if self.qlimit is not None:
            m["qlimit"] = self.qlimit
        if self.drop:
            m["drop"] = True
        return m


def decode_view(data: bytes) -> RuntimeView:
    m = unpack_map(data, "runtime view")
    where = "runtime view"
    names = m.get("names")
    if type(names) is not list or len(names) > MAX_VIEW_NAMES:
        raise bad_field(m, "names", where, "a list of [namespace, name, record]")
    records = []
    for entry in names:
        if not (
            type(entry) is list
            and len(entry) == 3
            and type(entry[0]) is str
            and len(entry[0]) <= MAX_NAME
            and type(entry[1]) is str
            and len(entry[1]) <= MAX_NAME
        ):
            raise WireError(f"{where}: names entries are [namespace, name, record]")
        records.append((entry[0], entry[1], NameRecord.from_wire(entry[2], where)))
    return RuntimeView(
        checked(m, "total", where, is_amounts, "a map of resource amounts"),
        checked(m, "avail", where, is_amounts, "a map of resource amounts"),
        field_int(m, "queued", where, 0, 2**63 - 1),
        field_int(m, "running", where, 0, 2**63 - 1),
        checked(m, "peers", where, _peer_addrs, "a map of node id -> [multiaddr, ...]"),
        records,
        field_opt_bin(m, "inc", where, MAX_INCARNATION),
        field_flag(m, "bye", where, False),
        None if m.get("qlimit") is None else field_int(m, "qlimit", where, 0, 2**63 - 1),
        field_flag(m, "drop", where, False),
    )
