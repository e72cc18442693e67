"""Services of ``/latticaray/rpc/1`` by name: :class:`RpcRouter`.

A router maps service names to handlers of one of the four call kinds (unary, server stream,
client stream, bidi). One router serves every session of a node; the session's core asks it
(``lookup``) which handler answers an OPEN.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .framing import BIDI, CLIENT_STREAM, MAX_SERVICE_NAME, SERVER_STREAM, UNARY
from .rpccall import CallContext, StreamCall
from .rpccore import ServiceEntry

__all__ = [
    "BidiHandler",
    "ClientStreamHandler",
    "RpcRouter",
    "ServerStreamHandler",
    "UnaryHandler",
]

UnaryHandler = Callable[[CallContext, bytes], Awaitable[bytes]]
ServerStreamHandler = Callable[[CallContext, bytes], AsyncIterator[bytes]]
ClientStreamHandler = Callable[[CallContext, StreamCall], Awaitable[bytes]]
BidiHandler = Callable[[CallContext, StreamCall], AsyncIterator[bytes]]


class RpcRouter:
    """Services by name. One router may serve many sessions (every connection of a node)."""

    def __init__(self) -> None:
        self._handlers: dict[str, ServiceEntry] = {}
        #: ``lookup(service)``: the ``(call_type, handler, eager)`` serving a name, or None.
        self.lookup: Callable[[str], ServiceEntry | None] = self._handlers.get

    def register_unary(self, service: str, handler: UnaryHandler, *, eager: bool = False) -> None:
        """``async def handler(ctx, payload: bytes) -> bytes``.

        ``eager=True`` runs the handler inline up to its first real suspension, so a handler that
        never waits costs no task. Until its first await no task is current, so such a handler
        must not use ``asyncio.timeout()`` or ``asyncio.current_task()`` before awaiting (they
        raise RuntimeError there, which the caller receives as an INTERNAL error).
        """
        self._register(
            service, UNARY, handler, inspect.iscoroutinefunction, "an async function", eager
        )

    def register_server_stream(self, service: str, handler: ServerStreamHandler) -> None:
        """``async def handler(ctx, payload: bytes)`` that ``yield``s bytes."""
        self._register(
            service,
            SERVER_STREAM,
            handler,
            inspect.isasyncgenfunction,
            "an async generator function",
        )

    def register_client_stream(self, service: str, handler: ClientStreamHandler) -> None:
        """``async def handler(ctx, requests) -> bytes``; ``async for msg in requests``."""
        self._register(
            service, CLIENT_STREAM, handler, inspect.iscoroutinefunction, "an async function"
        )

    def register_bidi(self, service: str, handler: BidiHandler) -> None:
        """``async def handler(ctx, requests)`` that reads ``requests`` and ``yield``s bytes."""
        self._register(
            service, BIDI, handler, inspect.isasyncgenfunction, "an async generator function"
        )

    def unregister(self, service: str) -> None:
        self._handlers.pop(service, None)

    def services(self) -> list[str]:
        return sorted(self._handlers)

    def _register(
        self,
        service: str,
        call_type: int,
        handler: Callable[..., Any],
        check: Callable[[Any], bool],
        what: str,
        eager: bool = False,
    ) -> None:
        if not isinstance(service, str) or not 0 < len(service) <= MAX_SERVICE_NAME:
            raise ValueError(f"service name must be 1..{MAX_SERVICE_NAME} characters")
        if not check(handler):
            raise TypeError(f"handler for {service!r} must be {what}, got {handler!r}")
        if service in self._handlers:
            raise ValueError(f"service {service!r} is already registered")
        self._handlers[service] = (call_type, handler, eager)
