"""Sans-I/O RPC bookkeeping: stream credit windows and the deadline queue, without asyncio."""

from __future__ import annotations

import random

import pytest

from latticaray.mesh.errors import ProtocolViolation
from latticaray.mesh.rpcflow import INITIAL_WINDOW, MESSAGE_OVERHEAD, DeadlineQueue, StreamWindow


def test_sender_stops_when_credit_is_spent_and_resumes_on_grant():
    w = StreamWindow(INITIAL_WINDOW, 1 << 20)
    sent = 0
    while w.can_send():
        w.sent(10_000)
        sent += 1
    # the last message may overrun the window once, never more
    assert sent == INITIAL_WINDOW // (10_000 + MESSAGE_OVERHEAD) + 1
    assert not w.can_send()
    w.granted(20_000)
    assert w.can_send()


def test_receiver_grants_back_in_half_window_batches():
    w = StreamWindow(1 << 20, 1 << 20)
    assert w.initial_grant() == (1 << 20) - INITIAL_WINDOW
    grants = []
    for _ in range(25):
        for _ in range(4):
            w.received(64 * 1024)
        for _ in range(4):
            grant = w.consumed(64 * 1024)
            if grant:
                grants.append(grant)
    assert all(g >= (1 << 20) // 2 for g in grants)
    assert sum(grants) <= 100 * (64 * 1024 + MESSAGE_OVERHEAD)
    assert w.unread == 0


def test_receiver_detects_a_peer_ignoring_its_window():
    w = StreamWindow(INITIAL_WINDOW, 64 * 1024)
    with pytest.raises(ProtocolViolation, match="overran"):
        for _ in range(100):
            w.received(32 * 1024)
    assert w.unread > INITIAL_WINDOW + 64 * 1024


def test_window_simulation_memory_bound_holds_for_any_schedule():
    """A sender and a slow receiver under random message sizes and read schedules: unread bytes
    never exceed window + one message, and every byte arrives."""
    rng = random.Random(7)
    max_message = 100_000
    receiver = StreamWindow(512 * 1024, max_message)
    sender_credit = StreamWindow(512 * 1024, max_message)
    sender_credit.granted(receiver.initial_grant())
    queue, total_sent, total_read, peak = [], 0, 0, 0
    for _ in range(20_000):
        if rng.random() < 0.5 and sender_credit.can_send():
            n = rng.randint(0, max_message)
            sender_credit.sent(n)
            receiver.received(n)  # raises if the bound is broken
            queue.append(n)
            total_sent += n
        elif queue and rng.random() < 0.3:
            n = queue.pop(0)
            total_read += n
            grant = receiver.consumed(n)
            if grant:
                sender_credit.granted(grant)
        peak = max(peak, receiver.unread)
    while queue:
        n = queue.pop(0)
        total_read += n
        receiver.consumed(n)
    assert total_read == total_sent > 0
    assert peak <= 512 * 1024 + max_message + MESSAGE_OVERHEAD


def test_deadline_queue_orders_expires_and_compacts():
    q = DeadlineQueue()
    assert q.next_deadline() is None
    assert q.add(10.0, 1, True)
    assert not q.add(12.0, 2, False)
    assert q.add(5.0, 3, True)
    assert q.next_deadline() == 5.0
    assert q.pop_expired(4.9) == []
    assert q.pop_expired(10.0) == [(3, True), (1, True)]
    assert q.next_deadline() == 12.0
    for i in range(10):
        q.add(20.0 + i, 100 + i, True)
    q.compact(outgoing=range(0, 200, 2), incoming=range(0, 200, 2))
    assert len(q) == 6
    assert [c for c, _ in q.pop_expired(100.0)] == [2, 100, 102, 104, 106, 108]
    q.add(1.0, 1, True)
    q.clear()
    assert len(q) == 0
