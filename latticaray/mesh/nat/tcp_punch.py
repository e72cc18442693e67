"""TCP simultaneous open (hole punching for TCP).

Both peers bind to their TCP port (SO_REUSEADDR/SO_REUSEPORT, so it can be shared with a
listener) and ``connect()`` to each other at about the same moment. Each SYN creates the sender's
NAT mapping; the first SYN to arrive at a peer whose own SYN already left is let in as the reply
to that SYN, and the kernel completes the simultaneous open. There is no listener and no accept:
the connected socket is the result. Attempts are repeated (a fresh socket each time, the same
port) until the deadline.
"""

from __future__ import annotations

import asyncio
import socket

from ..errors import PeerUnreachable
from .addresses import Endpoint

ATTEMPT_TIMEOUT = 1.5


def _bound_socket(local_port: int, host: str = "0.0.0.0") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, local_port))
    sock.setblocking(False)
    return sock


async def simultaneous_open(
    local_port: int, remote: Endpoint, deadline: float, host: str = "0.0.0.0"
) -> socket.socket:
    """Connect from ``local_port`` to ``remote`` until ``deadline`` (loop time); a connected socket."""
    loop = asyncio.get_running_loop()
    last_error: Exception | None = None
    attempts = 0
    while loop.time() < deadline and attempts < 20:
        attempts += 1
        sock = _bound_socket(local_port, host)
        try:
            timeout = max(0.05, min(ATTEMPT_TIMEOUT, deadline - loop.time()))
            await asyncio.wait_for(loop.sock_connect(sock, remote), timeout)
            return sock
        except (TimeoutError, OSError) as exc:
            last_error = exc
            sock.close()
            await asyncio.sleep(0.05)
        except BaseException:
            sock.close()
            raise
    raise PeerUnreachable(
        f"TCP simultaneous open to {remote[0]}:{remote[1]} failed after "
        f"{attempts} attempts: {last_error!r}"
    )
