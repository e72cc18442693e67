"""What the stream transports (TCP + TLS, Unix) share: inbound acceptance, dial clean-up, close.

A subclass supplies its handshakes (``_server_handshake``, ``_client_handshake``) and how a
connection is opened; this base bounds concurrent inbound handshakes, puts a deadline on each,
turns socket and handshake failures into the mesh's typed errors, tracks live channels and
closes them all on :meth:`close`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..errors import ConnectionClosed, HandshakeError, PeerUnreachable
from ..identity import KeyPair, PeerId
from ..multiaddr import Multiaddr
from .streamchannel import StreamChannel

__all__ = ["OnChannel", "StreamTransportBase"]

log = logging.getLogger(__name__)

OnChannel = Callable[[StreamChannel], "Awaitable[None] | None"]


class StreamTransportBase:
    """Shared machinery of the transports whose connections are one :class:`StreamChannel`."""

    name = "stream"

    def __init__(
        self,
        key: KeyPair,
        *,
        handshake_timeout: float,
        write_high_water: int,
        read_high_water: int,
        max_pending_handshakes: int,
    ) -> None:
        self.key = key
        self.peer_id: PeerId = key.peer_id
        self.handshake_timeout = handshake_timeout
        self.write_high_water = write_high_water
        self.read_high_water = read_high_water
        self.max_pending_handshakes = max_pending_handshakes
        self._server: asyncio.AbstractServer | None = None
        self._listen_addr: Multiaddr | None = None
        self._on_channel: OnChannel | None = None
        self._pending = 0
        self._tasks: set[asyncio.Task] = set()
        self._channels: set[StreamChannel] = set()

    @property
    def listen_addr(self) -> Multiaddr | None:
        return self._listen_addr

    def _new_channel(self) -> StreamChannel:
        channel = StreamChannel(
            self.name, read_high_water=self.read_high_water, write_high_water=self.write_high_water
        )
        channel.local_peer = self.peer_id
        return channel

    def _new_inbound(self) -> StreamChannel:
        """The asyncio protocol factory of the listening server."""
        channel = self._new_channel()
        task = asyncio.get_running_loop().create_task(self._accept(channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return channel

    async def _server_handshake(self, channel: StreamChannel) -> None:
        raise NotImplementedError  # each transport authenticates its own way

    async def _accept(self, channel: StreamChannel) -> None:
        if self._pending >= self.max_pending_handshakes:
            await channel.wait_connected()
            channel.abort()
            return
        self._pending += 1
        try:
            await asyncio.wait_for(self._server_handshake(channel), self.handshake_timeout)
        except asyncio.CancelledError:
            channel.abort()
            raise
        except (TimeoutError, HandshakeError, ConnectionClosed, OSError) as exc:
            log.info(
                "%s: inbound handshake from %s failed: %s",
                self.name,
                channel.remote_addr,
                exc or type(exc).__name__,
            )
            channel.abort()
            return
        finally:
            self._pending -= 1
        self._track(channel)
        if self._on_channel is not None:
            try:
                result = self._on_channel(channel)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("%s: on_channel callback failed; closing the channel", self.name)
                channel.abort()

    async def _establish(
        self,
        channel: StreamChannel,
        connect: Callable[[], Awaitable[None]],
        where: str,
        deadline: float,
        on_failure: Callable[[], None] | None = None,
    ) -> StreamChannel:
        """Run ``connect()`` (socket + handshake) under ``deadline``; typed errors on failure."""
        try:
            async with asyncio.timeout(deadline):
                await connect()
        except BaseException as exc:
            channel.abort()
            if on_failure is not None:
                on_failure()
            if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                raise PeerUnreachable(
                    f"{self.name} dial to {where} timed out after {deadline} s"
                ) from None
            if isinstance(exc, (OSError, ConnectionClosed)):
                raise PeerUnreachable(f"{self.name} dial to {where} failed: {exc}") from exc
            raise
        self._track(channel)
        return channel

    def _track(self, channel: StreamChannel) -> None:
        self._channels.add(channel)
        channel.connection_lost_hook = self._channels.discard

    async def close(self) -> None:
        """Stop listening and close every channel this transport made."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in list(self._channels):
            channel.abort()
        self._channels.clear()
        await asyncio.sleep(0)  # let the aborted transports run connection_lost
