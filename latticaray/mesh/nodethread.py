"""A :class:`~latticaray.mesh.node.MeshNode` on an event loop of its own, on a daemon thread.

For notebooks, scripts and tests written as synchronous code.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .node import MeshConfig, MeshNode

__all__ = ["NodeThread"]

T = TypeVar("T")


class NodeThread:
    """A :class:`MeshNode` running in its own event loop on a daemon thread.

    For notebooks and synchronous code::

        with NodeThread(MeshConfig(...)) as nt:
            peer = nt.run(nt.node.connect(addr))
            reply = nt.run(nt.node.call(peer, "/x/1", b"hi"))
    """

    def __init__(self, config: MeshConfig | None = None, *, start_timeout: float = 30.0) -> None:
        self.node = MeshNode(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._main, name=f"mesh-{self.node.peer_id.short()}", daemon=True
        )
        self._start_timeout = start_timeout
        self._error: BaseException | None = None

    def _main(self) -> None:
        loop: asyncio.AbstractEventLoop
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.node.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def start(self) -> NodeThread:
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            raise TimeoutError(f"mesh node did not start within {self._start_timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the node's loop and return its result (blocking)."""
        if self._loop is None or not self._thread.is_alive():
            raise RuntimeError("node thread is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        if self._loop is None or not self._thread.is_alive():
            return
        try:
            self.run(self.node.stop(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> NodeThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
