"""When a qh3 connection sends its datagrams twice (RedundancyCore), fed counters and times."""

import pytest

from latticaray.mesh.transport.quic_redundancy import WINDOW_PACKETS, RedundancyCore

RTT = 0.04


def core(**kw) -> RedundancyCore:
    args = {"on_rate": 0.001, "max_rate": 0.1, "min_losses": 3, "hold": 30.0, "triple_rate": 0.01}
    args.update(kw)
    return RedundancyCore(**args)


class Sender:
    """Feeds a core windows of sent packets and the loss count the library would report."""

    def __init__(self, r: RedundancyCore) -> None:
        self.r, self.now, self.lost = r, 0.0, 0
        r.update(self.now, self.lost, RTT)  # the first reading opens the first window

    def window(self, lost: int, rtt: float = RTT, packets: int = WINDOW_PACKETS) -> bool:
        """0.2 s of sending: ``packets`` datagrams, ``lost`` of them declared lost, then the
        reading the next transmit makes."""
        self.r.sent(packets)
        self.lost += lost
        self.now += 0.2
        return self.r.update(self.now, self.lost, rtt)


def test_a_clean_path_never_gets_copies():
    s = Sender(core())
    for _ in range(20):
        assert not s.window(lost=0)
    assert not s.r.on and s.r.turned_on == 0


def test_random_loss_turns_copies_on_and_they_stay_on_while_losses_recur():
    s = Sender(core())
    assert not s.window(lost=2)  # 0.5 %, but fewer losses than min_losses
    assert s.window(lost=3)  # 0.75 %: random loss, no queue
    for _ in range(10):
        assert s.window(lost=1)  # the few losses copies do not hide keep them on
    assert s.r.turned_on == 1


def test_fewer_losses_than_the_minimum_or_below_the_rate_leave_copies_off():
    s = Sender(core(min_losses=3))
    for _ in range(5):
        assert not s.window(lost=2)
    s = Sender(core(on_rate=0.01))  # 3 of 400 = 0.75 % < 1 %
    for _ in range(5):
        assert not s.window(lost=3)


def test_heavy_loss_reads_as_congestion_and_turns_copies_off():
    s = Sender(core())
    assert s.window(lost=4)  # 1 %: random loss
    assert not s.window(lost=WINDOW_PACKETS // 5)  # 20 %: an overflowing queue
    assert not s.r.on


def test_a_queue_in_the_rtt_suspends_copies_until_it_drains():
    s = Sender(core())
    assert s.window(lost=4)
    assert not s.window(lost=0, rtt=RTT * 2)  # a standing queue: the core must see losses
    assert s.r.on  # still wanted: the loss looked random
    assert s.window(lost=0, rtt=RTT)


def test_copies_stop_after_hold_seconds_without_a_loss_and_come_back_with_loss():
    s = Sender(core(hold=1.0))
    assert s.window(lost=4)
    for _ in range(4):  # 0.8 s without a loss
        assert s.window(lost=0)
    for _ in range(2):
        s.window(lost=0)
    assert not s.r.on  # more than 1 s quiet
    assert s.window(lost=4) and s.r.turned_on == 2


def test_copies_follow_the_next_original_and_handshake_datagrams_go_once():
    r = core()
    addr = ("198.18.0.11", 4001)
    short = [(bytes([0x40, i]), addr) for i in range(3)]
    long_header = (b"\xc0\x00", addr)
    out = r.with_copies([*short, long_header])
    assert out == [short[0], short[1], short[0], short[2], short[1], long_header, short[2]]
    assert r.copies_sent == 3
    assert r.with_copies([short[0]]) == [short[0], short[0]]
    assert r.with_copies([]) == []


def test_only_datagrams_to_the_validated_address_get_copies():
    r = core()
    r.path = ("198.18.0.11", 4001)
    here = (b"\x40\x01", r.path)
    moved = (b"\x40\x02", ("198.18.0.11", 5555))  # the peer's new, unvalidated address
    assert r.with_copies([here, moved]) == [here, moved, here]


@pytest.mark.parametrize(
    "kw",
    [
        {"on_rate": 0.0},
        {"on_rate": 0.2, "max_rate": 0.1},
        {"max_rate": 1.5},
        {"min_losses": 0},
        {"hold": 0.0},
        {"triple_rate": 0.0},
    ],
)
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError, match="need"):
        core(**kw)


def test_one_percent_loss_gets_two_copies_and_losses_past_one_copy_add_the_second():
    s = Sender(core())
    assert s.window(lost=4) and s.r.extra == 2  # 1 %: p**2 would still cut CUBIC often
    s = Sender(core())
    assert s.window(lost=3) and s.r.extra == 1  # 0.75 %
    s.window(lost=1)
    s.window(lost=1)
    assert s.r.extra == 1
    s.window(lost=1)  # 3 losses in 1,200 got past one copy: ~(5 %)**2, the path is worse
    assert s.r.extra == 2
    s.window(lost=WINDOW_PACKETS // 5)
    assert not s.r.on
    for _ in range(200):  # 40 s quiet: off, and the next time starts again at one copy
        s.window(lost=0)
    assert s.window(lost=3) and s.r.extra == 1


def test_a_connection_started_with_copies_sends_them_at_once_and_stops_when_quiet():
    s = Sender(core(start_on=True, hold=1.0))
    assert s.r.duplicating and s.r.turned_on == 1
    assert s.window(lost=0)
    for _ in range(5):
        s.window(lost=0)
    assert not s.r.on


def test_two_copies_follow_the_next_two_originals():
    r = core()
    r.extra = 2
    addr = ("198.18.0.11", 4001)
    d = [(bytes([0x40, i]), addr) for i in range(4)]
    out = r.with_copies(d)
    assert out == [d[0], d[1], d[0], d[2], d[1], d[0], d[3], d[2], d[1], d[2], d[3], d[3]]
    assert r.copies_sent == 8
    assert r.with_copies([d[0]]) == [d[0], d[0], d[0]]
