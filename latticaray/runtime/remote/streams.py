"""Streams whose owner is another node (`/latticaray/stream/1`): a generator passed to a task
on this node reads its items from the node that owns the stream, one `stream_next` at a time.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from latticaray.mesh.errors import MeshError
from latticaray.runtime.admission import ACTIVE
from latticaray.runtime.errors import NodeDiedError
from latticaray.runtime.remote.wire import (
    STREAM_PROTOCOL,
    StreamEnd,
    StreamItemRef,
    StreamNext,
    StreamReply,
    StreamTimeout,
    decode_stream_reply,
    decode_stream_request,
)
from latticaray.runtime.serialization import error_blob

if TYPE_CHECKING:
    from latticaray.runtime.remote.runtime import RemoteRuntime

STREAM_POLL = 20.0  # longest one remote stream_next waits at the owner before re-asking


class RemoteStreams:
    """Asks owners for stream items, and answers the asks of other nodes."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote

    async def next_from(self, owner: str, message: dict) -> dict:
        """The next item of a stream another node owns (its generator was passed here): asks the
        owner, re-asking every STREAM_POLL seconds while the caller waits without a deadline. The
        item's ref comes back as a borrow (the owner's generator keeps its own hold)."""
        loop = asyncio.get_running_loop()
        timeout = message.get("timeout")
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            peer = self.remote.membership.peers.get(owner)
            if peer is None:
                return {
                    "error": error_blob(
                        NodeDiedError(f"node {owner}, which owns this stream, is not a live peer")
                    )
                }
            wait = (
                STREAM_POLL
                if deadline is None
                else max(0.0, min(STREAM_POLL, deadline - loop.time()))
            )
            request = StreamNext(message["tid"], message["i"], wait)
            try:
                reply = decode_stream_reply(
                    await self.remote.mesh.call(
                        peer.peer_id, STREAM_PROTOCOL, request.encode(), timeout=wait + 10.0
                    )
                )
            except MeshError as exc:
                return {
                    "error": error_blob(
                        NodeDiedError(
                            f"could not reach node {owner}, which owns this stream: {exc}"
                        )
                    )
                }
            if isinstance(reply, StreamTimeout):
                if deadline is None or loop.time() < deadline:
                    continue
                return {"timeout": True}
            if isinstance(reply, StreamEnd):
                return {"end": True}
            # a borrow: the owner's generator keeps its own hold
            return {"oid": reply.oid, "owner": reply.owner}

    async def serve(self, ctx: Any, payload: bytes) -> bytes:
        self.remote.membership.require_member(ctx, ACTIVE)
        request = decode_stream_request(payload)
        timeout = STREAM_POLL if request.timeout is None else min(request.timeout, STREAM_POLL)
        reply = await self.remote.node.streams.next(
            {"tid": request.tid, "i": request.i, "timeout": max(0.0, timeout), "borrow": True}
        )
        out: StreamReply
        if reply.get("timeout"):
            out = StreamTimeout()
        elif reply.get("end"):
            out = StreamEnd()
        else:
            out = StreamItemRef(reply["oid"], reply["owner"])
        return out.encode()
