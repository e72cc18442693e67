"""Asyncio drivers of the scheduler over a MeshNode: node-side admission and submitter side.

Protocol ``/latticaray/sched/1`` (unary, msgpack; see docs/protocol/scheduler.md):

* ``{"v": 1, "op": "offer", "task": str, "res": {..}, "sel": {..}, "meta": bytes}`` — "run this
  here": the node re-checks with its :class:`LocalScheduler` and answers
  ``{"v": 1, "kind": "started" | "queued" | "rejected", "reason": str, "infeasible": bool,
  "hint": <capacity ad bytes> | nil, "gpus": str}``;
* ``{"v": 1, "op": "view"}`` — the node's current capacity ad: ``{"v": 1, "ad": bytes}``;
* errors: ``{"v": 1, "error": code, "message": str}``.

The submitter of an offer is the caller's authenticated peer ID (never a claim in the message),
so fairness between submitters cannot be gamed by inventing submitter names. Requests are
size-bounded before parsing; every call has a deadline.

:class:`SchedulerService` serves the protocol on a node; ``on_start(task, meta)`` is where the
runtime hands an admitted task to a worker, and :meth:`SchedulerService.finish` gives its resources
back. :class:`SchedulerClient` places requests from a node: it reads candidates from the DHT
capacity keys (:class:`CandidateSampler`) or from views it is given, asks the policy, sends offers,
spills over on rejections and waits (bounded) when nothing fits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgpack

from .advertiser import CandidateSampler, CapacityAd, CapacityAdvertiser, view_from_ad
from .errors import InvalidCapacityAd, ResourceError, SchedulerError
from .local import AdmissionKind, LocalScheduler, QueueAdmission
from .policy import ClusterSnapshot, NodeView, PlacementPolicy, PlacementRequest
from .submitter import Placed, PlacementFailed, PlacementWarning, SendPlacement, Submitter

__all__ = ["SCHED_PROTOCOL", "ProtocolError", "SchedulerClient", "SchedulerService"]

log = logging.getLogger(__name__)

SCHED_PROTOCOL = "/latticaray/sched/1"
MAX_REQUEST_BYTES = 16 * 1024
MAX_REPLY_BYTES = 16 * 1024
MAX_META_BYTES = 4 * 1024
_MAX_ID_LEN = 128


class ProtocolError(SchedulerError, ValueError):
    """A /latticaray/sched/1 message is malformed or oversize."""


def _unpack(data: bytes, limit: int) -> dict:
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


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _parse_selector(value: Any) -> dict:
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


class SchedulerService:
    """Serves ``/latticaray/sched/1`` on ``node`` over a :class:`LocalScheduler`."""

    def __init__(
        self,
        node: Any,
        local: LocalScheduler,
        *,
        on_start: Callable[[str, bytes], Awaitable[None] | None] | None = None,
        advertiser: CapacityAdvertiser | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.node = node
        self.local = local
        self.on_start = on_start
        self.advertiser = advertiser
        self.clock = clock or time.time
        self._meta: dict[str, bytes] = {}
        self._tasks: set[asyncio.Task] = set()
        self.bad_requests = 0
        node.register_unary(SCHED_PROTOCOL, self._handle)

    async def close(self) -> None:
        try:
            self.node.unregister(SCHED_PROTOCOL)
        except Exception:  # already gone with the node
            pass
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except BaseException:
                pass

    def current_ad(self) -> CapacityAd:
        view = self.local.view(self.clock())
        return CapacityAd(
            self.local.node_id,
            0,
            view.ad_time,
            view.total,
            view.available,
            view.labels,
            view.queued,
            view.running,
            view.queue_limit,
            accepting=view.alive,
        )

    async def _handle(self, ctx: Any, payload: bytes) -> bytes:
        try:
            request = _unpack(bytes(payload), MAX_REQUEST_BYTES)
            op = request.get("op")
            if op == "view":
                return _pack({"v": 1, "ad": self.current_ad().encode()})
            if op != "offer":
                raise ProtocolError(f"unknown op {op!r}")
            return _pack(self._offer(str(ctx.peer_id), request))
        except (ProtocolError, ResourceError, InvalidCapacityAd) as exc:
            self.bad_requests += 1
            return _pack({"v": 1, "error": "bad_request", "message": str(exc)})

    def _offer(self, submitter: str, request: dict) -> dict:
        task = request.get("task")
        if not isinstance(task, str) or not 0 < len(task) <= _MAX_ID_LEN:
            raise ProtocolError(f"task must be a string of 1..{_MAX_ID_LEN} characters")
        resources = request.get("res", {})
        if not isinstance(resources, dict):
            raise ProtocolError("res must be a map")
        meta = request.get("meta", b"")
        if not isinstance(meta, (bytes, bytearray)) or len(meta) > MAX_META_BYTES:
            raise ProtocolError(f"meta must be at most {MAX_META_BYTES} bytes")
        key = f"{submitter}:{task}"
        placement = PlacementRequest(
            key, resources, submitter, label_selector=_parse_selector(request.get("sel", {}))
        )
        admission = self.local.offer(placement, self.clock())
        reply: dict[str, object] = {
            "v": 1,
            "kind": admission.kind.value,
            "reason": admission.reason[:512],
            "infeasible": admission.infeasible,
            "hint": None,
            "gpus": "",
        }
        if admission.kind is AdmissionKind.REJECTED:
            reply["hint"] = self.current_ad().encode()
        else:
            self._meta[key] = bytes(meta)
            if admission.kind is AdmissionKind.STARTED:
                reply["gpus"] = (
                    admission.allocation.cuda_visible_devices if admission.allocation else ""
                )
                self._started([admission])
            self._changed()
        return reply

    def _changed(self) -> None:
        if self.advertiser is not None:
            self.advertiser.notify_change()

    def _started(self, admissions: Iterable[QueueAdmission]) -> None:
        for admission in admissions:
            meta = self._meta.pop(admission.task_id, b"")
            if self.on_start is None:
                continue
            try:
                result = self.on_start(admission.task_id, meta)
            except Exception:  # a failing hook must not wedge the node's resources
                log.exception(
                    "on_start hook failed for %s; releasing its resources", admission.task_id
                )
                self._started(self.local.finish(admission.task_id, self.clock()))
                continue
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def finish(self, task_key: str) -> None:
        """The task ``task_key`` (as passed to ``on_start``) ended: free it, start queued ones."""
        self._started(self.local.finish(task_key, self.clock()))
        self._changed()

    def cancel(self, task_key: str) -> None:
        """Drop a queued task or end a running one (its submitter gave up on it)."""
        self._meta.pop(task_key, None)
        self._started(self.local.cancel(task_key, self.clock()))
        self._changed()


class SchedulerClient:
    """Places requests from this node over ``/latticaray/sched/1`` with spillback.

    Candidates come from ``views()`` (a callable returning current :class:`NodeView` s, e.g.
    :func:`~latticaray.scheduler.advertiser.member_views` of the CRDT members) and, in meshes
    larger than ``small_mesh_limit``, from ``sampler`` (DHT capacity keys). View ``ad_time`` s must
    be on the event loop's clock (``member_views`` converts).
    """

    def __init__(
        self,
        node: Any,
        *,
        sampler: CandidateSampler | None = None,
        views: Callable[[], Iterable[NodeView]] | None = None,
        policy: PlacementPolicy | None = None,
        call_timeout: float = 5.0,
        refresh_interval: float = 0.3,
        max_attempts: int = 4,
        infeasible_timeout: float = 30.0,
        max_waiting: int = 10_000,
        small_mesh_limit: int = 64,
        holder_view_max_age: float = 1.0,
        max_holder_fetches: int = 4,
    ) -> None:
        self.node = node
        self.holder_view_max_age = holder_view_max_age
        self.max_holder_fetches = max_holder_fetches
        self.small_mesh_limit = small_mesh_limit
        self.sampler = sampler
        if sampler is not None:
            # ad times must be on the clock the submitter uses (the event loop's)
            sampler.clock = lambda: asyncio.get_running_loop().time()
        self.views = views
        self.call_timeout = call_timeout
        self.refresh_interval = refresh_interval
        self.snapshot = ClusterSnapshot(local_node=str(node.peer_id))
        self.submitter = Submitter(
            str(node.peer_id),
            policy or PlacementPolicy(),
            self.snapshot,
            max_attempts=max_attempts,
            infeasible_timeout=infeasible_timeout,
            max_waiting=max_waiting,
            retry_interval=refresh_interval,
        )
        self._futures: dict[str, asyncio.Future] = {}
        self._meta: dict[str, bytes] = {}
        self._tasks: set[asyncio.Task] = set()
        self._pump: asyncio.Task | None = None
        self.sent = 0
        self.warnings: list[str] = []

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def refresh(self, demands: Iterable[dict] = ({"CPU": 1},)) -> None:
        """Update the snapshot: from ``views()`` (the CRDT member view) and, when that view is
        missing or larger than ``small_mesh_limit`` nodes, from DHT capacity keys."""
        count = 0
        if self.views is not None:
            for view in self.views():
                self.snapshot.update_node(view)
                count += 1
        if self.sampler is not None and (self.views is None or count > self.small_mesh_limit):
            for demand in demands:
                try:
                    for view in await self.sampler.candidates(demand):
                        self.snapshot.update_node(view)
                except (TimeoutError, SchedulerError, OSError) as exc:
                    log.warning("capacity lookup failed: %s", exc)
                except Exception as exc:  # DHT errors are typed by the DHT layer
                    log.warning("capacity lookup failed: %s", exc)

    async def fetch_holder_views(self, request: PlacementRequest) -> int:
        """Ask the holders of ``request``'s arguments (from ``snapshot.objects``) for their current
        ad when the snapshot has none or an old one, so locality works without knowing everyone.
        Returns how many views were fetched."""
        now = self._now()
        holders: list[str] = []
        for cid, _size in request.args:
            info = self.snapshot.objects.get(cid)
            for holder in sorted(info.holders) if info is not None else ():
                known = self.snapshot.nodes.get(holder)
                if holder not in holders and (
                    known is None or now - known.ad_time > self.holder_view_max_age
                ):
                    holders.append(holder)
        results = await asyncio.gather(
            *(self._fetch_view(h) for h in holders[: self.max_holder_fetches])
        )
        fetched = 0
        for view in results:
            if view is not None:
                self.snapshot.update_node(view)
                fetched += 1
        return fetched

    async def _fetch_view(self, node_id: str) -> NodeView | None:
        from latticaray.mesh.errors import MeshError

        try:
            reply = await self.node.call(
                self._peer(node_id),
                SCHED_PROTOCOL,
                _pack({"v": 1, "op": "view"}),
                timeout=self.call_timeout,
            )
            obj = _unpack(bytes(reply), MAX_REPLY_BYTES)
            return view_from_ad(
                CapacityAd.decode(obj["ad"], publisher=node_id), received_at=self._now()
            )
        except (
            TimeoutError,
            MeshError,
            OSError,
            ProtocolError,
            InvalidCapacityAd,
            KeyError,
            ValueError,
        ) as exc:
            log.info("capacity view of %s unavailable: %s", node_id, exc)
            return None

    def _peer(self, node_id: str) -> Any:
        from latticaray.mesh.identity import PeerId

        parse = getattr(type(self.node.peer_id), "from_string", PeerId.from_string)
        return parse(node_id)

    async def place(
        self, request: PlacementRequest, meta: bytes = b"", timeout: float | None = None
    ) -> Placed:
        """Place ``request``; returns the accepting node's answer (started or queued there).

        Raises :class:`UnschedulableError` when no node can ever run it (after the infeasible
        timeout) and :class:`QueueFull` when too many requests are already waiting."""
        if request.task_id in self._futures:
            raise SchedulerError(f"task {request.task_id} is already being placed")
        future = asyncio.get_running_loop().create_future()
        self._futures[request.task_id] = future
        self._meta[request.task_id] = meta
        try:
            await self.refresh([request.resources])
            await self.fetch_holder_views(request)
            self._handle(self.submitter.submit(request, self._now()))
            self._ensure_pump()
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            if not future.done():
                # Timed out or cancelled: stop placing it. (If an offer is in flight and the node
                # admits it anyway, the reply is dropped; the node frees it when the runtime's
                # task session for it never arrives.)
                self.submitter.cancel(request.task_id)
            self._futures.pop(request.task_id, None)
            self._meta.pop(request.task_id, None)

    def _handle(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, SendPlacement):
                task = asyncio.ensure_future(self._send(action))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(action, Placed):
                future = self._futures.get(action.task_id)
                if future is not None and not future.done():
                    future.set_result(action)
            elif isinstance(action, PlacementFailed):
                future = self._futures.get(action.task_id)
                if future is not None and not future.done():
                    future.set_exception(action.error)
            elif isinstance(action, PlacementWarning):
                self.warnings.append(action.message)
                log.warning("%s", action.message)

    async def _send(self, action: SendPlacement) -> None:
        from latticaray.mesh.errors import MeshError

        request = action.request
        payload = _pack(
            {
                "v": 1,
                "op": "offer",
                "task": request.task_id,
                "res": request.resources,
                "sel": {
                    k: (v if isinstance(v, str) else list(v))
                    for k, v in request.label_selector.items()
                },
                "meta": self._meta.get(request.task_id, b""),
            }
        )
        self.sent += 1
        try:
            reply = await self.node.call(
                self._peer(action.node_id), SCHED_PROTOCOL, payload, timeout=self.call_timeout
            )
            admission = self._decode_admission(action, bytes(reply))
        except (
            TimeoutError,
            MeshError,
            OSError,
            ProtocolError,
            InvalidCapacityAd,
            ValueError,
        ) as exc:
            log.info("offer of %s to %s failed: %s", request.task_id, action.node_id, exc)
            self._handle(self.submitter.on_send_failed(request.task_id, self._now()))
            return
        self._handle(self.submitter.on_admission(admission, self._now()))

    def _decode_admission(self, action: SendPlacement, reply: bytes) -> QueueAdmission:
        obj = _unpack(reply, MAX_REPLY_BYTES)
        if "error" in obj:
            raise ProtocolError(f"{action.node_id} refused the offer: {obj.get('message')}")
        try:
            kind = AdmissionKind(obj["kind"])
        except (KeyError, ValueError):
            raise ProtocolError("reply has no valid kind") from None
        hint = None
        if obj.get("hint") is not None:
            ad = CapacityAd.decode(obj["hint"], publisher=action.node_id)
            hint = view_from_ad(ad, received_at=self._now())
        return QueueAdmission(
            kind,
            action.request.task_id,
            action.node_id,
            str(obj.get("reason", ""))[:512],
            hint=hint,
            infeasible=bool(obj.get("infeasible", False)),
        )

    def _ensure_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.ensure_future(self._pump_loop())

    async def _pump_loop(self) -> None:
        """Retry waiting requests as views refresh; ends when nothing is left to place."""
        while self._futures:
            now = self._now()
            wake = self.submitter.next_wakeup(now)
            delay = (
                self.refresh_interval
                if wake is None
                else min(self.refresh_interval, max(0.0, wake - now))
            )
            await asyncio.sleep(max(delay, 0.01))
            if self.submitter.waiting or self.submitter.infeasible:
                demands = [{"CPU": 1}] + [dict(f) for f in self._pending_demands()]
                await self.refresh(demands)
                self._handle(self.submitter.poll(self._now()))

    def _pending_demands(self) -> list[dict]:
        seen, out = set(), []
        for request in self.submitter.pending_requests():
            key = tuple(sorted(request.resources.items()))
            if key not in seen:
                seen.add(key)
                out.append(request.resources)
        return out[:8]

    async def close(self) -> None:
        tasks = list(self._tasks) + ([self._pump] if self._pump else [])
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except BaseException:
                pass
