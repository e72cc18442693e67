"""The js-libp2p / Helia interop peer (tests/interop/js/peer.mjs) as a Python object.

One node process, started once per test session: it answers JSON-line commands on stdin with
JSON lines on stdout. A reader thread resolves each command's future by id, so an async test
can await a command while its own event loop serves the js peer's dials.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

JS_DIR = Path(__file__).parent / "js"
READY_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0


class JsPeerError(RuntimeError):
    """The js peer answered a command with an error."""


def node_available() -> bool:
    return shutil.which("node") is not None


class JsPeer:
    def __init__(self, *, env: dict[str, str] | None = None, wrap: tuple[str, ...] = ()) -> None:
        """``wrap``: argv run in front of ``node peer.mjs``, e.g. ``ip netns exec NS`` (which
        execs node, so :attr:`proc` is the node process)."""
        if not (JS_DIR / "node_modules").is_dir():
            raise RuntimeError(
                f"{JS_DIR}/node_modules is missing: run `make interop-deps` (npm ci) first"
            )
        self._ids = itertools.count(1)
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._lock = threading.Lock()
        self._ready: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self.stderr_tail: list[str] = []
        self.proc = subprocess.Popen(
            [*wrap, "node", "peer.mjs"],
            cwd=JS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        try:
            info = self._ready.result(READY_TIMEOUT)
        except BaseException:
            self.stop()
            raise RuntimeError(
                f"js peer did not start: {''.join(self.stderr_tail)[-2000:]}"
            ) from None
        self.peer_id: str = info["peerId"]
        self.addrs: list[str] = info["addrs"]

    def addr(self, transport: str = "tcp") -> str:
        for a in self.addrs:
            if f"/{transport}/" in a or a.split("/p2p/")[0].endswith(f"/{transport}"):
                return a
        raise LookupError(f"js peer has no {transport} address in {self.addrs}")

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "ready" in msg:
                self._ready.set_result(msg["ready"])
                continue
            with self._lock:
                fut = self._pending.pop(msg.get("id"), None)
            if fut is None:
                continue
            if msg.get("ok"):
                fut.set_result(msg.get("result"))
            else:
                fut.set_exception(JsPeerError(msg.get("error")))
        exc = RuntimeError("js peer exited")
        if not self._ready.done():
            self._ready.set_exception(exc)
        with self._lock:
            for fut in self._pending.values():
                fut.set_exception(exc)
            self._pending.clear()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_tail.append(line)
            del self.stderr_tail[:-200]

    def _send(self, cmd: str, args: dict[str, Any]) -> concurrent.futures.Future[Any]:
        msg_id = next(self._ids)
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._pending[msg_id] = fut
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": msg_id, "cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return fut

    async def call(self, cmd: str, timeout: float = COMMAND_TIMEOUT, **args: Any) -> Any:
        """Send a command and await its answer without blocking the event loop."""
        return await asyncio.wait_for(asyncio.wrap_future(self._send(cmd, args)), timeout)

    def call_sync(self, cmd: str, timeout: float = COMMAND_TIMEOUT, **args: Any) -> Any:
        """Send a command and wait for its answer (for tests whose node runs on its own loop,
        e.g. an embedded ``latticaray.init()`` runtime)."""
        return self._send(cmd, args).result(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(5)


async def connected_host(js_peer: JsPeer, setup=None):
    """A listening Python host (``setup(host)`` registers its services first), connected to the
    js peer and identified by it; returns ``(host, connection)``."""
    from latticaray.mesh.libp2p.host import Libp2pHost

    host = Libp2pHost()
    if setup is not None:
        setup(host)
    await host.listen()
    conn = await host.dial(js_peer.addr("tcp"))
    await host.identified(conn)
    return host, conn


async def release(host, js_peer: JsPeer) -> None:
    """Close the host; the js peer hangs up on it first, so the next test starts clean."""
    try:
        await js_peer.call("hangup", peer=host.peer_id_text, timeout=10)
    finally:
        await host.close()
