"""Named actors across the mesh: claims at a name's arbiter, lookups, and the CRDT record.

Each (namespace, name) has an *arbiter*: the member whose id hashes closest with the name
(rendezvous hashing over this node and its live peers). A creation claims the name there first
(`/latticaray/names/1` `claim`), so two creations of one name cannot both win; lookups ask the
arbiter, then the signed CRDT `actors` collection (state/). A creation that waits for a host
(DHT capacity ads) claims the name *pending* (no host yet) and fills the host in once placed,
as Ray registers a named actor before scheduling it. Arbiter records also travel in views, so a
new arbiter (membership changed) learns the names.

The arbiter's records are `NameArbiterCore` (arbiter.py, sans-I/O); `NameService` makes the
calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING, Any

from latticaray.mesh.errors import MeshError
from latticaray.mesh.identity import PeerId
from latticaray.runtime.admission import ACTIVE
from latticaray.runtime.errors import ActorNameTakenError, GetTimeoutError
from latticaray.runtime.remote.arbiter import NameArbiterCore
from latticaray.runtime.remote.capacity import DEFERRED
from latticaray.runtime.remote.wire import (
    NAMES_PROTOCOL,
    ClaimRefused,
    NameClaim,
    NameHosted,
    NameHostedReply,
    NameLookup,
    NameLookupReply,
    NameMoved,
    NamePlaced,
    NameRecord,
    NameRelease,
    NamesOk,
    NamesReply,
    NamesRequest,
    decode_names_reply,
    decode_names_request,
)
from latticaray.runtime.serialization import error_blob
from latticaray.state.actors import ActorState

if TYPE_CHECKING:
    from latticaray.runtime.remote.runtime import RemoteRuntime

log = logging.getLogger(__name__)

NAME_POLL_S = 0.2  # a lookup of a named actor pending placement re-asks this often,
NAME_SETTLE_S = 5.0  # ... past its creator's wait by this much (for the news to arrive)


def found_record(record: NameRecord) -> dict:
    """A name's arbiter record as a lookup answers it (``owner``: the node counting the
    actor's handles, unless it is ``detached``)."""
    found = {
        "aid": record.aid,
        "node": record.node,
        "meta": record.meta,
        "pending": record.pending,
        "wait_s": record.wait_s,
    }
    if record.detached:
        found["detached"] = True
    else:
        found["owner"] = record.owner
    return found


