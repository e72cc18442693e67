"""Replication core (sans-I/O): a replica's writer, delta gossip, and digest anti-entropy.

:class:`Replica` owns one :class:`~latticaray.state.store.CrdtStore`, the local hybrid clock and the
node's key. It signs local writes (:meth:`Replica.write`) and speaks protocol
``/latticaray/state/1`` (docs/protocol/state.md) as bytes in, bytes out:

* **Gossip** — atoms that changed local state (local writes, and atoms newly learned from peers)
  are batched every ``gossip_interval`` and pushed in full to ``fanout`` random peers and
  announced (``ihave``: slot hash and version only) to ``lazy_fanout`` others, which pull what
  they lack (``iwant``). A replica forwards an atom only the first time it applies it
  (infect-and-die), so a write costs each replica about ``fanout`` copies of the atom plus
  ``lazy_fanout`` announcements.
* **Anti-entropy** — every ``anti_entropy_interval`` the replica opens a session with one random
  peer and descends the two digest tries together: the responder answers each differing node
  with its children's fingerprints, or, once a node holds at most ``leaf_max`` slots, with a short
  listing of ``(slot hash, hlc, fingerprint)``. The initiator then pushes what the responder lacks
  and asks for what it lacks itself, so only differences travel. The responder keeps no session
  state.

The driver (asyncio over mesh RPC, or the simulator) calls :meth:`handle_message` for every message
or RPC reply received, :meth:`tick` when :meth:`next_deadline` passes, and sends what they return.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..mesh.identity import KeyPair, PeerId
from .atoms import DEFAULT_LIMITS, Atom, Limits, decode_atom, encode_atom, encode_value, sign_atom
from .errors import DeltaTooLarge, MalformedDelta, NotAMember, WriteRejected
from .hlc import Hlc
from .store import TRIE_DEPTH, CrdtStore, MergeReport

__all__ = ["PROTOCOL_ID", "Outgoing", "Replica", "ReplicationConfig", "ReplicationStats"]

PROTOCOL_ID = "/latticaray/state/1"
WIRE_VERSION = 1
_U64 = 2**64 - 1

Outgoing = tuple[PeerId, bytes]


@dataclass
class ReplicationConfig:
    #: Peers each gossip flush sends the atoms to in full ("eager push") ...
    fanout: int = 2
    #: ... and peers it only announces them to ("ihave"; they pull what they lack with "iwant").
    lazy_fanout: int = 6
    #: An announced atom is asked for again (from another announcer) after this long.
    want_timeout: float = 1.0
    max_outstanding_wants: int = 65536
    gossip_interval: float = 0.1
    anti_entropy_interval: float = 1.0
    gc_interval: float = 10.0
    leaf_max: int = 16
    max_session_rounds: int = 16
    max_concurrent_sessions: int = 2
    session_timeout: float = 5.0
    #: Soft cap on the atom bytes put into one outgoing message.
    message_budget: int = 256 * 1024
    #: Atoms learned by anti-entropy are gossiped on only when a reply brought at most this many
    #: (small heal differences spread fast; a joiner's bulk catch-up is not re-broadcast).
    forward_max: int = 64
    max_nodes_per_message: int = 512
    max_wants_per_message: int = 8192


@dataclass
class ReplicationStats:
    atoms_applied: int = 0
    atoms_stale: int = 0
    atoms_rejected: Counter = field(default_factory=Counter)
    messages_rejected: Counter = field(default_factory=Counter)
    bytes_sent: Counter = field(default_factory=Counter)
    sessions_started: int = 0
    sessions_completed: int = 0


@dataclass
class _Session:
    peer: PeerId
    started: float
    rounds: int = 0


def _atom_size(atom: Atom) -> int:
    return len(atom.value) + len(atom.key) + len(atom.subkey) + len(atom.collection) + 130


class Replica:
    """One node's replica of the cluster state: store, clock, signing key, gossip, anti-entropy.

    ``wall_clock()`` (seconds) timestamps local writes; the driver injects it (``time.time`` in
    production, the simulator's clock in simulation). Every other entry point takes ``now``.
    """

    def __init__(
        self,
        key_pair: KeyPair,
        *,
        store: CrdtStore | None = None,
        config: ReplicationConfig | None = None,
        limits: Limits = DEFAULT_LIMITS,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] | None = None,
        is_member: Callable[[PeerId], bool] | None = None,
    ) -> None:
        self.key_pair = key_pair
        self.peer_id = key_pair.peer_id
        self.store = store if store is not None else CrdtStore(is_member=is_member)
        if is_member is not None:
            self.store.is_member = is_member
        self.clock = self.store.clock
        self.config = config or ReplicationConfig()
        self.limits = limits
        self.rng = rng or random.Random()
        self.wall_clock = wall_clock
        self.stats = ReplicationStats()
        self._peers: list[PeerId] = []
        self._pending: list[Atom] = []
        self._pending_sources: set[PeerId | None] = set()
        self._next_gossip: float | None = None
        self._next_anti_entropy: float | None = None
        self._next_gc: float | None = None
        self._sessions: dict[int, _Session] = {}
        self._session_seq = 0
        self._requested: dict[int, float] = {}
        #: Called when gossip becomes pending, so a sleeping driver can re-arm its timer.
        self.on_pending: Callable[[], None] | None = None

    # local writes -----------------------------------------------------------------------------
    def _wall(self) -> float:
        if self.wall_clock is None:
            raise RuntimeError("this replica has no wall_clock; pass one to write locally")
        return self.wall_clock()

    def next_hlc(self) -> Hlc:
        return self.clock.tick(self._wall())

    def write(
        self,
        collection: str,
        key: str,
        subkey: str,
        value: Any = None,
        *,
        tombstone: bool = False,
        hlc: Hlc | None = None,
    ) -> Atom:
        """Sign, apply and queue for gossip one atom authored by this node; returns it (the delta).

        The local collection's write rule applies to local writes too, so a bug cannot produce an
        atom every other replica would refuse.
        """
        spec = self.store.spec(collection)
        encoded = b"" if tombstone else encode_value(value)
        if len(encoded) > self.limits.max_value_bytes:
            raise DeltaTooLarge(
                f"value is {len(encoded)} bytes (limit {self.limits.max_value_bytes})"
            )
        for name, text, limit in (
            ("collection", collection, self.limits.max_collection_len),
            ("key", key, self.limits.max_key_len),
            ("subkey", subkey, self.limits.max_subkey_len),
        ):
            if len(text.encode()) > limit:
                raise DeltaTooLarge(f"{name} {text[:40]!r}... is longer than {limit} bytes")
        if hlc is None:
            hlc = self.next_hlc()
        atom = sign_atom(self.key_pair, collection, key, subkey, hlc, encoded, tombstone)
        reason = spec.rule(atom)
        if reason is not None:
            raise WriteRejected(f"local write to {collection}/{key}/{subkey}: {reason}")
        self.store.apply_local(atom)
        self._enqueue([atom], None, self._wall())
        return atom

    # peers ------------------------------------------------------------------------------------
    def set_peers(self, peers: Iterable[PeerId]) -> None:
        """The peers gossip and anti-entropy may contact (the driver keeps this current)."""
        self._peers = [p for p in peers if p != self.peer_id]

    @property
    def peers(self) -> list[PeerId]:
        return list(self._peers)

    # timers -----------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        times = [t for t in (self._next_anti_entropy, self._next_gc) if t is not None]
        if self._pending and self._next_gossip is not None:
            times.append(self._next_gossip)
        return min(times) if times else None

    def tick(self, now: float) -> list[Outgoing]:
        """Run whatever is due at ``now``: gossip flush, anti-entropy start, GC, session expiry."""
        out: list[Outgoing] = []
        cfg = self.config
        if self._next_anti_entropy is None:
            self._next_anti_entropy = now + self.rng.uniform(0, cfg.anti_entropy_interval)
        if self._next_gc is None:
            self._next_gc = now + cfg.gc_interval
        if self._pending and (self._next_gossip is None or now >= self._next_gossip):
            out.extend(self.flush_gossip())
            self._next_gossip = None
        if now >= self._next_anti_entropy:
            self._next_anti_entropy = now + cfg.anti_entropy_interval
            for sid in [
                s for s, sess in self._sessions.items() if now - sess.started > cfg.session_timeout
            ]:
                del self._sessions[sid]
            while len(self._sessions) >= cfg.max_concurrent_sessions:
                del self._sessions[min(self._sessions)]
            if self._peers:
                out.append(self.start_anti_entropy(self.rng.choice(self._peers), now))
        if now >= self._next_gc:
            self._next_gc = now + cfg.gc_interval
            self.store.gc(now)
        return out

    # gossip -----------------------------------------------------------------------------------
    def _enqueue(self, atoms: list[Atom], source: PeerId | None, now: float) -> None:
        if not atoms:
            return
        self._pending.extend(atoms)
        self._pending_sources.add(source)
        if self._next_gossip is None:
            self._next_gossip = now + self.config.gossip_interval
            if self.on_pending is not None:
                self.on_pending()

    def flush_gossip(self) -> list[Outgoing]:
        """Send pending atoms now: in full to ``fanout`` peers, as ``ihave`` to ``lazy_fanout``."""
        atoms, self._pending = self._pending, []
        sources, self._pending_sources = self._pending_sources, set()
        candidates = self._peers
        if len(sources) == 1 and None not in sources:
            candidates = [p for p in candidates if p not in sources]
        if not atoms or not candidates:
            return []
        cfg = self.config
        targets = self.rng.sample(candidates, min(cfg.fanout + cfg.lazy_fanout, len(candidates)))
        eager, lazy = targets[: cfg.fanout], targets[cfg.fanout :]
        out = []
        messages = [
            self._encode({"t": "delta", "a": [encode_atom(a) for a in chunk]})
            for chunk in self._chunks(atoms)
        ]
        for peer in eager:
            for data in messages:
                self.stats.bytes_sent["delta"] += len(data)
                out.append((peer, data))
        if lazy:
            store = self.store
            entries = [
                [h, a.hlc.wall_ms, a.hlc.logical, store.fingerprint(a.slot)]
                for a in atoms
                if (h := store.slot_hash_of(a.slot)) is not None
            ]
            for start in range(0, len(entries), cfg.max_wants_per_message):
                data = self._encode(
                    {"t": "ihave", "h": entries[start : start + cfg.max_wants_per_message]}
                )
                for peer in lazy:
                    self.stats.bytes_sent["ihave"] += len(data)
                    out.append((peer, data))
        return out

    def _answer_ihave(self, msg: dict, now: float) -> bytes | None:
        """Ask for the announced atoms this replica lacks (or holds older), unless already asked."""
        cfg = self.config
        wants = []
        for entry in _list_field(msg, "h", cfg.max_wants_per_message):
            if not _int_list(entry, 4):
                raise MalformedDelta("ihave entry must be [hash, wall, logical, fp]")
            h, wall, logical, _fp = entry
            own = self.store.atoms_with_hash(h)
            if any((a.hlc.wall_ms, a.hlc.logical) >= (wall, logical) for a in own):
                continue
            asked = self._requested.get(h)
            if asked is not None and now - asked < cfg.want_timeout:
                continue
            self._requested[h] = now
            wants.append(h)
        if len(self._requested) > cfg.max_outstanding_wants:
            horizon = now - cfg.want_timeout
            self._requested = {h: t for h, t in self._requested.items() if t >= horizon}
        if not wants:
            return None
        data = self._encode({"t": "iwant", "w": wants})
        self.stats.bytes_sent["iwant"] += len(data)
        return data

    def _answer_iwant(self, src: PeerId, msg: dict) -> list[Outgoing]:
        chosen: dict[tuple, Atom] = {}
        for h in _list_field(msg, "w", self.config.max_wants_per_message):
            if type(h) is not int or not 0 <= h <= _U64:
                raise MalformedDelta("wanted slot hashes are 64-bit integers")
            for atom in self.store.atoms_with_hash(h):
                chosen[atom.slot] = atom
        atoms = self._budgeted(list(chosen.values()))
        if not atoms:
            return []
        data = self._encode({"t": "delta", "a": [encode_atom(a) for a in atoms]})
        self.stats.bytes_sent["delta"] += len(data)
        return [(src, data)]

    def _chunks(self, atoms: list[Atom]) -> list[list[Atom]]:
        chunks: list[list[Atom]] = [[]]
        size = 0
        for atom in atoms:
            cost = _atom_size(atom)
            if chunks[-1] and (
                size + cost > self.config.message_budget
                or len(chunks[-1]) >= self.limits.max_atoms_per_message
            ):
                chunks.append([])
                size = 0
            chunks[-1].append(atom)
            size += cost
        return chunks

    # anti-entropy: initiator ------------------------------------------------------------------
    def start_anti_entropy(self, peer: PeerId, now: float) -> Outgoing:
        self._session_seq += 1
        sid = self._session_seq
        self._sessions[sid] = _Session(peer, now)
        self.stats.sessions_started += 1
        fp, count = self.store.node(0, 0)
        data = self._encode({"t": "ae", "s": sid, "n": [[0, 0, fp, count]], "a": [], "w": []})
        self.stats.bytes_sent["ae"] += len(data)
        return peer, data

    def session_failed(self, peer: PeerId) -> None:
        """The driver reports that a call to ``peer`` failed: drop its sessions."""
        for sid in [s for s, sess in self._sessions.items() if sess.peer == peer]:
            del self._sessions[sid]

    def _continue_session(self, src: PeerId, msg: dict, now: float) -> list[Outgoing]:
        sid = msg.get("s")
        session = self._sessions.get(sid) if isinstance(sid, int) else None
        if session is None or session.peer != src or not isinstance(sid, int):
            self.stats.messages_rejected["unexpected_reply"] += 1
            return []
        self._merge_from(src, _atoms_field(msg, self.limits), now, forward=None)
        store = self.store
        next_nodes: list[list[int]] = []
        push: dict[tuple, Atom] = {}
        want: list[int] = []

        def push_all(depth: int, prefix: int) -> None:
            for _, atom in store.items_under(depth, prefix):
                push[atom.slot] = atom

        for entry in _list_field(msg, "c", self.config.max_nodes_per_message):
            depth, prefix, kids = _node_children(entry)
            if depth >= TRIE_DEPTH:
                raise MalformedDelta("trie leaves have no children")
            theirs = {}
            for kid in kids:
                if not _int_list(kid, 3):
                    raise MalformedDelta("anti-entropy child must be [prefix, fp, count]")
                theirs[kid[0]] = (kid[1], kid[2])
            own_children = {cp: (fp, cnt) for cp, fp, cnt in store.children(depth, prefix)}
            for cp, (fp, cnt) in own_children.items():
                if cp not in theirs:
                    push_all(depth + 1, cp)
                elif theirs[cp] != (fp, cnt):
                    next_nodes.append([depth + 1, cp, fp, cnt])
            for cp in theirs:
                if cp not in own_children:
                    next_nodes.append([depth + 1, cp, 0, 0])
        for entry in _list_field(msg, "l", self.config.max_nodes_per_message):
            depth, prefix, listing = _node_children(entry)
            own_items: dict[int, list[Atom]] = {}
            for h, atom in store.items_under(depth, prefix):
                own_items.setdefault(h, []).append(atom)
            seen = set()
            for item in listing:
                if not _int_list(item, 4):
                    raise MalformedDelta(
                        "anti-entropy listing entry must be [hash, wall, logical, fp]"
                    )
                h, wall, logical, fp = item
                seen.add(h)
                own = own_items.get(h)
                if not own:
                    want.append(h)
                    continue
                for atom in own:
                    ours = (atom.hlc.wall_ms, atom.hlc.logical)
                    if ours > (wall, logical):
                        push[atom.slot] = atom
                    elif ours < (wall, logical):
                        want.append(h)
                    elif store.fingerprint(atom.slot) != fp:
                        push[atom.slot] = atom
                        want.append(h)
            for h, own in own_items.items():
                if h not in seen:
                    for atom in own:
                        push[atom.slot] = atom
        for entry in _list_field(msg, "x", self.config.max_nodes_per_message):
            if not _int_list(entry, 2):
                raise MalformedDelta("anti-entropy empty-node entry must be [depth, prefix]")
            _check_node(entry[0], entry[1])
            push_all(entry[0], entry[1])

        session.rounds += 1
        if not (next_nodes or push or want) or session.rounds >= self.config.max_session_rounds:
            del self._sessions[sid]
            self.stats.sessions_completed += 1
            return []
        atoms = self._budgeted(list(push.values()))
        data = self._encode(
            {
                "t": "ae",
                "s": sid,
                "n": next_nodes[: self.config.max_nodes_per_message],
                "a": [encode_atom(a) for a in atoms],
                "w": want[: self.config.max_wants_per_message],
            }
        )
        self.stats.bytes_sent["ae"] += len(data)
        return [(src, data)]

    def _budgeted(self, atoms: list[Atom]) -> list[Atom]:
        out: list[Atom] = []
        size = 0
        for atom in atoms:
            size += _atom_size(atom)
            if out and (
                size > self.config.message_budget or len(out) >= self.limits.max_atoms_per_message
            ):
                break
            out.append(atom)
        return out

    # anti-entropy: responder ------------------------------------------------------------------
    def _answer_anti_entropy(self, src: PeerId, msg: dict, now: float) -> bytes:
        sid = msg.get("s")
        if type(sid) is not int:
            raise MalformedDelta("anti-entropy message without a session id")
        self._merge_from(src, _atoms_field(msg, self.limits), now, forward=None)
        store = self.store
        reply_atoms: dict[tuple, Atom] = {}
        for h in _list_field(msg, "w", self.config.max_wants_per_message):
            if type(h) is not int or not 0 <= h <= _U64:
                raise MalformedDelta("wanted slot hashes are 64-bit integers")
            for atom in store.atoms_with_hash(h):
                reply_atoms[atom.slot] = atom
        children, leaves, empty = [], [], []
        for entry in _list_field(msg, "n", self.config.max_nodes_per_message):
            if not _int_list(entry, 4):
                raise MalformedDelta("anti-entropy node must be [depth, prefix, fp, count]")
            depth, prefix, fp, count = entry
            _check_node(depth, prefix)
            my_fp, my_count = store.node(depth, prefix)
            if (my_fp, my_count) == (fp, count):
                continue
            if my_count == 0:
                empty.append([depth, prefix])
            elif count == 0:
                for _, atom in store.items_under(depth, prefix):
                    reply_atoms[atom.slot] = atom
            elif my_count <= self.config.leaf_max or depth == TRIE_DEPTH:
                leaves.append(
                    [
                        depth,
                        prefix,
                        [
                            [h, a.hlc.wall_ms, a.hlc.logical, store.fingerprint(a.slot)]
                            for h, a in store.items_under(depth, prefix)
                        ],
                    ]
                )
            else:
                children.append([depth, prefix, [list(c) for c in store.children(depth, prefix)]])
        atoms = self._budgeted(list(reply_atoms.values()))
        data = self._encode(
            {
                "t": "aer",
                "s": sid,
                "c": children,
                "l": leaves,
                "x": empty,
                "a": [encode_atom(a) for a in atoms],
            }
        )
        self.stats.bytes_sent["aer"] += len(data)
        return data

    # inbound ----------------------------------------------------------------------------------
    def handle_message(
        self, src: PeerId, data: bytes, now: float
    ) -> tuple[bytes | None, list[Outgoing]]:
        """Handle one message (or RPC reply) from the authenticated peer ``src``.

        Returns ``(reply, sends)``: ``reply`` goes back to ``src`` (the RPC response), ``sends``
        are new messages. Raises :class:`MalformedDelta` / :class:`DeltaTooLarge` /
        :class:`NotAMember` for a message that is refused as a whole; individual inadmissible
        atoms are dropped and counted in :attr:`stats` without touching state.
        """
        try:
            if not self.store.is_member(src):
                raise NotAMember(f"peer {src.short()} is not a member; state messages refused")
            msg = self._decode(data)
            kind = msg.get("t")
            if kind == "delta":
                self._merge_from(src, _atoms_field(msg, self.limits), now, forward=True)
                return None, []
            if kind == "ae":
                return self._answer_anti_entropy(src, msg, now), []
            if kind == "aer":
                return None, self._continue_session(src, msg, now)
            if kind == "ihave":
                return self._answer_ihave(msg, now), []
            if kind == "iwant":
                return None, self._answer_iwant(src, msg)
            raise MalformedDelta(f"unknown state message type {kind!r}")
        except (MalformedDelta, NotAMember) as exc:
            self.stats.messages_rejected[type(exc).__name__] += 1
            raise

    def _merge_from(
        self, src: PeerId, atoms: list[Atom], now: float, forward: bool | None
    ) -> MergeReport:
        report = self.store.merge(atoms, now)
        self.stats.atoms_applied += len(report.applied)
        self.stats.atoms_stale += report.stale
        for _, exc in report.rejected:
            self.stats.atoms_rejected[type(exc).__name__] += 1
        if report.applied and (forward or len(report.applied) <= self.config.forward_max):
            self._enqueue(report.applied, src, now)
        return report

    # codec ------------------------------------------------------------------------------------
    def _encode(self, msg: dict) -> bytes:
        msg["v"] = WIRE_VERSION
        return msgpack.packb(msg, use_bin_type=True)

    def _decode(self, data: bytes) -> dict:
        if len(data) > self.limits.max_message_bytes:
            raise DeltaTooLarge(
                f"state message is {len(data)} bytes (limit {self.limits.max_message_bytes})"
            )
        try:
            msg = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                max_array_len=self.limits.max_atoms_per_message * 16,
                max_map_len=32,
            )
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            raise MalformedDelta(f"state message is not valid msgpack: {exc}") from None
        if not isinstance(msg, dict):
            raise MalformedDelta("state message must be a map")
        if msg.get("v") != WIRE_VERSION:
            raise MalformedDelta(f"unsupported state wire version {msg.get('v')!r}")
        return msg


def _int_list(value: Any, length: int) -> bool:
    return isinstance(value, list) and len(value) == length and all(type(x) is int for x in value)


def _list_field(msg: dict, name: str, limit: int) -> list:
    value = msg.get(name, [])
    if not isinstance(value, list):
        raise MalformedDelta(f"field {name!r} must be an array")
    if len(value) > limit:
        raise DeltaTooLarge(f"field {name!r} has {len(value)} entries (limit {limit})")
    return value


def _atoms_field(msg: dict, limits: Limits) -> list[Atom]:
    return [
        decode_atom(item, limits) for item in _list_field(msg, "a", limits.max_atoms_per_message)
    ]


def _check_node(depth: int, prefix: int) -> None:
    if not 0 <= depth <= TRIE_DEPTH or not 0 <= prefix < 16**depth:
        raise MalformedDelta(f"no trie node at depth {depth}, prefix {prefix}")


def _node_children(entry: Any) -> tuple[int, int, list]:
    if not (
        isinstance(entry, list)
        and len(entry) == 3
        and type(entry[0]) is int
        and type(entry[1]) is int
        and isinstance(entry[2], list)
    ):
        raise MalformedDelta("anti-entropy entry must be [depth, prefix, [...]]")
    _check_node(entry[0], entry[1])
    return entry[0], entry[1], entry[2]
