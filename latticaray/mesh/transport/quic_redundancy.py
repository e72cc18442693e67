"""When a QUIC connection sends each datagram twice or three times: loss concealment for a
congestion controller that reads every loss as congestion (qh3's CUBIC), on paths that lose
packets at random.

CUBIC shrinks its window at every loss event, so random loss holds a connection to the Mathis
bound (~ datagram size / RTT x 1.22 / sqrt(loss rate)): 0.45-0.8 MB/s at 40-50 ms round trips and
0.5 % loss, whatever the path could carry. qh3's congestion control lives in its Rust core with no
setting or hook. What the transport can change is what reaches the wire: a 1-RTT datagram sent
twice is lost only when both copies are, so independent loss at rate p looks like p**2 to the
core (0.5 % -> 0.0025 %) and the window stays near what the path carries. Receivers drop the
second copy of a packet number after decrypting it (RFC 9000 12.3; qh3 and aioquic alike),
without acknowledging it again.

Copies cost bytes on the wire, and on a path whose loss is congestion they would add load to the
bottleneck and hide the signal that should slow the sender. :class:`RedundancyCore` therefore
sends copies only while loss looks random:

* a measurement window of at least :data:`WINDOW_PACKETS` original datagrams (and one round
  trip) lost at least ``min_losses`` packets and a share of them between ``on_rate`` and
  ``max_rate`` (heavier loss is read as an overflowing queue: no copies);
* the smoothed RTT is within :data:`QUEUE_FACTOR` x the least seen (+ :data:`QUEUE_SLACK`):
  no standing queue, the same reading of loss as the aioquic backend's ``bdp`` controller
  (:mod:`.quic_congestion`). While a queue builds, copies stop and the core sees every loss;
* once on, copies go on until ``hold`` seconds pass without the core declaring a loss (with
  copies, the residual p**2 losses are rare; a quiet hold means the path recovered or the
  connection went idle, and the next window decides again);
* from a loss rate of ``triple_rate`` (1 %: measured before the copies, or read as the square
  root of the losses that got past them), two copies: p**3;
* a connection to a host the transport marked lossy starts with copies (``start_on``), so its
  slow start is not cut short by the first random losses: CUBIC's window, once cut, grows back
  by the clock (0.4 x t**3 datagrams, ~13 s to 1,000 datagrams), whatever the round-trip time.

Sans-I/O: fed ``now``, the core's loss count, its smoothed RTT and the datagrams sent;
:meth:`RedundancyCore.with_copies` places the copies (each right after the next original).
"""

from __future__ import annotations

from typing import Any

__all__ = ["QUEUE_FACTOR", "QUEUE_SLACK", "WINDOW_PACKETS", "RedundancyCore"]

#: Original datagrams a measurement window holds at least before its loss rate is read.
WINDOW_PACKETS = 400
#: A smoothed RTT above this many times the least seen (plus :data:`QUEUE_SLACK`) is a queue.
QUEUE_FACTOR = 1.5
QUEUE_SLACK = 0.005
#: Seconds the least RTT seen is remembered before a newer sample replaces it.
MIN_RTT_WINDOW = 30.0
#: Seconds between two readings of the core's counters.
CHECK_INTERVAL = 0.05