class NameService:
    """Claims, lookups and releases of actor names for this node's actors."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote
        self.node_id = remote.node_id
        self.stats = remote.stats
        self.arbiter = NameArbiterCore(self.node_id, self._liveness, self._hosted_meta_here)
        # named creations waiting for placement under a pending claim: "ns/name" -> (aid, settle)
        self.pending: dict[str, tuple] = {}

    def _liveness(self, node_id: str) -> bool | None:
        peer = self.remote.membership.peers.get(node_id)
        return None if peer is None else peer.alive

    def _hosted_meta_here(self, namespace: str, name: str, aid: bytes) -> dict[str, Any] | None:
        return self.remote.node.actors.hosted_meta(namespace, name, aid)

    def shared_records(self) -> list[tuple[str, str, NameRecord]]:
        return self.arbiter.shared()

    def merge_records(self, records: list[tuple[str, str, NameRecord]]) -> None:
        self.arbiter.merge(records)

    def arbiter_of(self, namespace: str, name: str) -> str:
        candidates = [self.node_id] + self.remote.membership.alive_peers()
        return min(
            candidates, key=lambda n: hashlib.sha256(f"{namespace}/{name}/{n}".encode()).digest()
        )

    def _placement_wait(self) -> float:
        capacity = self.remote.capacity
        return capacity.core.wait_timeout if capacity is not None else 0.0

    # ------------------------------------------------------------------ calls to an arbiter
    async def call(self, arbiter: str, request: NamesRequest) -> NamesReply:
        """Ask a name's arbiter (this node answers itself when it is the arbiter, or when the
        arbiter cannot be reached)."""
        if arbiter == self.node_id:
            return self.arbiter.handle(request, self.node_id)
        try:
            reply = await self.remote.mesh.call(
                self.remote.membership.peers[arbiter].peer_id,
                NAMES_PROTOCOL,
                request.encode(),
                timeout=10.0,
            )
        except (MeshError, KeyError):
            return self.arbiter.handle(request, self.node_id)
        return decode_names_reply(reply)

    async def serve(self, ctx: Any, payload: bytes) -> bytes:
        caller = self.remote.membership.require_member(ctx, ACTIVE)
        return self.arbiter.handle(decode_names_request(payload), caller).encode()

    # ------------------------------------------------------------------ claims
    async def claim_named_actor(self, namespace: str, name: str, message: dict) -> dict | None:
        """Place a named actor's creation and claim its name: None when the creation may go
        ahead (``message["host"]`` then names its host), else the reply to give the creator.

        A creation some admitted node can take at once claims the name with that host. One that
        must wait for DHT capacity ads claims the name *pending* first (no host yet), as Ray
        registers a named actor before scheduling it, so a second creation of the name fails at
        once; the wait then fills in the host, or at its deadline raises the
        TaskUnschedulableError and gives the name back. Nothing is created while it waits."""
        remote = self.remote
        done = asyncio.get_running_loop().create_future()
        request_id = message["aid"].hex()

        def settle(target: Any) -> None:
            if done.done():
                return
            if isinstance(target, BaseException):
                done.set_exception(target)
            else:
                done.set_result(target)

        def park(message: dict, reason: str) -> Any:
            assert remote.capacity is not None
            return remote.capacity.defer(
                request_id,
                message["opts"].get("resources") or {},
                reason,
                retry=attempt,
                fail=settle,
                settled=done.done,
            )

        def attempt() -> None:
            target = remote.actors.place(message, defer=True, wait=park)
            if target is not DEFERRED:
                settle(target)

        attempt()
        if done.done():
            message["host"] = done.result() or self.node_id
            return await self.claim(namespace, name, message)
        key = f"{namespace}/{name}"
        arbiter = self.arbiter_of(namespace, name)  # the peers met meanwhile must not move it
        message["host"] = None
        self.pending.setdefault(key, (message["aid"], settle))
        try:
            reply = await self.claim(namespace, name, message, arbiter)
            if reply is not None:
                return reply
            try:
                host = await done or self.node_id
            except ActorNameTakenError as exc:  # a merge showed an earlier claim on the name
                self.release(namespace, name, message["aid"], arbiter)
                return {"error": error_blob(exc)}
            except BaseException:
                self.release(namespace, name, message["aid"], arbiter)
                raise
            message["host"] = host
            self.hosted_at(namespace, name, message["aid"], host, arbiter=arbiter)
            return None
        finally:
            if self.pending.get(key, (None,))[0] == message["aid"]:
                del self.pending[key]
            if not done.done():
                done.cancel()
                assert remote.capacity is not None
                remote.capacity.withdraw(request_id)
            elif not done.cancelled():
                done.exception()  # retrieved: a failure after the claim was refused is not raised

    async def claim(
        self, namespace: str, name: str, message: dict, arbiter: str | None = None
    ) -> dict | None:
        """None when this creation may go ahead, else the reply to give the creator. Without
        ``message["host"]`` the claim is pending: the creation still waits for a host."""
        host = message.get("host")
        opts = message["opts"]
        request = NameClaim(
            namespace,
            name,
            message["aid"],
            self.node_id,
            host,
            opts.get("meta"),
            bool(opts.get("get_if_exists")),
            opts.get("lifetime") == "detached",
            pending=host is None,
            wait_s=self._placement_wait() if host is None else None,
        )
        reply = await self.call(arbiter or self.arbiter_of(namespace, name), request)
        found: dict | None
        if isinstance(reply, NamesOk):
            found = self.claim_in_crdt(namespace, name, message)
        elif isinstance(reply, ClaimRefused) and request.get_if_exists:
            found = found_record(reply.existing)
            found["existing"] = True
        else:
            holder = reply.holder if isinstance(reply, ClaimRefused) else "?"
            return {
                "error": error_blob(
                    ActorNameTakenError(
                        f"an actor named {name!r} already exists in namespace {namespace!r} "
                        f"(claimed by node {holder})"
                    )
                )
            }
        found = await self._when_placed(namespace, name, found)
        if found is not None and "error" not in found:
            found["existing"] = True
        return found

    def claim_in_crdt(self, namespace: str, name: str, message: dict) -> dict | None:
        """Register the name in the CRDT `actors` collection (pending while it has no host);
        None if this node holds it."""
        state = self.remote.state
        if state is None:
            return None
        host = message.get("host")
        try:
            result = state.actors.claim(
                f"{namespace}/{name}",
                message["aid"].hex(),
                host=PeerId.from_string(host or self.node_id),
                state=ActorState.PENDING if host is None else ActorState.ALIVE,
            )
        except Exception as exc:  # the CRDT refused the write: the arbiter's answer stands
            log.debug("named actor %s/%s not written to the CRDT: %s", namespace, name, exc)
            return None
        if result.won:
            return None
        self.remote.spawn(
            self.call(
                self.arbiter_of(namespace, name), NameRelease(namespace, name, message["aid"])
            )
        )
        if message["opts"].get("get_if_exists"):
            pending = result.record.state is ActorState.PENDING
            return {
                "aid": bytes.fromhex(result.record.actor_id),
                "node": None if pending else str(result.record.host),
                "meta": None,
                "existing": True,
                "pending": pending,
            }
        return {
            "error": error_blob(
                ActorNameTakenError(
                    f"an actor named {name!r} already exists in namespace {namespace!r} "
                    f"(claimed by node {result.record.owner} in the cluster state)"
                )
            )
        }

    def hosted_at(
        self,
        namespace: str,
        name: str,
        aid: bytes,
        host: str,
        op: str = "placed",
        arbiter: str | None = None,
    ) -> None:
        """The named actor's host is known now: a pending claim's creation found it
        (``placed``), or the owner restarted the actor there after its host died (``moved``).
        Its name's records here, in the CRDT and at the arbiter name it from now on."""
        if op == "moved":
            self.arbiter.moved(namespace, name, aid, host)
        state = self.remote.state
        if state is not None:
            try:
                state.actors.update(
                    f"{namespace}/{name}", ActorState.ALIVE, host=PeerId.from_string(host)
                )
            except Exception as exc:  # no claim of ours there (the CRDT refused it)
                log.debug(
                    "named actor %s/%s: host not written to the CRDT: %s", namespace, name, exc
                )
        update = NameMoved if op == "moved" else NamePlaced
        self.remote.spawn(
            self.call(
                arbiter or self.arbiter_of(namespace, name),
                update(namespace, name, aid, host),
            )
        )

    def release(self, namespace: str, name: str, aid: bytes, arbiter: str | None = None) -> None:
        """Give the name back (the actor died, or its creation failed)."""
        self.arbiter.forget(namespace, name, aid)  # a copy here would travel in views
        state = self.remote.state
        if state is not None:
            try:
                state.actors.release(f"{namespace}/{name}")
            except Exception:
                pass  # this node holds no claim on it (another node created the actor)
        self.remote.spawn(
            self.call(
                arbiter or self.arbiter_of(namespace, name), NameRelease(namespace, name, aid)
            )
        )

    def on_claim_lost(self, key: str, ours: Any, winner: Any) -> None:
        """A CRDT merge shows another node's claim on a name wins: our actor gives it up (a
        creation still waiting for placement fails with ActorNameTakenError)."""
        aid = bytes.fromhex(ours.actor_id)
        self.stats["names_lost"] += 1
        pending = self.pending.get(key)
        if pending is not None and pending[0] == aid:
            log.info("pending actor name %s lost to node %s", key, winner.owner)
            pending[1](
                ActorNameTakenError(
                    f"the actor name {key!r} (namespace/name) was claimed earlier by node "
                    f"{winner.owner}"
                )
            )
            return
        log.warning(
            "actor name %s lost to node %s; stopping actor %s", key, winner.owner, ours.actor_id
        )
        self.remote.node.actors.kill(
            {"aid": aid, "no_restart": True, "anode": str(ours.host)}, None
        )

    # ------------------------------------------------------------------ lookups
    async def lookup(self, namespace: str, name: str) -> dict | None:
        """The named actor's ``{aid, node, meta}``, waiting while it is pending placement (an
        ``{"error": ...}`` reply when that wait ends without a host); None if no claim."""
        return await self._when_placed(namespace, name, await self._lookup(namespace, name))

    async def _lookup(self, namespace: str, name: str) -> dict | None:
        """The claim on a name, from its arbiter, else the CRDT: ``{aid, node, meta, pending,
        wait_s}`` (``node`` None while pending) or None."""
        reply = await self.call(self.arbiter_of(namespace, name), NameLookup(namespace, name))
        record = reply.existing if isinstance(reply, NameLookupReply) else None
        state = self.remote.state
        claim = state.actors.get(f"{namespace}/{name}") if state is not None else None
        if record:
            found = found_record(record)
            if (
                found["pending"]
                and claim is not None
                and claim.actor_id == found["aid"].hex()
                and claim.state is ActorState.ALIVE
            ):  # placed; the arbiter has not heard yet
                found.update(node=str(claim.host), pending=False)
            return found
        if claim is None or claim.state is ActorState.DEAD:
            return None
        pending = claim.state is ActorState.PENDING
        found = {
            "aid": bytes.fromhex(claim.actor_id),
            "node": None if pending else str(claim.host),
            "meta": None,
            "pending": pending,
            "wait_s": None,
        }
        if not pending:  # the CRDT claim carries no method table: its host has it
            found["meta"] = await self._hosted_actor_meta(
                found["node"], namespace, name, found["aid"]
            )
        return found

    async def _hosted_actor_meta(self, host: str, namespace: str, name: str, aid: bytes) -> Any:
        """The method table of a named actor, asked of the node hosting it (None if unknown)."""
        if host != self.node_id and not self.remote.membership.is_alive(host):
            return None
        # a host that does not answer leaves it unknown (the call falls back to this node,
        # which does not host the actor)
        reply = await self.call(host, NameHosted(namespace, name, aid))
        meta = reply.meta if isinstance(reply, NameHostedReply) else None
        return meta if isinstance(meta, dict) and isinstance(meta.get("methods"), dict) else None

    async def _when_placed(self, namespace: str, name: str, found: dict | None) -> dict | None:
        """A found claim ``{aid, node, meta, pending, wait_s}`` as ``{aid, node, meta}`` once
        placed (waiting while it is pending), or the error that wait ended with."""
        if found is not None and found.pop("pending", False):
            return await self._wait_placed(namespace, name, found)
        if found is not None:
            found.pop("wait_s", None)
        return found

    async def _wait_placed(self, namespace: str, name: str, found: dict) -> dict:
        """A pending named actor as its lookup answers it: once its creator has placed it, or an
        error when its creation gave the name back or it is still pending after the creator's
        placement wait (``wait_s``, else this node's) and NAME_SETTLE_S more."""
        loop = asyncio.get_running_loop()
        bound = (found.get("wait_s") or self._placement_wait()) + NAME_SETTLE_S
        deadline = loop.time() + bound
        while loop.time() < deadline:
            await asyncio.sleep(min(NAME_POLL_S, max(0.0, deadline - loop.time())))
            now = await self._lookup(namespace, name)
            if now is None:
                return {
                    "error": error_blob(
                        ValueError(
                            f"no actor named {name!r} in namespace {namespace!r}: the one being "
                            f"created under that name found no node to host it and gave the "
                            f"name back"
                        )
                    )
                }
            if not now.pop("pending"):
                now.pop("wait_s", None)
                return now
        return {
            "error": error_blob(
                GetTimeoutError(
                    f"the actor named {name!r} in namespace {namespace!r} is still waiting for a "
                    f"node to host it (DHT capacity) after {bound:.1f} s"
                )
            )
        }
