"""Helpers of the loopback NAT tests: an echo service that names the transport, condition waits."""

from __future__ import annotations

import asyncio


async def echo(ctx, payload):
    """``/test/echo/1``: the payload back, with ``|`` and the transport the call came over."""
    return bytes(payload) + b"|" + ctx.transport.encode()


async def wait_for(cond, timeout=10.0, what="condition"):
    """Poll ``cond()`` until true; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, f"{what} not met in time"
        await asyncio.sleep(0.02)
