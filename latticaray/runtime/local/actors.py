"""Actors hosted on this node: creation, their worker process, calls in order, restarts, kill.

An actor created here is *owned* here (its creator's node); it is hosted here too unless the
remote side places it on a peer (remote/actors.py keeps the actors this node owns elsewhere).
A hosted actor's constructor runs once its ref arguments are values; its calls queue in its
outbox until their own arguments are, and go to its worker in order. When the worker dies the
actor restarts while `max_restarts` allows, and calls in flight are retried while theirs do.

A non-detached actor is counted like an object by the owner's RefTable (refcount.py): its
handles and the calls made through them hold it, and when nothing does any more it is
*reclaimed* (`reclaim`): killed for good, here or on its host. Detached actors live until killed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from latticaray.runtime import serialization
from latticaray.runtime.errors import (
    ActorDiedError,
    ActorNameTakenError,
    TaskCancelledError,
    TaskUnschedulableError,
)
from latticaray.runtime.local.clients import AttachedDriver, WorkerHandle
from latticaray.runtime.local.records import HostedActor, TaskRecord
from latticaray.runtime.local.resources import PlacementGroupError
from latticaray.runtime.remote.capacity import DEFERRED
from latticaray.runtime.serialization import error_blob
from latticaray.runtime.states import ActorEvent, ActorState, TaskEvent
from latticaray.scheduler.errors import InsufficientResources

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode


#: the death cause of an actor reclaimed when its last handle went
RECLAIMED = "every handle to it went out of scope (it is not detached)"


def queued(rec: TaskRecord, pump: Callable[[], Any]) -> None:
    """An actor call's arguments are ready: it waits in its actor's outbox, in order."""
    rec.move(TaskEvent.QUEUE)
    pump()


class ActorHost:
    """The actors this node hosts (by actor id) and the names of its named ones."""

    def __init__(self, node: RuntimeNode):
        self.node = node
        self.hosted: dict[bytes, HostedActor] = {}
        self.named: dict[tuple[str, str], bytes] = {}

    def alive_count(self) -> int:
        return sum(1 for a in self.hosted.values() if not a.dead)

    def workers(self) -> list[WorkerHandle]:
        return [a.worker for a in self.hosted.values() if a.worker is not None]

    # ------------------------------------------------------------------ creation
    def create_post(self, message: dict, client: Any) -> None:
        """`create_actor` posted (an unnamed actor: nobody waits for the reply)."""
        self.create(message, client)

    async def create_request(self, message: dict, client: Any) -> dict:
        """`create_actor` as a request (a named actor: its name is claimed across the mesh)."""
        opts = message["opts"]
        name = opts.get("name")
        remote = self.node.remote
        if name and remote is not None:
            namespace = opts.get("namespace") or "default"
            try:  # sets message["host"]
                reply = await remote.names.claim_named_actor(namespace, name, message)
            except TaskUnschedulableError as exc:
                return {"error": error_blob(exc)}
            if reply is not None:
                return reply
            reply = self.create(message, client)
            # the claim went through: a creation that failed here gives the name back (unless
            # the name's holder is another actor of this node)
            if "error" in reply and self.named.get((namespace, name)) is None:
                remote.names.release(namespace, name, message["aid"])
            return self.creator_told(reply, message, client)
        return self.creator_told(self.create(message, client), message, client)

    def creator_told(self, reply: dict, message: dict, client: Any) -> dict:
        """The reply to a creator that asked (a named actor): a creation that failed leaves it
        no handle, so the hold its handle would have had is given back."""
        if "error" in reply and message["aid"] in self.node.refs.actors:
            self.node.refs.release([message["aid"]], client)
        return reply

    def create(self, message: dict, client: Any) -> dict:
        node = self.node
        aid = message["aid"]
        opts = message["opts"]
        if "blob" in message:
            node.code[message["cls"]] = message.pop("blob")
        name = opts.get("name")
        namespace = opts.get("namespace") or "default"
        if name:
            existing = self.named.get((namespace, name))
            if existing is not None and existing in self.hosted and not self.hosted[existing].dead:
                if opts.get("get_if_exists"):
                    record = self.hosted[existing]
                    return {
                        "aid": existing,
                        "node": node.node_id,
                        "existing": True,
                        "meta": record.opts.get("meta"),
                        **self.ownership(record),
                    }
                return {
                    "error": error_blob(
                        ActorNameTakenError(
                            f"an actor named {name!r} already exists in namespace {namespace!r}"
                        )
                    )
                }
        self.adopt(message, client)
        remote = node.remote
        if remote is not None:
            target = message.pop("host", None) or remote.actors.place(message, defer=True)
            if target is DEFERRED:
                return {"aid": aid, "node": node.node_id}
            if target is not None and target != node.node_id:
                return remote.actors.create_remote(message, target)
        return self.host(message)

    def adopt(self, message: dict, client: Any) -> None:
        """This node owns the actor it creates: it keeps the refs in its creation arguments and,
        unless the actor is detached, counts its handles (the creator's first: reclaimed when
        none is left) and ends it when the attached driver that made it goes."""
        message.setdefault("owner", self.node.node_id)
        if "inner" in message:
            self.node.refs.pin_task(message["aid"], message.pop("inner"))
        if message["opts"].get("lifetime") != "detached":
            self.node.refs.create_actor(message["aid"], client)
            if isinstance(client, AttachedDriver):
                client.owned_actors.append(message["aid"])

    def host(self, message: dict) -> dict:
        """Host the actor here: its resources are taken and its worker starts."""
        node = self.node
        aid = message["aid"]
        opts = message["opts"]
        actor = HostedActor(aid, message, opts)
        if not node.ledger.could_ever_fit(actor.demand):
            actor.die()
            actor.death_cause = (
                f"the actor needs {actor.demand}, more than this node's {node.total_resources}"
            )
            self.hosted[aid] = actor
            return {"error": error_blob(TaskUnschedulableError(aid.hex(), actor.death_cause))}
        try:
            if actor.demand or opts.get("pg"):
                node.resources.acquire("actor-" + aid.hex(), actor.demand, opts)
        except (InsufficientResources, PlacementGroupError) as exc:
            actor.die()
            actor.death_cause = f"not enough resources on this node for the actor: {exc}"
            self.hosted[aid] = actor
            return {"error": error_blob(TaskUnschedulableError(aid.hex(), actor.death_cause))}
        self.hosted[aid] = actor
        if actor.name:
            self.named[(actor.namespace, actor.name)] = aid
        self.start_worker(actor)
        return {"aid": aid, "node": node.node_id}

    def start_worker(self, actor: HostedActor) -> None:
        """Start the actor's worker once its constructor's top-level ref arguments are values
        (calls queue in its outbox meanwhile); an argument that failed kills the actor."""

        def start() -> None:
            if actor.dead:
                return
            renv = actor.opts.get("renv")
            if self.node.envs.ready(renv, start, lambda exc: self.env_failed(actor, exc)):
                self.spawn_worker(actor)

        self.node.tasks.resolve_ref_args(
            actor, start, lambda blob: self.constructor_argument_failed(actor, blob)
        )

    def env_failed(self, actor: HostedActor, exc: BaseException) -> None:
        """The actor's runtime_env could not be set up here: it dies, its calls fail."""
        actor.die()
        actor.no_restart = True
        actor.death_cause = f"its runtime_env could not be set up: {exc}"
        self.release_args(actor)
        self.release_resources(actor)
        while actor.outbox:
            self.node.tasks.fail(actor.outbox.popleft(), ActorDiedError(self.death_message(actor)))

    def constructor_argument_failed(self, actor: HostedActor, blob: bytes) -> None:
        actor.die()
        actor.no_restart = True
        actor.death_cause = (
            f"an argument of the actor's constructor failed:\n{serialization.deserialize(blob)}"
        )
        self.release_args(actor)
        while actor.outbox:
            self.node.tasks.fail(actor.outbox.popleft(), ActorDiedError(self.death_message(actor)))

    def spawn_worker(self, actor: HostedActor) -> None:
        node = self.node
        worker = node.workers.spawn(is_actor=True)
        worker.actor = actor
        actor.worker = worker
        actor.move(ActorEvent.STARTED)
        msg = actor.msg
        opts = actor.opts
        create = {
            "op": "actor_create",
            "aid": actor.aid,
            "cls": msg["cls"],
            "blob": node.code[msg["cls"]],
            "args": msg["args"],
            "mc": opts.get("max_concurrency") or (1000 if opts.get("is_async") else 1),
            "async": bool(opts.get("is_async")),
            "name": msg.get("cname", "actor"),
        }
        gpus = node.resources.gpu_ids("actor-" + actor.aid.hex())
        if gpus is not None:
            create["gpus"] = gpus
        if opts.get("pg"):
            create["pg"] = opts["pg"]
        if opts.get("renv"):
            create["renv"] = node.envs.frame(opts["renv"])
        worker.send(create)
        worker.loaded.add(msg["cls"])
        self.pump(actor)

    def on_ready(self, worker: WorkerHandle, message: dict) -> None:
        """The worker's `actor_ready`: the constructor ran (or raised: the actor is dead)."""
        actor = worker.actor
        if actor is not None and actor.max_restarts == 0:
            self.release_args(actor)  # the constructor has its arguments and runs once
        if actor is None or "err" not in message:
            return
        actor.die()
        actor.no_restart = True
        self.release_args(actor)
        cause = serialization.deserialize(message["err"])
        actor.death_cause = f"the actor's constructor raised:\n{cause}"
        worker.kill()

    def release_resources(self, actor: HostedActor) -> None:
        """Give back what the actor took from the ledger (idempotent)."""
        if self.node.resources.release("actor-" + actor.aid.hex()):
            self.node.tasks.resources_freed()  # tasks waiting for them

    def release_args(self, actor: HostedActor) -> None:
        while actor.pins:
            self.node.objects.unpin(actor.pins.pop())

    # ------------------------------------------------------------------ calls
    def call(self, message: dict, client: Any) -> None:
        """An actor call (`actor_call` from a client, `acall` from a remote caller)."""
        node = self.node
        tasks = node.tasks
        aid = message["aid"]
        actor = self.hosted.get(aid)
        tid = message["tid"]
        nret = message["nret"]
        rec = TaskRecord(
            tid,
            message,
            nret,
            message.get("retries", 0),
            None,
            {},
            message.get("name", message["m"]),
        )
        rec.client = client
        tasks.records[tid] = rec
        if client is None or client.kind != "remote":
            node.recovery.on_actor_call(tid, nret)
        tasks.open_returns(rec, client)
        if actor is None:
            remote = node.remote
            if remote is not None and (
                message.get("anode") != node.node_id or aid in remote.actors.location
            ):
                remote.actors.enqueue(rec)
                tasks.resolve_args(rec, lambda r: queued(r, lambda: remote.actors.pump(aid)))
                return
            tasks.fail(rec, ActorDiedError(f"actor {aid.hex()} does not exist on this node"))
            return
        rec.actor = actor
        if actor.dead:
            tasks.fail(rec, ActorDiedError(self.death_message(actor)))
            return
        actor.outbox.append(rec)
        tasks.resolve_args(rec, lambda r: queued(r, lambda: self.pump(actor)))

    def pump(self, actor: HostedActor) -> None:
        """Send the calls at the head of the outbox whose arguments are ready, in order."""
        if actor.state is not ActorState.ALIVE:
            return
        outbox = actor.outbox
        while outbox and outbox[0].deps_left == 0:
            rec = outbox.popleft()
            if rec.done:
                continue
            self.send_call(actor, rec)

    def send_call(self, actor: HostedActor, rec: TaskRecord) -> None:
        worker = actor.worker
        assert worker is not None
        actor.inflight[rec.tid] = rec
        self.node.tasks.hand_to(worker, rec, {"op": "actor_call", "m": rec.msg["m"]})

    # ------------------------------------------------------------------ death and restarts
    @staticmethod
    def death_message(actor: HostedActor) -> str:
        return (
            f"actor {actor.name or actor.aid.hex()} is dead: "
            f"{actor.death_cause or 'its worker process died'}"
        )

    def on_worker_died(self, actor: HostedActor) -> None:
        """The actor's worker process died: restart it, or it is dead and so are its calls."""
        node = self.node
        tasks = node.tasks
        inflight = list(actor.inflight.values())
        actor.inflight.clear()
        can_restart = (
            not actor.no_restart
            and not actor.dead
            and (actor.max_restarts < 0 or actor.restarts < actor.max_restarts)
        )
        if not can_restart:
            actor.die()
            if not actor.death_cause:
                actor.death_cause = (
                    "it was killed"
                    if actor.no_restart
                    else "its worker process died and no restarts are left"
                )
            self.release_resources(actor)
            self.release_args(actor)
            node.refs.task_done(actor.aid)
            if actor.name and self.named.get((actor.namespace, actor.name)) == actor.aid:
                del self.named[(actor.namespace, actor.name)]
                if node.remote is not None:
                    node.remote.names.release(actor.namespace, actor.name, actor.aid)
            for rec in inflight + list(actor.outbox):
                tasks.fail(rec, ActorDiedError(self.death_message(actor)))
            actor.outbox.clear()
            return
        actor.restarts += 1
        actor.move(ActorEvent.RESTART)
        node.stats["actor_restarts"] += 1
        retry = []
        for rec in inflight:
            rec.worker = None
            if rec.cancelled:
                tasks.fail(rec, TaskCancelledError(f"task {rec.name} was cancelled"))
            elif rec.retries_left != 0 and not node.streams.started(rec):
                rec.retries_left -= 1
                rec.move(TaskEvent.RETRY)
                retry.append(rec)
            else:
                tasks.fail(
                    rec,
                    ActorDiedError(
                        f"actor {actor.name or actor.aid.hex()} died while running {rec.name} "
                        f"(it restarts; the call has no retries left)"
                    ),
                )
        actor.outbox.extendleft(reversed(retry))
        self.start_worker(actor)

    def kill(self, message: dict, client: Any, cause: str | None = None) -> None:
        """Kill an actor (``no_restart``: for good, ``cause`` its death cause); one hosted
        elsewhere is killed by its host."""
        aid = message["aid"]
        actor = self.hosted.get(aid)
        if actor is None:
            if self.node.remote is not None:
                self.node.remote.actors.kill(message, cause)
            return
        if actor.dead:
            return  # its death cause stays
        if message.get("no_restart", True):
            actor.no_restart = True
            actor.death_cause = cause or "it was killed with kill()"
            # its resources are free from now on (its worker is killed below), so an actor or
            # task created right after kill() gets them; the worker's death releases nothing more
            self.release_resources(actor)
        if actor.worker is not None:
            actor.worker.kill()
        elif actor.no_restart:  # its worker has not started yet: it dies now
            self.on_worker_died(actor)

    def reclaim(self, aid: bytes) -> None:
        """Nothing holds the actor this node owns any more (refcount.py): no handle is left
        and every call made through one is done, so it ends for good, here or on its host."""
        actor = self.hosted.get(aid)
        if actor is not None and actor.dead:
            return
        self.node.stats["actors_reclaimed"] += 1
        self.kill({"aid": aid, "no_restart": True}, None, RECLAIMED)

    def hosts_for(self, owner: str) -> bool:
        """Whether a live actor hosted here was created by node `owner`."""
        return any(
            not actor.dead and actor.msg.get("owner", self.node.node_id) == owner
            for actor in self.hosted.values()
        )

    def kill_orphans(self, owner: str) -> int:
        """Actors hosted here whose creator `owner` is gone die with it, unless detached."""
        killed = 0
        for actor in list(self.hosted.values()):
            if actor.dead or actor.opts.get("lifetime") == "detached":
                continue
            if actor.msg.get("owner", self.node.node_id) != owner:
                continue
            self.kill({"aid": actor.aid, "no_restart": True}, None)
            actor.death_cause = f"its owner {owner} is gone (the actor is not detached)"
            killed += 1
        return killed

    # ------------------------------------------------------------------ lookup
    async def get_actor(self, message: dict) -> dict:
        node = self.node
        key = (message.get("ns") or "default", message["name"])
        aid = self.named.get(key)
        if aid is not None:
            actor = self.hosted[aid]
            return {
                "aid": aid,
                "node": node.node_id,
                "meta": actor.opts.get("meta"),
                **self.ownership(actor),
            }
        if node.remote is not None:
            found = await node.remote.names.lookup(*key)
            if found is not None:
                return found
        return {
            "error": error_blob(ValueError(f"no actor named {key[1]!r} in namespace {key[0]!r}"))
        }

    @staticmethod
    def ownership(actor: HostedActor) -> dict:
        """Who counts the handles of a hosted actor, for a handle found by name: its owner
        node, or ``detached`` (not counted)."""
        if actor.opts.get("lifetime") == "detached":
            return {"detached": True}
        return {"owner": actor.msg.get("owner", "")}

    def hosted_meta(self, namespace: str, name: str, aid: bytes) -> Any:
        """The method table of the named actor ``aid`` hosted here (None if it is not)."""
        here = self.named.get((namespace, name))
        actor = self.hosted.get(here) if here is not None else None
        if actor is None or actor.aid != aid or actor.state is ActorState.DEAD:
            return None
        return actor.opts.get("meta")
