"""The client end of a node channel: a worker's, or an attached driver's (`init(address=...)`).

Frames are protocol.py's. Requests carry an `rid` the node's `reply` echoes; other frames are
work or control for the worker (routed by `router`).
"""

from __future__ import annotations

import collections
import socket
import threading
from typing import Any

from latticaray.runtime.protocol import BlockingFrameReader, ChannelClosed, pack


class WorkerConnection:
    """The worker's end of the node channel: locked sends, shared reading, request replies.

    There is no reader thread: whichever thread needs a frame reads, holding `read_lock` (the
    main thread between tasks, or a thread waiting for its reply while the main thread is busy
    running user code). Replies go to their waiters, work goes to `deferred` for the main
    thread, and the rest to `router`. Saving the thread hand-off per call is what makes sync
    calls fast.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()
        self._reader = BlockingFrameReader(sock)
        self._pending: dict[int, list] = {}
        self._next_rid = 0
        self._rid_lock = threading.Lock()
        self.read_lock = threading.Lock()
        self.deferred: collections.deque = collections.deque()
        self.router = self.deferred.append
        self.closed = False

    def pump(self) -> None:
        """Read at least one frame (all that are there) and route them. Hold read_lock."""
        if self.closed:
            raise ChannelClosed("node closed the worker channel")
        try:
            messages = self._reader.read_available()
            if not messages:
                messages = [self._reader.read()]
        except (ChannelClosed, OSError):
            self.closed = True
            self.fail_all()
            raise ChannelClosed("node closed the worker channel") from None
        for message in messages:
            if message["op"] == "reply":
                self.deliver_reply(message)
            else:
                self.router(message)

    def send(self, message: dict) -> None:
        frame = pack(message)
        with self._send_lock:
            self.sock.sendall(frame)

    def read(self) -> dict:
        return self._reader.read()

    def read_available(self) -> list[dict]:
        """Every frame there is without waiting (the caller holds `read_lock`)."""
        return self._reader.read_available()

    def request(self, message: dict, timeout: float | None = None) -> dict:
        with self._rid_lock:
            self._next_rid += 1
            rid = self._next_rid
        slot: list[Any] = [threading.Event(), None]  # the waiter's event, then the reply
        self._pending[rid] = slot
        message["rid"] = rid
        try:
            self.send(message)
            event = slot[0]
            while not event.is_set():
                if self.read_lock.acquire(blocking=False):
                    try:
                        while not event.is_set():
                            self.pump()
                    except ChannelClosed:
                        break
                    finally:
                        self.read_lock.release()
                else:
                    event.wait(0.002)  # another thread reads; it hands our reply over
        finally:
            self._pending.pop(rid, None)
        if slot[1] is None:
            return {"op": "reply", "error": "node closed the worker channel"}
        return slot[1]

    def deliver_reply(self, message: dict) -> None:
        slot = self._pending.get(message["rid"])
        if slot is not None:
            slot[1] = message
            slot[0].set()

    def fail_all(self) -> None:
        for slot in list(self._pending.values()):
            slot[1] = {"op": "reply", "error": "node closed the worker channel"}
            slot[0].set()
