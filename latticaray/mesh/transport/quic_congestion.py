"""A loss-tolerant congestion controller for the QUIC transport: loss shrinks the window only
where the round-trip time says a queue is building (BBR's reading of loss), and the window grows
multiplicatively, not by one datagram per round trip.

Reno and CUBIC halve their window on every loss, so on a path with random loss (wireless, a
lossy WAN: 0.5 % of packets at 50 ms round trips) a connection settles at a small fraction of the
path's capacity (Mathis: rate ~ MSS / RTT / sqrt(loss)). :class:`BdpCongestionControl` measures
the delivery rate once per round trip (bytes acknowledged over the round) and, at a loss, keeps

    congestion_window >= 2 x max(delivery rate over the last rounds) x min RTT

so a loss on a path without a standing queue (RTT near its minimum) leaves the window as it was
(and slow start goes on), while a loss with the RTT inflated by a queue halves it like Reno.
Heavy loss in one round (:data:`HEAVY_LOSS`) and persistent congestion shrink it regardless.
Past slow start (ended by that, or by HyStart's RTT-increase test) the window grows by
:data:`GROWTH` of what is acknowledged (about 12 % per round trip), so a 50 ms path reaches a
megabytes window in seconds, not minutes. aioquic's pacer spreads the window over the RTT.

Registered with aioquic (its public ``register_congestion_control``) as :data:`NAME`;
``QuicConfig.congestion_control`` selects it. Sans-I/O: it is fed ``now`` and packets.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from aioquic.quic.congestion.base import (
    K_MINIMUM_WINDOW,
    QuicCongestionControl,
    QuicRttMonitor,
    register_congestion_control,
)
from aioquic.quic.packet_builder import QuicSentPacket

__all__ = ["GROWTH", "HEAVY_LOSS", "NAME", "BdpCongestionControl"]

NAME = "bdp"
#: The share of a round's packets that, lost, shrinks the window whatever the RTT says.
HEAVY_LOSS = 0.15
#: Rounds the bandwidth filter remembers (its maximum is the bandwidth estimate).
BANDWIDTH_ROUNDS = 10
#: Seconds the min-RTT filter remembers.
MIN_RTT_WINDOW = 10.0
#: At a loss the window stays at least this many bandwidth-delay products.
BDP_GAIN = 2.0
#: A loss is random (not a queue) while the BDP floor is at least this share of the window.
RANDOM_LOSS_FLOOR = 0.8
#: Past slow start, the window grows by this share of the bytes acknowledged.
GROWTH = 0.125
LOSS_REDUCTION = 0.5


class BdpCongestionControl(QuicCongestionControl):
    """Congestion window that reads loss against the measured bandwidth-delay product."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._max_datagram_size = max_datagram_size
        self._recovery_start = 0.0
        self._stash = 0
        self._rtt_monitor = QuicRttMonitor()
        self._delivered = 0
        self._round_start_time: float | None = None
        self._round_start_delivered = 0
        self._round_sent = 0
        self._round_lost = 0
        self._bandwidths: collections.deque[float] = collections.deque(maxlen=BANDWIDTH_ROUNDS)
        self._min_rtt: float | None = None
        self._min_rtt_at = 0.0

    @property
    def bandwidth(self) -> float:
        """Bytes per second: the largest delivery rate of the remembered rounds."""
        return max(self._bandwidths, default=0.0)

    @property
    def min_rtt(self) -> float | None:
        return self._min_rtt

    def _floor(self) -> int:
        return K_MINIMUM_WINDOW * self._max_datagram_size

    def _bdp_floor(self) -> int:
        if self._min_rtt is None:
            return 0
        return int(BDP_GAIN * self.bandwidth * self._min_rtt)

    def _reduce(self, now: float) -> None:
        self._recovery_start = now
        self.congestion_window = max(
            self._floor(), int(self.congestion_window * LOSS_REDUCTION), self._bdp_floor()
        )
        self.ssthresh = self.congestion_window

    def _end_round(self, now: float) -> None:
        start = self._round_start_time
        if start is not None and now > start:
            rate = (self._delivered - self._round_start_delivered) / (now - start)
            self._bandwidths.append(rate)
            sent, lost = self._round_sent, self._round_lost
            if sent and lost / sent > HEAVY_LOSS:
                # a queue overflowing, whatever the RTT says: back off, forget the old rates
                self._bandwidths.clear()
                self._bandwidths.append(rate * LOSS_REDUCTION)
                self._recovery_start = now
                self.congestion_window = max(
                    self._floor(), int(self.congestion_window * LOSS_REDUCTION)
                )
                self.ssthresh = self.congestion_window
        self._round_start_time = now
        self._round_start_delivered = self._delivered
        self._round_sent = self._round_lost = 0

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._delivered += packet.sent_bytes
        if self._round_start_time is None or (packet.sent_time or 0.0) >= self._round_start_time:
            self._end_round(now)
        if (packet.sent_time or 0.0) <= self._recovery_start:
            return  # no growth for what was in flight when the window was cut
        if self.ssthresh is None or self.congestion_window < self.ssthresh:
            self.congestion_window += packet.sent_bytes  # slow start
        else:
            self._stash += packet.sent_bytes
            step = int(self._stash * GROWTH)
            if step >= self._max_datagram_size:
                self._stash = 0
                self.congestion_window += step

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        self.bytes_in_flight += packet.sent_bytes
        self._round_sent += 1

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        largest_sent = 0.0
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._round_lost += 1
            largest_sent = max(largest_sent, packet.sent_time or 0.0)
        if largest_sent <= self._recovery_start:
            return  # one loss event per window
        if not self._bandwidths or (
            self._bdp_floor() >= RANDOM_LOSS_FLOOR * self.congestion_window
        ):
            # no standing queue: random loss, not congestion (before the first round's rate
            # is known, heavy loss in that round still backs off)
            return
        self._reduce(now)

    def on_persistent_congestion(self) -> None:
        self.congestion_window = self._floor()
        self._recovery_start = 0.0
        self._bandwidths.clear()

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        min_rtt = self._min_rtt
        if min_rtt is None or rtt <= min_rtt or now - self._min_rtt_at > MIN_RTT_WINDOW:
            self._min_rtt = rtt
            self._min_rtt_at = now
        if self.ssthresh is None and self._rtt_monitor.is_rtt_increasing(now=now, rtt=rtt):
            self.ssthresh = self.congestion_window


register_congestion_control(NAME, BdpCongestionControl)
