"""The QUIC transport's one UDP socket: batched reads, GSO sends, a bounded send queue.

:func:`open_udp_socket` binds the socket (large kernel buffers, non-blocking) and
:class:`UdpSocket` drives it from the event loop's reader callback. Every connection of a node
and its hole punches share this socket, so the address peers observe is the one it is bound to.
Where qh3 is installed, reads and sends go through its quinn-udp binding (``recvmmsg`` with UDP
GRO, ``sendmsg`` with GSO: a run of datagrams per system call each way); otherwise through
``recvfrom`` and this module's own GSO sends.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import operator
import socket
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["UdpSocket", "address_runs", "batched_io", "open_udp_socket", "route_max_payload"]

log = logging.getLogger(__name__)

_UDP_SEGMENT = 103  # Linux UDP_SEGMENT (GSO segment size), SOL_UDP level
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65000  # one UDP datagram before segmentation (IPv4 limit 65507)
# Linux: set DF and never fragment, whatever the kernel's PMTU cache says (RFC 9000 14: QUIC
# datagrams must not be fragmented; path MTU discovery finds the size by probing)
_IP_MTU_DISCOVER, _IPV6_MTU_DISCOVER, _PMTUDISC_PROBE = 10, 23, 3
_IP_MTU, _IPV6_MTU = 14, 24
#: errnos by which a kernel or device refuses GSO (then: one datagram per send)
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT})


_data_of = operator.itemgetter(0)
_address_of = operator.itemgetter(1)


def address_runs(datagrams: list[tuple[bytes, tuple]]) -> Iterator[tuple[int, int, tuple]]:
    """``(start, end, address)`` of each run of consecutive datagrams to or from one address."""
    i, n = 0, len(datagrams)
    while i < n:
        addr = datagrams[i][1]
        j = i + 1
        while j < n and datagrams[j][1] == addr:
            j += 1
        yield i, j, addr
        i = j


def batched_io(sock: socket.socket) -> Any | None:
    """qh3's batched I/O state for ``sock`` (:func:`.quic_qh3.batched_udp`), or None where qh3
    is missing or refuses the socket."""
    try:
        from .quic_qh3 import batched_udp
    except ImportError:
        return None
    try:
        return batched_udp(sock.fileno())
    except (OSError, ValueError, NotImplementedError) as exc:
        log.debug("QUIC: no batched UDP I/O (%s)", exc)
        return None


def route_max_payload(addr: tuple) -> int | None:
    """The largest UDP payload the local route towards ``addr`` carries (its interface MTU less
    the IP and UDP headers), or None where the kernel does not say."""
    host = addr[0].removeprefix("::ffff:")
    v6 = ":" in host
    probe = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host, addr[1]))
        if v6:
            return int(probe.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU)) - 48
        return int(probe.getsockopt(socket.IPPROTO_IP, _IP_MTU)) - 28
    except OSError:
        return None
    finally:
        probe.close()


def open_udp_socket(host: str, port: int, buffer_bytes: int) -> socket.socket:
    """A bound, non-blocking UDP socket with ``buffer_bytes`` kernel buffers each way."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # *BUFFORCE lets a privileged process exceed net.core.[rw]mem_max
        for force, plain in (
            (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
            (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
        ):
            for opt in (force, plain):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
                    break
                except OSError:
                    continue
        for level, option in (
            (socket.IPPROTO_IP, _IP_MTU_DISCOVER),
            (socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER),
        ):
            if level == socket.IPPROTO_IP or family == socket.AF_INET6:
                try:
                    sock.setsockopt(level, option, _PMTUDISC_PROBE)
                except OSError:
                    pass
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class UdpSocket:
    """The transport's non-blocking UDP socket, driven by the event loop's reader callback.

    asyncio's datagram transport reads one datagram per loop iteration, so a receiver paid a
    whole iteration (and a transmit attempt) per 1350-byte packet. Here one readiness callback
    reads up to ``batch`` datagrams, then calls ``on_batch_end``: the connections they went to
    take them into their QUIC library together and transmit once, which also batches ACKs. Sends go straight
    to the socket; when its buffer is full they wait in a bounded queue for writability (beyond
    the bound they are dropped, as a full network queue would: QUIC recovers them).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_datagram: Callable[[bytes, tuple], None],
        batch: int,
        on_batch_end: Callable[[], None],
        max_queued: int,
        gso: bool = True,
        batched: bool = True,
        on_datagrams: Callable[[list[tuple[bytes, tuple]]], None] | None = None,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._on_datagram = on_datagram
        #: The batch form of ``on_datagram`` (a whole read of the batched path in one call);
        #: used while ``_on_datagram`` is the one given here (a test's per-datagram hook that
        #: replaces it sees every datagram).
        self._on_datagrams = on_datagrams
        self._given_on_datagram = on_datagram
        self._on_batch_end = on_batch_end
        self._batch = batch
        self._max_queued = max_queued
        self._queue: collections.deque[tuple[bytes, tuple]] = collections.deque()
        self._closed = False
        self._gso = gso and hasattr(sock, "sendmsg")
        self.gso_sends = 0
        #: qh3's recvmmsg/GRO + GSO state, when batched I/O is on and available
        self._native: Any | None = batched_io(sock) if batched and loop is not None else None
        if self._native is not None and not gso:
            self._native.disable_gso()
        if loop is not None:
            loop.add_reader(sock.fileno(), self._read_ready)

    @classmethod
    def send_only(cls, sock: socket.socket, gso: bool = True) -> UdpSocket:
        """One that only sends, with no event loop (tests of the send path)."""
        return cls(None, sock, lambda data, addr: None, 1, lambda: None, 1, gso)  # type: ignore[arg-type]

    def _read_ready(self) -> None:
        try:
            self._read_batch()
        finally:
            self._on_batch_end()

    @property
    def batched(self) -> bool:
        """Whether reads and sends go through qh3's batched I/O (recvmmsg/GRO, GSO)."""
        return self._native is not None

    def _read_batch(self) -> None:
        native = self._native
        if native is not None:
            self._read_native(native)
            return
        recvfrom = self._sock.recvfrom
        deliver = self._on_datagram
        for _ in range(self._batch):
            if self._closed:
                return
            try:
                data, addr = recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                log.debug("QUIC socket error: %s", exc)
                continue
            try:
                deliver(data, addr)
            except Exception:
                log.exception("QUIC: error handling a datagram from %s", addr)

    def _read_native(self, native: Any) -> None:
        deliver = self._on_datagram
        deliver_many = self._on_datagrams if deliver is self._given_on_datagram else None
        budget = self._batch
        while budget > 0 and not self._closed:
            try:
                received = native.recv()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                log.debug("QUIC socket error: %s", exc)
                budget -= 1
                continue
            if not received:
                return
            budget -= len(received)
            if deliver_many is not None:
                try:
                    deliver_many(received)
                except Exception:
                    log.exception("QUIC: error handling %d datagrams", len(received))
                continue
            for data, addr in received:
                if self._closed:
                    return
                try:
                    deliver(data, addr)
                except Exception:
                    log.exception("QUIC: error handling a datagram from %s", addr)

    def send_many(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        """Send datagrams in order; runs of equal-size datagrams to one address go out as one
        UDP GSO send (the kernel splits them), which saves a syscall per 1350-byte packet."""
        native = self._native
        if native is not None and not self._queue:
            self._send_native(native, datagrams)
            return
        i, n = 0, len(datagrams)
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            j, total = i + 1, size
            if self._gso and not self._queue:
                while j < n and j - i < _GSO_MAX_SEGMENTS and datagrams[j][1] == addr:
                    length = len(datagrams[j][0])
                    if length > size or total + length > _GSO_MAX_BYTES:
                        break
                    total += length
                    j += 1
                    if length < size:  # only the last segment may be shorter
                        break
            if j - i == 1:
                self.sendto(data, addr)
            else:
                self._send_segments(datagrams[i:j], size, addr)
            i = j

    def _send_native(self, native: Any, datagrams: list[tuple[bytes, tuple]]) -> None:
        """Runs of datagrams to one address, each run in as few system calls as GSO allows."""
        if len(datagrams) > 1 and len(set(map(_address_of, datagrams))) == 1:
            # one address (the common case): the run is taken apart by C-level maps, not by
            # a Python loop per datagram
            runs: Any = ((0, len(datagrams), datagrams[0][1]),)
        else:
            runs = address_runs(datagrams)
        for i, j, addr in runs:
            run = list(map(_data_of, datagrams[i:j]))
            try:
                sent = native.send(run, addr)
            except (BlockingIOError, InterruptedError) as exc:
                sent = getattr(exc, "datagrams_sent", 0)
            except OSError as exc:
                sent = getattr(exc, "datagrams_sent", 0)
                if exc.errno in _GSO_REFUSED and native.max_gso_segments > 1:
                    log.debug("QUIC: UDP GSO refused (%s); sending datagrams one by one", exc)
                    native.disable_gso()
                else:  # too large for the path (a PMTU probe), unreachable: that one is lost
                    log.debug("QUIC send to %s failed: %s", addr, exc)
                    sent += 1
                for data, target in datagrams[i + sent : j]:
                    self.sendto(data, target)
                continue
            if j - i > 1:
                self.gso_sends += 1
            if sent < j - i:  # the socket buffer is full: the rest waits for writability
                for data, target in datagrams[i + sent :]:
                    self.sendto(data, target)
                return

    def _send_segments(self, run: list[tuple[bytes, tuple]], size: int, addr: tuple) -> None:
        try:
            self._sock.sendmsg(
                [b"".join(d for d, _ in run)],
                [(socket.SOL_UDP, _UDP_SEGMENT, size.to_bytes(2, "little"))],
                0,
                addr,
            )
            self.gso_sends += 1
            return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # no GSO on this kernel or path: plain sends from now on
            log.debug("QUIC: UDP GSO unavailable (%s); sending datagrams one by one", exc)
            self._gso = False
        for data, target in run:
            self.sendto(data, target)

    def sendto(self, data: bytes, addr: tuple) -> None:
        if self._closed:
            return
        if not self._queue:
            try:
                self._sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._sock.fileno(), self._write_ready)
            except OSError as exc:  # unreachable destination and the like: a lost datagram
                log.debug("QUIC sendto %s failed: %s", addr, exc)
                return
        if len(self._queue) < self._max_queued:
            self._queue.append((data, addr))

    def _write_ready(self) -> None:
        queue = self._queue
        while queue and not self._closed:
            data, addr = queue[0]
            try:
                self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("QUIC sendto %s failed: %s", addr, exc)
            queue.popleft()
        if not self._closed:
            self._loop.remove_writer(self._sock.fileno())

    def getsockname(self) -> tuple:
        return self._sock.getsockname()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._native = None  # drops its duplicate of the descriptor
        fd = self._sock.fileno()
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
        self._sock.close()
