"""Helpers for tests and benchmarks that run inside the netlab (real kernel NATs).

* :func:`netlab_available` / :func:`lab` — bring a lab up under its own prefix, always tear it down;
* :class:`NamespaceLoop` — a thread that enters one lab node's network namespace (``setns`` is
  per-thread) and runs its own asyncio loop there, so one Python process can hold nodes in every
  namespace; every socket created on that loop lives in that node.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import threading
from concurrent.futures import Future

NETLAB = os.environ.get("NETLAB") or os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "netlab", "netlab")
)
CLONE_NEWNET = 0x40000000


def netlab_available() -> str | None:
    """None if the lab can run here, else the reason it cannot.

    CI sets LATTICARAY_REQUIRE_NETLAB=1 (it runs as root beside ../shared): there a lab that
    cannot run is an error, never a silent skip.
    """
    reason = _unavailable_reason()
    if reason is not None and os.environ.get("LATTICARAY_REQUIRE_NETLAB") == "1":
        raise RuntimeError(f"netlab is required here but cannot run: {reason}")
    return reason


def _unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "netlab needs root"
    if not os.access(NETLAB, os.X_OK):
        return f"netlab not found at {NETLAB}"
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    return None


def netlab(prefix: str, *args: str, check: bool = True, timeout: float = 60) -> str:
    env = dict(os.environ, NETLAB_PREFIX=prefix)
    proc = subprocess.run(
        [NETLAB, "--prefix", prefix, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"netlab {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    return proc.stdout


@contextlib.contextmanager
def lab(prefix: str, *up_args: str):
    """``netlab up --force`` under ``prefix``; yields the status dict; always ``netlab down``."""
    try:
        netlab(prefix, "up", "--force", *up_args)
        yield json.loads(netlab(prefix, "status", "--json"))
    finally:
        netlab(prefix, "down", check=False)


_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceLoop:
    """An asyncio loop on a thread living in ``/run/netns/<prefix>-<node>``."""

    def __init__(self, prefix: str, node: str) -> None:
        self.node = node
        self.path = f"/run/netns/{prefix}-{node}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready: Future = Future()
        self._thread = threading.Thread(target=self._main, name=f"netns-{node}", daemon=True)
        self._thread.start()
        self._ready.result(timeout=10)

    def _main(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {self.path}")
            finally:
                os.close(fd)
            self.loop = asyncio.new_event_loop()
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def run(self, coro, timeout: float = 60.0):
        """Run ``coro`` on this node's loop and wait (from another thread) for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
