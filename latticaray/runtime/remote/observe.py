"""The members-only observability protocols: a node's state report, and worker output.

``/latticaray/report/1`` (unary): request ``StateRequest`` (msgpack ``[limit]``), reply the node's
NodeReport (latticaray.observe.model's codec). ``latticaray status`` on any member asks the
members it knows this way.

``/latticaray/logs/1`` (unary): request a LogBatch (latticaray.observe.logs) whose owner is the
called node, reply empty. Sent by the node where the worker ran, one call at a time per owner
(so lines keep their order), from a queue of at most ``MAX_QUEUED_BATCHES`` per owner (more are
dropped and counted, never queued without bound).

Both refuse a caller that is not an admitted member before reading the request.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from latticaray.mesh.errors import MeshError, RpcError
from latticaray.mesh.rpc import Status
from latticaray.observe import metrics
from latticaray.observe.logs import LogBatch, LogDecodeError
from latticaray.observe.model import MAX_ROWS, NodeReport, decode_report, encode_report
from latticaray.runtime.admission import ACTIVE, Permission

if TYPE_CHECKING:
    from latticaray.runtime.remote.runtime import RemoteRuntime

__all__ = ["LOGS_PROTOCOL", "REPORT_PROTOCOL", "RemoteObserve", "StateRequest"]

REPORT_PROTOCOL = "/latticaray/report/1"
LOGS_PROTOCOL = "/latticaray/logs/1"
MAX_STATE_REQUEST = 32
MAX_QUEUED_BATCHES = 256
LOG_CALL_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class StateRequest:
    limit: int

    def encode(self) -> bytes:
        return msgpack.packb([self.limit])

    @classmethod
    def decode(cls, data: bytes) -> StateRequest:
        if len(data) > MAX_STATE_REQUEST:
            raise ValueError("state request too large")
        try:
            parts = msgpack.unpackb(data, raw=False, max_array_len=4, max_map_len=0)
        except Exception as exc:
            raise ValueError(f"state request is not msgpack: {exc}") from None
        if not isinstance(parts, list) or not parts:
            raise ValueError("state request must be [limit]")
        limit = parts[0]
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_ROWS:
            raise ValueError(f"state request limit must be 0..{MAX_ROWS}")
        return cls(limit)


class RemoteObserve:
    """Serves and calls the state and log protocols for one node."""

    def __init__(self, remote: RemoteRuntime) -> None:
        self.remote = remote
        self.node = remote.node
        self._outboxes: dict[str, collections.deque[LogBatch]] = {}
        self._dropped = metrics.LOG_LINES.labels("dropped")

    def register(self) -> None:
        mesh = self.remote.mesh
        mesh.register_unary(REPORT_PROTOCOL, self.serve_state)
        mesh.register_unary(LOGS_PROTOCOL, self.serve_logs)

    # ------------------------------------------------------------------ state
    async def serve_state(self, ctx: Any, payload: bytes) -> bytes:
        self.remote.membership.require_member(ctx, Permission.READ)
        try:
            request = StateRequest.decode(payload)
        except ValueError as exc:
            raise RpcError(Status.INVALID_ARGUMENT, str(exc)) from None
        return encode_report(self.node.state_source.local_report(request.limit))

    async def request_report(
        self, node_id: str, limit: int, timeout: float, rtts: dict[str, float]
    ) -> NodeReport:
        """A member's report; its link's RTT (a ping first) goes into ``rtts`` (ms)."""
        peer = self.remote.membership.peers.get(node_id)
        if peer is None:
            raise RuntimeError(f"{node_id} is not a member this node admitted")
        deadline = time.monotonic() + timeout
        try:
            rtt = await self.remote.mesh.ping(peer.peer_id, timeout=timeout)
            rtts[node_id] = rtt * 1000.0
        except (MeshError, OSError, TimeoutError):
            pass  # the report says more than the ping; the deadline below still holds
        left = max(0.1, deadline - time.monotonic())
        data = await self.remote.mesh.call(
            peer.peer_id, REPORT_PROTOCOL, StateRequest(limit).encode(), timeout=left
        )
        return decode_report(data)

    # ------------------------------------------------------------------ logs
    async def serve_logs(self, ctx: Any, payload: bytes) -> bytes:
        self.remote.membership.require_member(ctx, ACTIVE)
        try:
            batch = LogBatch.decode(payload)
        except LogDecodeError as exc:
            raise RpcError(Status.INVALID_ARGUMENT, str(exc)) from None
        if batch.owner != self.node.node_id:
            raise RpcError(Status.INVALID_ARGUMENT, "log batch is for another node")
        self.node.logs.deliver(batch)
        return b""

    def send_logs(self, batch: LogBatch) -> bool:
        """Queue a batch for its owner; False if the owner is not a member (nobody to send to).

        A member whose liveness is in doubt still gets its batches (a call that fails shows
        them on this node instead): a slow driver must not lose its workers' output."""
        peer = self.remote.membership.peers.get(batch.owner)
        if peer is None:
            return False
        outbox = self._outboxes.get(batch.owner)
        if outbox is None:
            outbox = self._outboxes[batch.owner] = collections.deque()
            self.remote.spawn(self._drain(batch.owner, peer.peer_id, outbox))
        if len(outbox) >= MAX_QUEUED_BATCHES:
            self._dropped.add(len(batch.lines))
        else:
            outbox.append(batch)
        return True

    async def _drain(self, owner: str, peer_id: Any, outbox: collections.deque[LogBatch]) -> None:
        """Send an owner's batches one call at a time, in order, until its queue is empty."""
        try:
            while outbox:
                batch = outbox[0]
                try:
                    await self.remote.mesh.call(
                        peer_id, LOGS_PROTOCOL, batch.encode(), timeout=LOG_CALL_TIMEOUT
                    )
                except (MeshError, OSError, TimeoutError):
                    self.node.logs.deliver(batch)  # the owner is unreachable: seen here at least
                outbox.popleft()
        finally:
            self._outboxes.pop(owner, None)