class RedundancyCore:
    """Decides, per transmit, whether a connection's 1-RTT datagrams go out more than once."""

    __slots__ = (
        "_hold",
        "_last_loss_at",
        "_lost_seen",
        "_max_rate",
        "_min_losses",
        "_min_rtt",
        "_min_rtt_at",
        "_next_check",
        "_on_lost",
        "_on_rate",
        "_on_sent",
        "_queue",
        "_sent",
        "_triple_rate",
        "_window_lost",
        "_window_sent",
        "_window_start",
        "copies_sent",
        "extra",
        "on",
        "path",
        "turned_on",
    )

    def __init__(
        self,
        *,
        on_rate: float,
        max_rate: float,
        min_losses: int,
        hold: float,
        triple_rate: float = 1.0,
        start_on: bool = False,
    ) -> None:
        if not 0 < on_rate < max_rate <= 1:
            raise ValueError(f"need 0 < on_rate < max_rate <= 1, got {on_rate}, {max_rate}")
        if not 0 < triple_rate <= 1:
            raise ValueError(f"need 0 < triple_rate <= 1, got {triple_rate}")
        if min_losses < 1 or hold <= 0:
            raise ValueError(f"need min_losses >= 1 and hold > 0, got {min_losses}, {hold}")
        self._on_rate = on_rate
        self._max_rate = max_rate
        self._min_losses = min_losses
        self._hold = hold
        self._triple_rate = triple_rate
        #: Copies of each datagram while on: 1, or 2 where the loss rate is at least
        #: ``triple_rate`` (measured before copies, or read from the losses copies leave).
        self.extra = 1
        self._on_sent = 0
        self._on_lost = 0
        #: Whether copies are wanted (loss looked random); sent only while no queue shows.
        #: ``start_on``: from the first datagram (a path known to be lossy), until ``hold``
        #: seconds pass without a loss.
        self.on = start_on
        #: How often copies were turned on, and how many copies went out.
        self.turned_on = int(start_on)
        self.copies_sent = 0
        #: The peer address whose datagrams get copies (None: every address). The connection
        #: sets the one its handshake validated: a path the peer moves to is unvalidated until
        #: it answers a challenge, and copies would multiply what the core sends there past the
        #: 3x anti-amplification limit (RFC 9000 8, 9.3).
        self.path: Any = None
        self._queue = False
        self._sent = 0
        self._lost_seen = 0
        self._last_loss_at = 0.0
        self._window_start: float | None = None
        self._window_sent = 0
        self._window_lost = 0
        self._min_rtt: float | None = None
        self._min_rtt_at = 0.0
        self._next_check = 0.0

    @property
    def duplicating(self) -> bool:
        """Whether the datagrams of the next transmit get copies."""
        return self.on and not self._queue

    def sent(self, originals: int) -> None:
        """``originals`` datagrams (not copies) left for the peer."""
        self._sent += originals

    def with_copies(self, datagrams: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any]]:
        """Each 1-RTT (short header) datagram 1 + :attr:`extra` times, its j-th copy right after
        the j-th original that follows it: when the first is lost a copy arrives before the
        packets whose acknowledgement would have the sender declare it lost (3 later packet
        numbers, RFC 9002 6.1.1), and a short burst of adjacent losses still leaves a copy of
        each. Handshake (long header) datagrams, and any to another address than :attr:`path`,
        go once."""
        extra = self.extra
        path = self.path
        out = []
        originals: list[tuple[bytes, Any]] = []
        for datagram in datagrams:
            out.append(datagram)
            if datagram[0][0] & 0x80 or (path is not None and datagram[1] != path):
                continue
            originals.append(datagram)
            last = len(originals) - 1
            for j in range(1, extra + 1):
                if last >= j:
                    out.append(originals[last - j])
        n = len(originals)
        tail = sorted(
            (i + j, i)
            for i in range(max(0, n - extra), n)
            for j in range(1, extra + 1)
            if i + j >= n
        )
        out.extend(originals[i] for _, i in tail)
        self.copies_sent += len(out) - len(datagrams)
        return out

    def update(self, now: float, lost_total: int, smoothed_rtt: float | None) -> bool:
        """Read the core's counters (at most every :data:`CHECK_INTERVAL`); returns
        :attr:`duplicating`."""
        if now < self._next_check:
            return self.on and not self._queue
        self._next_check = now + CHECK_INTERVAL
        if self._window_start is None:
            self._window_start = now
            self._window_sent = self._sent
            self._window_lost = lost_total
            self._lost_seen = lost_total
            self._last_loss_at = now  # a connection started with copies holds them from here
        if lost_total > self._lost_seen:
            self._lost_seen = lost_total
            self._last_loss_at = now
        rtt = smoothed_rtt
        if rtt is not None and rtt > 0:
            if (
                self._min_rtt is None
                or rtt <= self._min_rtt
                or now - self._min_rtt_at > MIN_RTT_WINDOW
            ):
                self._min_rtt, self._min_rtt_at = rtt, now
            self._queue = rtt > QUEUE_FACTOR * self._min_rtt + QUEUE_SLACK
        sent = self._sent - self._window_sent
        if sent >= WINDOW_PACKETS and now - self._window_start >= (rtt or 0.0):
            lost = lost_total - self._window_lost
            rate = lost / sent
            if rate > self._max_rate:
                self.on = False  # an overflowing queue, not random loss
            elif not self.on and lost >= self._min_losses and rate >= self._on_rate:
                self.on = True
                self.turned_on += 1
                self._last_loss_at = now
                self.extra = 2 if rate >= self._triple_rate else 1
                self._on_sent = self._on_lost = 0
            elif self.on and self.extra == 1 and rate < self._triple_rate:
                # losses that got past one copy (a window with more is a queue overflowing):
                # the path's loss rate is about the square root of theirs
                self._on_lost += lost
                self._on_sent += sent
                if (
                    self._on_lost >= self._min_losses
                    and self._on_lost >= self._triple_rate**2 * self._on_sent
                ):
                    self.extra = 2
            self._window_start = now
            self._window_sent = self._sent
            self._window_lost = lost_total
        if self.on and now - self._last_loss_at > self._hold:
            self.on = False
            self.extra = 1
        return self.on and not self._queue
