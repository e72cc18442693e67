"""The asyncio shell of a node's :class:`~latticaray.scheduler.core.SchedulerCore` over a MeshNode.

One driver per node. It feeds the core real messages and timers and carries out its actions:

* serves ``/latticaray/sched/1`` (unary, msgpack, size-bounded, members only) for peers:
  ``offer`` (place this task here: started / queued / rejected with the node's current ad),
  ``view`` (the node's current capacity ad), ``sub`` / ``unsub`` (push my view to the caller
  on placement-relevant changes / stop), ``push`` (a neighbour's view), and the placement-group
  claim ``prepare`` / ``commit`` / ``abort`` / ``release``;
* as a submitter: a :class:`~latticaray.scheduler.submitter.SendPlacement` goes through
  ``send_placement`` when the owner gives one (the runtime offers through its task sessions) or
  as a ``sched/1`` ``offer``; :class:`~latticaray.scheduler.core.LookupCapacity` reads DHT
  ``capacity/<resource>``; :class:`~latticaray.scheduler.core.Subscribe` and ``Unsubscribe`` call
  the neighbour; placement-group messages call the bundle's node;
* pushes this node's view to its subscribers (:class:`ViewPublisher`) when :meth:`changed` is
  called and a push is due, and on a slow heartbeat;
* hands everything else (:class:`~latticaray.scheduler.core.StartLocal`, ``Placed``,
  ``PlacementFailed``, ``PlacementWarning``, ``EndTasks``, ``GroupCreated``, ``GroupPending``)
  to ``on_action``; :meth:`place` awaits a request's outcome for callers that want a future.

Every request names its submitter by the caller's authenticated peer ID; task ids are
namespaced by it. ``allowed(peer_id_str)`` refuses non-members before anything is decoded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from latticaray.mesh.errors import RpcError
from latticaray.mesh.rpc import Status

from .advertiser import CapacityAd, capacity_key, view_from_ad, views_from_dht
from .core import (
    EndTasks,
    LookupCapacity,
    SchedulerCore,
    StartLocal,
    Subscribe,
    Unsubscribe,
)
from .errors import InvalidCapacityAd, ResourceError, SchedulerError
from .local import AdmissionKind, QueueAdmission
from .neighbourhood import ViewPublisher
from .placement_groups import (
    AbortBundle,
    BundleReply,
    CommitBundle,
    GroupCreated,
    GroupPending,
    PrepareBundle,
    ReleaseGroup,
)
from .policy import NodeView, PlacementRequest
from .submitter import Placed, PlacementFailed, PlacementWarning, SendPlacement

__all__ = ["SCHED_PROTOCOL", "ProtocolError", "SchedulerDriver", "ad_of", "decode_request"]

log = logging.getLogger(__name__)

SCHED_PROTOCOL = "/latticaray/sched/1"
MAX_REQUEST_BYTES = 16 * 1024
MAX_REPLY_BYTES = 16 * 1024
MAX_META_BYTES = 4 * 1024
_MAX_ID_LEN = 128


class ProtocolError(SchedulerError, ValueError):
    """A /latticaray/sched/1 message is malformed or oversize."""


def unpack(data: bytes, limit: int) -> dict:
    if len(data) > limit:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_map_len=256,
            max_array_len=256,
            max_str_len=limit,
            max_bin_len=limit,
        )
    except Exception as exc:  # msgpack raises several unrelated types on malformed input
        raise ProtocolError(f"not valid msgpack: {exc}") from None
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise ProtocolError("message must be a map with v=1")
    return obj


def pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _short_str(value: Any, name: str, limit: int = _MAX_ID_LEN) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ProtocolError(f"{name} must be a string of 1..{limit} characters")
    return value


def _uint(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{name} must be a non-negative integer")
    return value


def _seconds(value: Any, name: str, most: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= most:
        raise ProtocolError(f"{name} must be a number of seconds in (0, {most}]")
    return float(value)


def _selector(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError("sel must be a map")
    out: dict = {}
    for k, v in value.items():
        if not isinstance(k, str) or len(k) > 256:
            raise ProtocolError("selector keys must be short strings")
        if isinstance(v, str) and len(v) <= 256:
            out[k] = v
        elif (
            isinstance(v, list)
            and len(v) <= 32
            and all(isinstance(x, str) and len(x) <= 256 for x in v)
        ):
            out[k] = tuple(v)
        else:
            raise ProtocolError("selector values must be strings or lists of strings")
    return out


def _resources(value: Any) -> dict:
    if not isinstance(value, dict) or len(value) > 64:
        raise ProtocolError("res must be a map of at most 64 resources")
    return value


def decode_request(submitter: str, obj: dict) -> tuple[PlacementRequest, bytes]:
    """A placement request from a decoded ``offer`` (task id namespaced by the submitter)."""
    task = _short_str(obj.get("task"), "task")
    meta = obj.get("meta", b"")
    if not isinstance(meta, (bytes, bytearray)) or len(meta) > MAX_META_BYTES:
        raise ProtocolError(f"meta must be at most {MAX_META_BYTES} bytes")
    bundle = obj.get("bundle")
    if bundle is not None:
        if (
            not isinstance(bundle, list)
            or len(bundle) != 2
            or not isinstance(bundle[1], int)
            or bundle[1] < -1
        ):
            raise ProtocolError("bundle must be [group id, index >= -1]")
        bundle = (_short_str(bundle[0], "bundle group"), bundle[1])
    request = PlacementRequest(
        f"{submitter}:{task}",
        _resources(obj.get("res", {})),
        submitter,
        label_selector=_selector(obj.get("sel", {})),
        bundle=bundle,
    )
    return request, bytes(meta)


def ad_of(view: NodeView) -> CapacityAd:
    return CapacityAd(
        view.node_id,
        view.seq,
        view.ad_time,
        dict(view.total),
        dict(view.available),
        dict(view.labels),
        view.queued,
        view.running,
        view.queue_limit,
        accepting=view.alive,
    )


class SchedulerDriver:
    """Drives one node's SchedulerCore with a MeshNode, a DHT and the event loop's clock."""

    def __init__(
        self,
        mesh: Any,
        core: SchedulerCore,
        *,
        dht: Any = None,
        allowed: Callable[[str], bool] | None = None,
        on_action: Callable[[Any], None] | None = None,
        send_placement: Callable[[SendPlacement], None] | None = None,
        publisher: ViewPublisher | None = None,
        call_timeout: float = 5.0,
        dht_timeout: float = 5.0,
        max_calls: int = 64,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.mesh = mesh
        self.core = core
        self.dht = dht
        self.allowed = allowed or (lambda peer: True)
        self.on_action = on_action
        self.send_placement = send_placement
        self.publisher = publisher or ViewPublisher()
        self.call_timeout = call_timeout
        self.dht_timeout = dht_timeout
        self.clock = clock or time.monotonic
        self.stats: dict[str, int] = {}
        self._calls = asyncio.Semaphore(max_calls)
        self._futures: dict[str, asyncio.Future] = {}
        self._meta: dict[str, bytes] = {}
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._closed = False

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve ``sched/1`` (when there is a mesh) and run the core's timers."""
        if self.mesh is not None:
            self.mesh.register_unary(SCHED_PROTOCOL, self._serve)
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._timers())

    def attach(
        self, mesh: Any, allowed: Callable[[str], bool] | None = None, dht: Any = None
    ) -> None:
        """A node that started alone joins a mesh: serve ``sched/1`` on it from now on."""
        if self.mesh is not None:
            raise SchedulerError("this scheduler already serves a mesh")
        self.mesh = mesh
        self.dht = dht
        if allowed is not None:
            self.allowed = allowed
        if self._loop_task is not None:
            mesh.register_unary(SCHED_PROTOCOL, self._serve)

    async def stop(self) -> None:
        self._closed = True
        try:
            if self.mesh is not None:
                self.mesh.unregister(SCHED_PROTOCOL)
        except Exception:  # already gone with the node
            pass
        tasks = list(self._tasks) + ([self._loop_task] if self._loop_task else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1

    def now(self) -> float:
        return self.clock()

    # the owner's calls ------------------------------------------------------------------------
    def submit(self, request: PlacementRequest, meta: bytes = b"") -> None:
        if meta:
            self._meta[request.task_id] = meta
        self.apply(self.core.submit(request, self.now()))

    async def place(
        self, request: PlacementRequest, meta: bytes = b"", timeout: float | None = None
    ) -> Placed | StartLocal:
        """Place ``request`` and wait: the peer's acceptance (``Placed``) or ``StartLocal``.
        Raises the scheduler's UnschedulableError, QueueFull, or TimeoutError."""
        if request.task_id in self._futures:
            raise SchedulerError(f"task {request.task_id} is already being placed")
        future = asyncio.get_running_loop().create_future()
        self._futures[request.task_id] = future
        try:
            self.submit(request, meta)
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            if not future.done():
                self.apply(self.core.cancel(request.task_id, self.now()))
            self._futures.pop(request.task_id, None)
            self._meta.pop(request.task_id, None)

    def meta_of(self, task_id: str) -> bytes:
        return self._meta.get(task_id, b"")

    def finish(self, task_id: str) -> None:
        """Work placed here ended: free it, start what now fits."""
        self._meta.pop(task_id, None)
        self.apply(self.core.finish(task_id, self.now()))
        self.changed()

    def changed(self) -> None:
        """This node's load changed: its subscribers may be due a push."""
        self._wake.set()

    def node_gone(self, node_id: str) -> None:
        self.publisher.unsubscribe(node_id)
        self.apply(self.core.node_gone(node_id, self.now()))

    def on_admission(self, admission: QueueAdmission) -> None:
        self.apply(self.core.on_admission(admission, self.now()))

    def on_send_failed(self, task_id: str) -> None:
        self.apply(self.core.on_send_failed(task_id, self.now()))

    def on_view(self, view: NodeView) -> None:
        self.apply(self.core.on_view(view, self.now()))

    # actions -----------------------------------------------------------------------------------
    def apply(self, actions: Iterable[Any]) -> None:
        for action in actions:
            if isinstance(action, SendPlacement):
                self._count("offers_sent")
                if self.send_placement is not None:
                    self.send_placement(action)
                else:
                    self._spawn(self._offer(action))
            elif isinstance(action, LookupCapacity):
                self._spawn(self._lookup(action.resource))
            elif isinstance(action, Subscribe):
                self._spawn(self._subscribe(action.node_id))
            elif isinstance(action, Unsubscribe):
                self._spawn(self._call_quietly(action.node_id, {"op": "unsub"}))
            elif isinstance(action, PrepareBundle):
                self._spawn(self._prepare(action))
            elif isinstance(action, CommitBundle):
                msg = {"op": "commit", "group": action.group_id, "index": action.index}
                self._spawn(self._call_quietly(action.node_id, msg | {"attempt": action.attempt}))
            elif isinstance(action, AbortBundle):
                msg = {"op": "abort", "group": action.group_id, "index": action.index}
                self._spawn(self._call_quietly(action.node_id, msg | {"attempt": action.attempt}))
            elif isinstance(action, ReleaseGroup):
                msg = {"op": "release", "group": action.group_id}
                self._spawn(self._call_quietly(action.node_id, msg))
            else:
                self._deliver(action)
        self._wake.set()

    def _deliver(self, action: Any) -> None:
        if isinstance(action, Placed | StartLocal):
            task_id = action.task_id if isinstance(action, Placed) else action.request.task_id
            future = self._futures.get(task_id)
            if future is not None and not future.done():
                future.set_result(action)
            if isinstance(action, StartLocal):
                self.changed()
        elif isinstance(action, PlacementFailed):
            future = self._futures.get(action.task_id)
            if future is not None and not future.done():
                future.set_exception(action.error)
        elif isinstance(action, PlacementWarning):
            log.warning("%s", action.message)
        elif isinstance(action, EndTasks | GroupCreated | GroupPending):
            pass
        if self.on_action is not None:
            self.on_action(action)

    # timers ------------------------------------------------------------------------------------
    async def _timers(self) -> None:
        while not self._closed:
            now = self.now()
            self.apply(self.core.poll(now))
            self._push_due(now)
            times = [t for t in (self.core.next_wakeup(now),) if t is not None]
            if len(self.publisher):
                wake = self.publisher.next_wakeup(self.core.local.view(now), now)
                if wake is not None:
                    times.append(wake)
            self._wake.clear()
            timeout = None if not times else max(0.005, min(times) - self.now())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _push_due(self, now: float) -> None:
        if not len(self.publisher):
            return
        view = self.core.local.view(now)
        due = self.publisher.due(view, now)
        if not due:
            return
        ad = ad_of(view).encode()
        for node_id in due:
            self._count("pushes")
            self._spawn(self._call_quietly(node_id, {"op": "push", "ad": ad}))

    # outgoing calls ----------------------------------------------------------------------------
    def _peer(self, node_id: str) -> Any:
        from latticaray.mesh.identity import PeerId

        parse = getattr(type(self.mesh.peer_id), "from_string", PeerId.from_string)
        return parse(node_id)

    async def _call(self, node_id: str, message: dict) -> dict:
        if self.mesh is None:
            raise SchedulerError(f"no mesh to reach {node_id} through")
        async with self._calls:
            reply = await self.mesh.call(
                self._peer(node_id),
                SCHED_PROTOCOL,
                pack({"v": 1} | message),
                timeout=self.call_timeout,
            )
        obj = unpack(bytes(reply), MAX_REPLY_BYTES)
        if "error" in obj:
            raise ProtocolError(f"{node_id} refused {message.get('op')}: {obj.get('message')}")
        return obj

    async def _call_quietly(self, node_id: str, message: dict) -> dict | None:
        try:
            return await self._call(node_id, message)
        except Exception as exc:  # the peer's liveness is the mesh's business, not ours
            log.debug("sched/1 %s to %s failed: %r", message.get("op"), node_id, exc)
            return None

    def _view_from(self, node_id: str, ad: Any) -> NodeView:
        return view_from_ad(CapacityAd.decode(ad, publisher=node_id), received_at=self.now())

    async def _offer(self, action: SendPlacement) -> None:
        request = action.request
        message = {
            "op": "offer",
            "task": request.task_id,
            "res": dict(request.resources),
            "sel": {
                k: (v if isinstance(v, str) else list(v)) for k, v in request.label_selector.items()
            },
            "meta": self._meta.get(request.task_id, b""),
        }
        if request.bundle is not None:
            message["bundle"] = list(request.bundle)
        try:
            obj = await self._call(action.node_id, message)
            kind = AdmissionKind(obj["kind"])
            hint = None if obj.get("hint") is None else self._view_from(action.node_id, obj["hint"])
            admission = QueueAdmission(
                kind,
                request.task_id,
                action.node_id,
                str(obj.get("reason", ""))[:512],
                hint=hint,
                infeasible=bool(obj.get("infeasible", False)),
            )
        except Exception as exc:
            log.info("offer of %s to %s failed: %r", request.task_id, action.node_id, exc)
            self.on_send_failed(request.task_id)
            return
        self.on_admission(admission)

    async def _lookup(self, resource: str) -> None:
        views = None
        if self.dht is not None:
            try:
                result = await asyncio.wait_for(
                    self.dht.get(capacity_key(resource)), self.dht_timeout
                )
                views, problems = views_from_dht(result, self.now())
                if problems:
                    log.debug("capacity/%s: %d bad ads (%s)", resource, len(problems), problems[0])
            except Exception as exc:  # DHT errors are the DHT's; the key is read again later
                log.debug("capacity/%s lookup failed: %r", resource, exc)
        self._count("lookups")
        self.apply(self.core.on_capacity(resource, views, self.now()))

    async def _subscribe(self, node_id: str) -> None:
        obj = await self._call_quietly(node_id, {"op": "sub"})
        if obj is None or obj.get("ad") is None:
            return
        try:
            self.on_view(self._view_from(node_id, obj["ad"]))
        except InvalidCapacityAd as exc:
            log.info("view of %s refused: %s", node_id, exc)

    async def _prepare(self, action: PrepareBundle) -> None:
        message = {
            "op": "prepare",
            "group": action.group_id,
            "index": action.index,
            "res": dict(action.resources),
            "attempt": action.attempt,
            "lease": action.lease,
        }
        try:
            obj = await self._call(action.node_id, message)
            hint = None if obj.get("hint") is None else self._view_from(action.node_id, obj["hint"])
            reply = BundleReply(
                action.group_id,
                action.index,
                action.attempt,
                bool(obj.get("ok")),
                str(obj.get("reason", ""))[:512],
                hint,
            )
        except Exception as exc:
            log.info(
                "prepare of %s/%d at %s failed: %r",
                action.group_id,
                action.index,
                action.node_id,
                exc,
            )
            self.apply(
                self.core.bundle_send_failed(
                    action.group_id, action.index, action.attempt, self.now()
                )
            )
            return
        self.apply(self.core.on_bundle_reply(reply, self.now()))

    # served ------------------------------------------------------------------------------------
    async def _serve(self, ctx: Any, payload: bytes) -> bytes:
        caller = str(ctx.peer_id)
        if not self.allowed(caller):
            self._count("refused_non_member")
            raise RpcError(
                Status.PERMISSION_DENIED,
                f"peer {caller} is not a member of this mesh; request refused unread",
            )
        try:
            obj = unpack(bytes(payload), MAX_REQUEST_BYTES)
            return pack({"v": 1} | self._handle(caller, obj))
        except (ProtocolError, ResourceError, InvalidCapacityAd) as exc:
            self._count("bad_requests")
            return pack({"v": 1, "error": "bad_request", "message": str(exc)[:512]})

    def _handle(self, caller: str, obj: dict) -> dict:
        op = obj.get("op")
        now = self.now()
        core = self.core
        if op == "offer":
            request, meta = decode_request(caller, obj)
            admission = core.offer(request, now)
            view = core.local.view(now)
            reply: dict[str, Any] = {
                "kind": admission.kind.value,
                "reason": admission.reason[:512],
                "infeasible": admission.infeasible,
                "hint": ad_of(view).encode(),  # every answer carries the node's view
                "gpus": "",
            }
            self.publisher.sent(caller, view, now)
            if admission.kind is AdmissionKind.REJECTED:
                if not admission.infeasible:  # tell it when room appears
                    self.publisher.watch_once(caller, view, now)
                    self.changed()
            else:
                if meta:
                    self._meta[request.task_id] = meta
                if admission.kind is AdmissionKind.STARTED:
                    assert admission.allocation is not None
                    reply["gpus"] = admission.allocation.cuda_visible_devices
                    self._deliver(StartLocal(request, admission.allocation))
                self.changed()
            return reply
        if op == "view":
            return {"ad": ad_of(core.local.view(now)).encode()}
        if op == "sub":
            ok = self.publisher.subscribe(caller, now)
            view = core.local.view(now)
            self.publisher.sent(caller, view, now)
            return {"ok": ok, "ad": ad_of(view).encode()}
        if op == "unsub":
            self.publisher.unsubscribe(caller)
            return {}
        if op == "push":
            self._count("pushes_received")
            self.on_view(self._view_from(caller, obj.get("ad")))
            return {}
        if op == "prepare":
            message = PrepareBundle(
                core.node_id,
                _short_str(obj.get("group"), "group"),
                _uint(obj.get("index"), "index"),
                _resources(obj.get("res")),
                caller,
                _seconds(obj.get("lease"), "lease", 300.0),
                _uint(obj.get("attempt"), "attempt"),
            )
            answer = core.prepare_bundle(message, caller, now)
            self.changed()
            return {
                "ok": answer.ok,
                "reason": answer.reason[:512],
                "hint": None if answer.hint is None else ad_of(answer.hint).encode(),
            }
        if op == "commit":
            answer = core.commit_bundle(
                CommitBundle(
                    core.node_id,
                    _short_str(obj.get("group"), "group"),
                    _uint(obj.get("index"), "index"),
                    _uint(obj.get("attempt"), "attempt"),
                ),
                now,
                owner=caller,
            )
            return {"ok": answer.ok, "reason": answer.reason[:512]}
        if op == "abort":
            self.apply(
                core.abort_bundle(
                    AbortBundle(
                        core.node_id,
                        _short_str(obj.get("group"), "group"),
                        _uint(obj.get("index"), "index"),
                        _uint(obj.get("attempt"), "attempt"),
                    ),
                    now,
                    owner=caller,
                )
            )
            self.changed()
            return {}
        if op == "release":
            group = _short_str(obj.get("group"), "group")
            self.apply(core.release_group_here(group, now, owner=caller))
            self.changed()
            return {}
        raise ProtocolError(f"unknown op {op!r}")
