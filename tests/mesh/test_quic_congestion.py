"""The loss-tolerant congestion controller, fed packets and times (no network)."""

from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

from latticaray.mesh.transport.quic_congestion import BdpCongestionControl

MDS = 1472
RTT = 0.05


class Path:
    """A sender on a path of fixed capacity: every round it sends a window and the acks come
    back one RTT (plus ``queue_delay``) later; ``lose`` picks packets to drop."""

    def __init__(self, cc: BdpCongestionControl, capacity: int) -> None:
        self.cc, self.capacity, self.now, self.pn = cc, capacity, 0.0, 0

    def round(self, lose=lambda i: False, queue_delay=0.0) -> None:
        cc = self.cc
        count = max(1, min(cc.congestion_window, self.capacity) // MDS)
        packets = []
        for i in range(count):
            packet = QuicSentPacket(
                epoch=Epoch.ONE_RTT,
                in_flight=True,
                is_ack_eliciting=True,
                is_crypto_packet=False,
                packet_number=self.pn,
                packet_type=QuicPacketType.ONE_RTT,
                sent_time=self.now + i * RTT / count / 4,
                sent_bytes=MDS,
            )
            self.pn += 1
            cc.on_packet_sent(packet=packet)
            packets.append(packet)
        self.now += RTT + queue_delay
        lost = [p for i, p in enumerate(packets) if lose(i)]
        for i, packet in enumerate(packets):
            if packet not in lost:
                at = self.now + i * RTT / count / 4
                cc.on_rtt_measurement(now=at, rtt=RTT + queue_delay)
                cc.on_packet_acked(now=at, packet=packet)
        if lost:
            cc.on_packets_lost(now=self.now, packets=lost)


def test_random_loss_on_a_path_without_a_queue_leaves_the_window_growing():
    cc = BdpCongestionControl(max_datagram_size=MDS)
    path = Path(cc, capacity=4 << 20)
    for n in range(40):
        path.round(lose=lambda i, n=n: i == 3)  # one loss every round: ~0.5-5 %
    # Reno would halve every round and sit at a few datagrams; this one keeps the BDP
    assert cc.congestion_window >= 2 << 20, cc.congestion_window


def _steady(rounds: int = 20) -> tuple[BdpCongestionControl, Path]:
    """A controller that has run ``rounds`` loss-free rounds on a 1 MiB-per-round path."""
    cc = BdpCongestionControl(max_datagram_size=MDS)
    path = Path(cc, capacity=1 << 20)
    for _ in range(rounds):
        path.round()
    return cc, path


def test_loss_with_the_rtt_inflated_by_a_queue_halves_the_window():
    cc, path = _steady()
    before = cc.congestion_window
    path.round(lose=lambda i: i == 0, queue_delay=4 * RTT)  # a standing queue
    assert cc.congestion_window <= before * 0.75


def test_heavy_loss_in_a_round_backs_off_whatever_the_rtt():
    cc, path = _steady()
    before = cc.congestion_window
    path.round(lose=lambda i: i % 3 == 0)  # a third lost
    path.round()
    assert cc.congestion_window <= before * 0.75


def test_past_slow_start_the_window_grows_by_a_share_per_round_not_a_datagram():
    cc = BdpCongestionControl(max_datagram_size=MDS)
    cc.ssthresh = cc.congestion_window = 64 * MDS  # congestion avoidance from here
    path = Path(cc, capacity=1 << 30)
    for _ in range(10):
        path.round()
    # Reno: +1 datagram per round (74 datagrams); this: ~x1.12 per round
    assert cc.congestion_window >= 64 * MDS * 2.5


def test_persistent_congestion_collapses_the_window():
    cc, _ = _steady(10)
    cc.on_persistent_congestion()
    assert cc.congestion_window == 2 * MDS and cc.bandwidth == 0.0
