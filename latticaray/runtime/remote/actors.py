"""Actors this node owns on other nodes: placement, creation, calls in order, restarts, kill.

The node that creates an actor owns it. When placement puts it on a peer, this module keeps it
(`OwnedActor`: its host and the restarts it used), sends its creation and its calls over the
task session to the host (`create`, `acall`), in the order they were made, and restarts it on
another node when its host dies, while `max_restarts` allows; calls in flight on a dead host
are retried while theirs allow. An actor no admitted node can host waits for DHT capacity ads
(capacity.py), its calls queued here meanwhile. Calls go once the host answered the creation; a
host with no room for it then (placed on an out-of-date view) has it placed again elsewhere.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from latticaray.runtime import serialization
from latticaray.runtime.errors import ActorDiedError, TaskCancelledError, TaskUnschedulableError
from latticaray.runtime.local.records import TaskRecord
from latticaray.runtime.local.resources import WAIT
from latticaray.runtime.remote.capacity import DEFERRED
from latticaray.runtime.remote.wire import CallActor, CreateActor, KillActor
from latticaray.runtime.states import TaskEvent

if TYPE_CHECKING:
    from latticaray.runtime.remote.membership import Peer
    from latticaray.runtime.remote.runtime import RemoteRuntime

#: hosts that may refuse one actor for lack of room before its creation fails
MAX_REFUSALS = 8


class OwnedActor:
    """An actor this node created (owns): where it lives and how many restarts it used."""

    def __init__(self, aid: bytes, message: dict, host: str):
        self.aid = aid
        self.message = message
        self.host = host
        self.restarts = 0
        self.max_restarts = int(message["opts"].get("max_restarts", 0))
        self.dead_cause: str | None = None
        # a create sent to `host` and not answered yet: its calls wait (a host with no room
        # refuses it, and it is created elsewhere)
        self.creating = False
        self.refused: set[str] = set()  # hosts that had no room for it when asked


class OwnedActors:
    """Owned actors hosted elsewhere (or waiting for a host), and their queued calls."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote
        self.node = remote.node
        self.node_id = remote.node_id
        self.stats = remote.stats
        self.owned: dict[bytes, OwnedActor] = {}
        self.outbox: dict[bytes, collections.deque[TaskRecord]] = {}
        self.location: dict[bytes, str] = {}  # actor id -> its host (owned or not)

    # ------------------------------------------------------------------ placement and creation
    def place(self, message: dict, defer: bool = False, wait: Any = None) -> Any:
        """Where to create an actor: a peer's id or None (here; with a strategy, or when this
        node could host it, actors stay here). With ``defer``, an actor no admitted node can
        host waits for DHT capacity ads (DEFERRED); its calls wait with it, or ``wait(message,
        reason)`` parks it instead."""
        remote = self.remote
        placer = remote.placer
        pg = message["opts"].get("pg")
        if pg:  # its placement group's bundle decides (hosting reports a bad one)
            target = self.node.resources.target(pg, lambda: self._place_deferred(message))
            if target is WAIT:
                self._owned_waiting(message)
                return DEFERRED
            if isinstance(target, BaseException) or target == self.node_id:
                return None
            return target
        strategy = message["opts"].get("strategy")
        demand = message["opts"].get("resources") or {}
        try:
            fits_here = self.node.ledger.could_ever_fit(demand)
        except ValueError:
            return None  # hosting it here reports the malformed request
        can_defer = defer and remote.capacity is not None
        aid = message["aid"]
        alive_peers = remote.membership.alive_peers()
        if (
            strategy is None
            and remote.embedded
            and message["opts"].get("lifetime") == "detached"
            and alive_peers
        ):
            target = placer.place(aid.hex(), demand, None, {self.node_id})
            if isinstance(target, str):
                return target  # else no other node can host it now: placed as any actor
        if strategy is None and fits_here:
            return None
        if not alive_peers and (fits_here or not can_defer):
            return None
        target = placer.place(aid.hex(), demand, strategy)
        hard_affinity = isinstance(strategy, dict) and not strategy.get("soft")
        if isinstance(target, TaskUnschedulableError) and can_defer and not hard_affinity:
            return (wait or self._defer)(message, target.reason)
        if isinstance(target, BaseException):
            return None
        return target

    def _owned_waiting(self, message: dict) -> OwnedActor:
        """An actor that waits for a host: its calls wait in the outbox meanwhile."""
        aid = message["aid"]
        owned = self.owned.get(aid)
        if owned is None:
            owned = self.owned[aid] = OwnedActor(aid, message, self.node_id)
            self.location[aid] = self.node_id
        return owned

    def _defer(self, message: dict, reason: str) -> Any:
        aid = message["aid"]
        owned = self._owned_waiting(message)

        def fail(exc: BaseException) -> None:
            owned.dead_cause = str(exc)
            self.fail_calls(aid, owned.dead_cause)

        assert self.remote.capacity is not None
        return self.remote.capacity.defer(
            aid.hex(),
            message["opts"].get("resources") or {},
            reason,
            retry=lambda: self._place_deferred(message),
            fail=fail,
            settled=lambda: owned.dead_cause is not None,
        )

    def _place_deferred(self, message: dict) -> None:
        target = self.place(message, defer=True)
        if target is DEFERRED:
            return
        aid = message["aid"]
        if target is None or target == self.node_id:
            self.owned.pop(aid, None)
            self.location.pop(aid, None)
            self.node.actors.host(message)
        else:
            self.create_remote(message, target)
        self.pump(aid)

    def create_remote(self, message: dict, target: str) -> dict:
        aid = message["aid"]
        owned = self.owned.get(aid)
        if owned is None or owned.dead_cause is not None:
            owned = self.owned[aid] = OwnedActor(aid, message, target)
        owned.host = target
        self.location[aid] = target
        self._send_create(owned, target)
        return {"aid": aid, "node": target}

    def _send_create(self, owned: OwnedActor, target: str) -> None:
        owned.creating = True
        message = owned.message
        caller = self.remote.caller
        link = caller.link_to(target)
        assert link is not None
        blob = None
        if message["cls"] not in link.shipped:
            blob = self.node.code[message["cls"]]
            link.shipped.add(message["cls"])
        opts = dict(
            message["opts"],
            strategy=None,
            max_restarts=max(0, owned.max_restarts - owned.restarts)
            if owned.max_restarts >= 0
            else -1,
        )
        create = CreateActor(
            message["aid"],
            message["cls"],
            message.get("cname", "actor"),
            opts,
            self.remote.objects.wire_args(message["args"]),  # named by CID as it goes out
            message["owner"],
            blob,
        )
        caller.send(target, create)

    def resend_create(self, aid: bytes, peer: Peer) -> None:
        """A creation whose answer was lost with a broken task session: sent again (the host
        answers one it already hosts without hosting it twice)."""
        owned = self.owned.get(aid)
        if owned is not None and owned.dead_cause is None and owned.host == peer.node_id:
            self._send_create(owned, peer.node_id)

    def created(self, aid: bytes, error: bytes | None) -> None:
        """The host's answer to a `create`: its calls go; a host with no room for the actor
        (it was placed on a view that was out of date, or another owner's actor got there
        first) has it created elsewhere; any other error kills it and fails its calls."""
        owned = self.owned.get(aid)
        if owned is None or not owned.creating:
            return
        owned.creating = False
        if error is not None:
            exc = serialization.deserialize(error)
            if isinstance(exc, TaskUnschedulableError) and self._place_elsewhere(owned, exc):
                return
            owned.dead_cause = str(exc)
            self.fail_calls(owned.aid, owned.dead_cause)
            return
        self.pump(aid)

    def _place_elsewhere(self, owned: OwnedActor, refusal: TaskUnschedulableError) -> bool:
        """Create a refused actor on another node that fits, or let it wait for one as an
        actor that no node can host now does (capacity.py); False: the refusal stands (a hard
        node affinity, a node refused too often, nowhere to wait)."""
        message = owned.message
        strategy = message["opts"].get("strategy")
        owned.refused.add(owned.host)
        if isinstance(strategy, dict) and not strategy.get("soft"):
            return False
        if len(owned.refused) > MAX_REFUSALS or owned.dead_cause is not None:
            return False
        demand = message["opts"].get("resources") or {}
        target = self.remote.placer.place(owned.aid.hex(), demand, strategy, owned.refused)
        if isinstance(target, str) and target != self.node_id:
            self.stats["actor_creations_refused"] += 1
            owned.host = target
            self.location[owned.aid] = target
            self._send_create(owned, target)
            return True
        if self.remote.capacity is None:
            return False
        self.stats["actor_creations_refused"] += 1
        owned.host = self.node_id  # calls wait in the outbox meanwhile
        self.location[owned.aid] = self.node_id
        return self._defer(message, refusal.reason) is DEFERRED

    # ------------------------------------------------------------------ restarts
    def peer_gone(self, node_id: str) -> None:
        """Owned actors hosted on a node that died restart elsewhere (or die)."""
        for owned in list(self.owned.values()):
            if owned.host == node_id and owned.dead_cause is None:
                self._restart(owned, node_id)

    def _restart(self, owned: OwnedActor, dead_node: str) -> None:
        if owned.max_restarts >= 0 and owned.restarts >= owned.max_restarts:
            owned.dead_cause = (
                f"its node {dead_node} died and no restarts are left "
                f"(max_restarts={owned.max_restarts})"
            )
            self.node.refs.task_done(owned.aid)
            self.fail_calls(owned.aid, owned.dead_cause)
            return
        owned.restarts += 1
        self.stats["actor_restarts"] += 1
        demand = owned.message["opts"].get("resources") or {}
        target = self.remote.placer.place(owned.aid.hex(), demand, None, {dead_node})
        if not isinstance(target, str):
            target = self.node_id
        owned.host = target
        self.location[owned.aid] = target
        owned.creating = False  # a create to the dead node is not answered
        if target == self.node_id:
            message = dict(owned.message)
            message["opts"] = dict(message["opts"], max_restarts=0)
            self.node.actors.host(message)
        else:
            self._send_create(owned, target)
        opts = owned.message["opts"]
        if opts.get("name"):
            self.remote.names.hosted_at(
                opts.get("namespace") or "default", opts["name"], owned.aid, target, "moved"
            )
        self.pump(owned.aid)

    def fail_calls(self, aid: bytes, cause: str) -> None:
        """The actor is dead: its queued calls and those in flight fail."""
        tasks = self.node.tasks
        for rec in self.outbox.pop(aid, collections.deque()):
            tasks.fail(rec, ActorDiedError(f"actor {aid.hex()} is dead: {cause}"))
        for peer in self.remote.membership.peers.values():
            link = peer.link
            if link is None:
                continue
            for tid, rec in list(link.inflight.items()):
                if rec.msg.get("aid") == aid:
                    link.inflight.pop(tid, None)
                    tasks.fail(rec, ActorDiedError(f"actor {aid.hex()} is dead: {cause}"))

    def calls_lost(self, recs: list[TaskRecord], node_id: str) -> None:
        """Calls in flight to ``node_id``, which died: each is queued again, in order, ahead of
        its actor's other calls (for the restarted actor) if the actor lives on and the call
        has retries left, else it fails."""
        tasks = self.node.tasks
        again: dict[bytes, list[TaskRecord]] = {}
        for rec in recs:
            aid = rec.msg["aid"]
            owned = self.owned.get(aid)
            if rec.cancelled:
                tasks.fail(rec, TaskCancelledError(f"task {rec.name} was cancelled"))
            elif (
                owned is not None
                and owned.dead_cause is None
                and rec.retries_left != 0
                and not self.node.streams.started(rec)
            ):
                rec.retries_left -= 1
                rec.move(TaskEvent.QUEUE)
                again.setdefault(aid, []).append(rec)
            else:
                tasks.fail(
                    rec,
                    ActorDiedError(
                        f"actor {aid.hex()} was on node {node_id}, which died while running "
                        f"{rec.name}"
                    ),
                )
        for aid, calls in again.items():
            self.outbox.setdefault(aid, collections.deque()).extendleft(reversed(calls))

    def resend(self, rec: TaskRecord, peer: Peer) -> None:
        """A call in flight on a task session that broke or moved while its host lives: sent
        again on the new session (`again`: the host runs it once, see dedup.py). It spends no
        retry: the call was not lost, only its reply may have been."""
        if not self._send_call(rec, peer, again=True):
            self.calls_lost([rec], peer.node_id)

    # ------------------------------------------------------------------ calls
    def enqueue(self, rec: TaskRecord) -> None:
        """A call to an actor not hosted here: it waits until its arguments are ready."""
        self.outbox.setdefault(rec.msg["aid"], collections.deque()).append(rec)

    def pump(self, aid: bytes) -> None:
        """Send the actor's queued calls whose arguments are ready to its host, in order."""
        outbox = self.outbox.get(aid)
        owned = self.owned.get(aid)
        if owned is not None and owned.dead_cause is not None:
            self.fail_calls(aid, owned.dead_cause)
            return
        if owned is not None and owned.creating:
            return  # sent once the host has it (created)
        node = self.node
        membership = self.remote.membership
        while outbox and outbox[0].deps_left == 0:
            rec = outbox[0]
            if rec.done:
                outbox.popleft()
                continue
            host = self.location.get(aid) or rec.msg.get("anode")
            if host == self.node_id:
                local = node.actors.hosted.get(aid)
                if local is None:
                    return
                outbox.popleft()
                rec.actor = local
                local.outbox.append(rec)
                node.actors.pump(local)
                continue
            peer = membership.alive_peer(host)
            if peer is None:
                if owned is None:
                    outbox.popleft()
                    node.tasks.fail(
                        rec,
                        ActorDiedError(
                            f"actor {aid.hex()} lives on node {host}, which is not reachable"
                        ),
                    )
                    continue
                return  # the owner restarts it; calls wait here
            outbox.popleft()
            self._send_call(rec, peer, again=False)

    def _send_call(self, rec: TaskRecord, peer: Peer, again: bool) -> bool:
        """Send an actor call to the peer hosting its actor (False: the peer is gone)."""
        caller = self.remote.caller
        msg = rec.msg
        call = CallActor(
            rec.tid,
            msg["aid"],
            msg["m"],
            rec.nret,
            rec.name,
            self.remote.objects.wire_args(msg["args"]),
            again,
        )
        rec.move(TaskEvent.RESEND if again else TaskEvent.SEND)
        rec.remote_peer = peer.node_id
        caller.link(peer).inflight[rec.tid] = rec
        if caller.send(peer.node_id, call):
            return True
        caller.link(peer).inflight.pop(rec.tid, None)
        rec.remote_peer = None
        return False

    def kill(self, message: dict, cause: str | None = None) -> None:
        """Kill an actor hosted elsewhere (its host is told; one still waiting dies here);
        ``cause``: why, when not a kill() (an owned actor reclaimed: no handle is left)."""
        aid = message["aid"]
        no_restart = message.get("no_restart", True)
        if no_restart:
            self.node.refs.task_done(aid)  # its creation arguments are not needed again
        owned = self.owned.get(aid)
        host = self.location.get(aid) or message.get("anode")
        if owned is not None and no_restart:
            if owned.dead_cause is not None:
                return  # dead already
            owned.dead_cause = cause or "it was killed with kill()"
            opts = owned.message["opts"]
            if opts.get("name"):  # this node's claim on its name goes (the host's too)
                self.remote.names.release(opts.get("namespace") or "default", opts["name"], aid)
            if host == self.node_id:  # never created: it was waiting for DHT capacity ads
                self.fail_calls(aid, owned.dead_cause)
                return
        self.remote.caller.send(host, KillActor(aid, bool(no_restart), cause))
