"""Tests of the discrete-event simulator harness used by every sans-I/O core."""

from latticaray.mesh.sim import Simulator, VirtualNetwork


def test_events_run_in_time_order_and_deterministically():
    order = []
    sim = Simulator(seed=3)
    sim.call_later(2.0, order.append, "b")
    sim.call_later(1.0, order.append, "a")
    h = sim.call_later(1.5, order.append, "cancelled")
    h.cancel()
    sim.run()
    assert order == ["a", "b"]
    assert sim.now == 2.0


def test_network_latency_loss_partition_and_down():
    sim = Simulator(seed=1)
    net = VirtualNetwork(sim, latency=0.05)
    got = []
    for n in ("a", "b", "c"):
        net.attach(n, lambda src, msg, size, n=n: got.append((sim.now, src, n, msg)))
    net.send("a", "b", "hi")
    sim.run()
    assert got == [(0.05, "a", "b", "hi")]
    net.partition([{"a"}, {"b", "c"}])
    assert net.send("a", "b", "x") is False
    net.send("b", "c", "y")
    sim.run()
    net.heal()
    net.set_down("c")
    net.send("a", "c", "z")
    sim.run()
    assert [m for *_, m in got] == ["hi", "y"]
    assert net.stats.messages_dropped == 2  # partitioned "x", and "z" to a down node


def test_run_until_advances_the_clock_past_cancelled_timers():
    sim = Simulator()
    sim.call_later(1.0, lambda: None).cancel()
    sim.run(until=5.0)
    assert sim.now == 5.0
