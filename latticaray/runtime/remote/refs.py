"""Reference counts between nodes: borrow registrations at an object's owner (`/latticaray/ref/1`)
and the `held` acknowledgement of refs that arrived inside a remote task's results.

The counting itself is refcount.py's RefTable; this module carries its messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from latticaray.mesh.errors import RpcError
from latticaray.mesh.rpc import Status
from latticaray.runtime.remote.protocols import (
    MAX_CONTROL_MESSAGE,
    MAX_REF_OPS,
    REF_PROTOCOL,
    pack,
    unpack,
)

if TYPE_CHECKING:
    from latticaray.runtime.remote.runtime import RemoteRuntime


class RemoteRefs:
    """Sends this node's borrow registrations to owners and serves those of other nodes."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote

    async def call(self, owner: str, ops: list) -> None:
        """Deliver ``[[BORROW|UNBORROW, object id], ...]`` to the owner, in order."""
        peer = self.remote.membership.alive_peer(owner)
        if peer is None:
            raise LookupError(f"owner {owner} is not an alive member")
        await self.remote.mesh.call(peer.peer_id, REF_PROTOCOL, pack({"ops": ops}), timeout=10.0)

    async def serve(self, ctx: Any, payload: bytes) -> bytes:
        caller = self.remote.membership.require_member(ctx)
        if len(payload) > MAX_CONTROL_MESSAGE:
            raise RpcError(Status.INVALID_ARGUMENT, "reference update too large")
        ops = unpack(payload).get("ops")
        if (
            not isinstance(ops, list)
            or len(ops) > MAX_REF_OPS
            or not all(
                isinstance(o, list) and len(o) == 2 and o[0] in (0, 1) and isinstance(o[1], bytes)
                for o in ops
            )
        ):
            raise RpcError(Status.INVALID_ARGUMENT, "ops must be [[0|1, object id], ...]")
        self.remote.node.refs.on_ops(caller, ops)
        return b""

    def ack_held(self, node_id: str, tid: bytes) -> None:
        """Refs inside a task's results are counted here: the executor may let go of them once
        this node's own registrations are through."""

        async def ack() -> None:
            await self.remote.node.refs.settled()
            self.remote.caller.send(node_id, {"k": "held", "tid": tid})

        self.remote.spawn(ack())
