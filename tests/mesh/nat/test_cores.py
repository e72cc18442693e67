"""Unit tests of the sans-I/O NAT cores: AutoNAT, NAT type, relay, hole punch, birthday, rendezvous."""

import itertools
import random

import msgpack
import pytest

from latticaray.mesh.nat import autonat, birthday, holepunch, relay, rendezvous, wire
from latticaray.mesh.nat.addresses import LAB_PUBLIC_RANGES, AddressPolicy, check_endpoint
from latticaray.mesh.nat.autonat import (
    AutoNatClientConfig,
    AutoNatClientCore,
    AutoNatServerConfig,
    AutoNatServerCore,
    Reachability,
)
from latticaray.mesh.nat.errors import (
    MALFORMED,
    NO_RESERVATION,
    PERMISSION_DENIED,
    RATE_LIMITED,
    RESOURCE_LIMIT_EXCEEDED,
    CircuitLimitExceeded,
    DialBackRefused,
    ForgedDialBack,
    MalformedMessage,
    RelayRefused,
    RendezvousRefused,
)
from latticaray.mesh.nat.holepunch import (
    GiveUp,
    HolePunchConfig,
    HolePunchSession,
    PunchMode,
    PunchSucceeded,
    Role,
    SendMessage,
    StartPunch,
)
from latticaray.mesh.nat.nattype import NatType, NatTypeDetector

LAB = AddressPolicy(treat_as_public=LAB_PUBLIC_RANGES)


def counter_bytes():
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


# ------------------------------------------------------------------------------ addresses
def test_address_policy_treats_lab_range_as_public_only_by_configuration():
    assert not AddressPolicy().is_public("198.18.0.11")
    assert LAB.is_public("198.18.0.11") and LAB.is_public("198.19.1.10")
    assert not LAB.is_public("10.0.0.1") and not LAB.is_public("127.0.0.1")
    assert AddressPolicy(allow_loopback=True).is_public("127.0.0.1")
    assert AddressPolicy().is_public("1.1.1.1")
    assert not LAB.is_public("not an ip")


@pytest.mark.parametrize(
    "bad",
    [None, ["1.2.3.4"], ["1.2.3.4", 0], ["1.2.3.4", 70000], ["x", 5], [1, 2], ["1.2.3.4", True]],
)
def test_check_endpoint_rejects_bad_input(bad):
    with pytest.raises(MalformedMessage):
        check_endpoint(bad)


def test_wire_decode_bounds_and_types():
    with pytest.raises(MalformedMessage, match="exceeds"):
        wire.decode(b"\x80" * 9000)
    with pytest.raises(MalformedMessage):
        wire.decode(b"\xc1garbage")
    with pytest.raises(MalformedMessage, match="'t'"):
        wire.decode(msgpack.packb([1, 2]))
    assert wire.decode(wire.encode("ping", x=1))["t"] == "ping"


# ------------------------------------------------------------------------------ AutoNAT
def run_autonat_round(client, servers, now, reachable, observed_ip="198.18.0.101"):
    """Drive one round: each server plans dial-backs; ``reachable(server, endpoint)`` decides delivery."""
    probes = client.probes_due(now, [(name, ip) for name, ip, _ in servers])
    for probe in probes:
        server = next(s for name, _, s in servers if name == probe.server)
        server_ip = next(ip for name, ip, _ in servers if name == probe.server)
        plan = server.handle_request((observed_ip, 40000), wire.decode(probe.request), now)
        client.on_response(probe.server, wire.decode(plan.response()), now + 0.01)
        for db in plan.dial_backs:
            if reachable(probe.server, db.endpoint):
                client.on_dial_back(
                    wire.decode(autonat.encode_dial_back(db.nonce)), (server_ip, 5555), now + 0.02
                )
    client.tick(now + 10.0)
    return probes


def make_servers():
    return [
        ("pub1", "198.18.0.11", AutoNatServerCore(policy=LAB)),
        ("pub2", "198.18.0.12", AutoNatServerCore(policy=LAB)),
    ]


def test_autonat_classifies_public_and_private_addresses():
    client = AutoNatClientCore(policy=LAB)
    public_ep, private_ep = ("198.18.0.101", 4001), ("198.18.0.101", 4002)
    client.add_candidate(public_ep, 0.0)
    client.add_candidate(private_ep, 0.0)
    run_autonat_round(client, make_servers(), 0.0, lambda s, ep: ep == public_ep)
    assert client.status(public_ep) is Reachability.PUBLIC
    assert client.status(private_ep) is Reachability.PRIVATE
    assert client.reachability() is Reachability.PUBLIC
    assert client.public_addresses() == [public_ep]
    only_private = AutoNatClientCore(policy=LAB)
    only_private.add_candidate(private_ep, 0.0)
    only_private.add_candidate(("198.19.1.10", 4001), 0.0)  # a LAN address: servers refuse it
    run_autonat_round(only_private, make_servers(), 0.0, lambda s, ep: False)
    assert only_private.status(("198.19.1.10", 4001)) is Reachability.UNKNOWN
    assert only_private.reachability() is Reachability.PRIVATE


def test_autonat_one_vote_is_not_enough_and_rechecks_over_time():
    cfg = AutoNatClientConfig(recheck_unknown=5.0, recheck_public=50.0)
    client = AutoNatClientCore(cfg, policy=LAB)
    ep = ("198.18.0.101", 4001)
    client.add_candidate(ep, 0.0)
    run_autonat_round(client, make_servers()[:1], 0.0, lambda s, e: True)
    assert client.status(ep) is Reachability.UNKNOWN  # one server only
    assert client.probes_due(1.0, [("pub1", "198.18.0.11")]) == []  # not due yet
    run_autonat_round(client, make_servers(), 20.0, lambda s, e: True)
    assert client.status(ep) is Reachability.PUBLIC
    # the mapping goes away: re-check flips it to private
    run_autonat_round(client, make_servers(), 100.0, lambda s, e: False)
    assert client.status(ep) is Reachability.PRIVATE


def test_autonat_server_refusing_gives_no_vote():
    client = AutoNatClientCore(policy=LAB)
    ep = ("198.18.0.101", 4001)
    client.add_candidate(ep, 0.0)
    probes = client.probes_due(0.0, [("pub1", "198.18.0.11"), ("pub2", "198.18.0.12")])
    for probe in probes:
        client.on_refused(probe.server, probe.probe_id, 0.1)
    assert client.status(ep) is Reachability.UNKNOWN


def test_autonat_forged_nonce_is_refused():
    client = AutoNatClientCore(policy=LAB, random_bytes=counter_bytes())
    client.add_candidate(("198.18.0.101", 4001), 0.0)
    probe = client.probes_due(0.0, [("pub1", "198.18.0.11")])[0]
    forged = wire.decode(autonat.encode_dial_back(b"\x99" * 16))
    with pytest.raises(ForgedDialBack, match="never issued"):
        client.on_dial_back(forged, ("198.18.0.11", 1), 0.1)
    real_nonce = probe.entries[0][1]
    # right nonce, wrong source IP: someone who sniffed the nonce cannot confirm from elsewhere
    with pytest.raises(ForgedDialBack, match="not from the server"):
        client.on_dial_back(
            wire.decode(autonat.encode_dial_back(real_nonce)), ("198.18.0.66", 1), 0.1
        )
    assert client.on_dial_back(
        wire.decode(autonat.encode_dial_back(real_nonce)), ("198.18.0.11", 9), 0.2
    ) == ("198.18.0.101", 4001)
    with pytest.raises(ForgedDialBack):  # replay of a used nonce
        client.on_dial_back(
            wire.decode(autonat.encode_dial_back(real_nonce)), ("198.18.0.11", 9), 0.3
        )
    assert client.forged == 3
    with pytest.raises(MalformedMessage):
        client.on_dial_back({"t": "dial_back", "n": b"short"}, ("198.18.0.11", 9), 0.3)


def test_autonat_server_dials_only_the_requesters_observed_ip_and_rate_limits():
    server = AutoNatServerCore(AutoNatServerConfig(per_ip_burst=2, per_ip_rate=0.1), policy=LAB)
    nonce = b"n" * 16
    req = autonat.encode_dial_request(
        7,
        [
            (("198.18.0.101", 4001), nonce),
            (("198.18.0.12", 53), nonce),  # a victim
            (("10.0.0.5", 4001), nonce),
        ],
    )
    plan = server.handle_request(("198.18.0.101", 999), wire.decode(req), 0.0)
    assert [db.endpoint for db in plan.dial_backs] == [("198.18.0.101", 4001)]
    assert plan.statuses == [autonat.DIALED, PERMISSION_DENIED, PERMISSION_DENIED]
    server.handle_request(("198.18.0.101", 999), wire.decode(req), 0.1)
    with pytest.raises(DialBackRefused) as info:
        server.handle_request(("198.18.0.101", 999), wire.decode(req), 0.2)
    assert info.value.code == RATE_LIMITED
    # another requester IP has its own bucket; the first one refills with time
    server.handle_request(("198.18.0.102", 999), wire.decode(req), 0.3)
    server.handle_request(("198.18.0.101", 999), wire.decode(req), 20.0)


def test_autonat_server_rejects_malformed_requests():
    server = AutoNatServerCore(AutoNatServerConfig(max_addrs_per_request=2), policy=LAB)
    too_many = autonat.encode_dial_request(
        1, [(("198.18.0.101", p), b"n" * 16) for p in range(1, 5)]
    )
    with pytest.raises(MalformedMessage):
        server.handle_request(("198.18.0.101", 1), wire.decode(too_many), 0.0)
    with pytest.raises(MalformedMessage, match="nonce"):
        server.handle_request(
            ("198.18.0.101", 1),
            {"t": "dial", "id": 1, "a": [["198.18.0.101", 4]], "n": [b"x"]},
            0.0,
        )


# ------------------------------------------------------------------------------ NAT type
def test_nat_type_detection():
    cone = NatTypeDetector([("198.19.1.10", 4001)])
    cone.observe(("198.18.0.11", 3478), ("198.18.0.101", 4001), 0.0)
    assert cone.report(0.0).nat_type is NatType.UNKNOWN
    cone.observe(("198.18.0.12", 3478), ("198.18.0.101", 4001), 0.0)
    report = cone.report(0.0)
    assert report.nat_type is NatType.ENDPOINT_INDEPENDENT and report.port_preserving
    assert report.public_ip == "198.18.0.101"

    sym = NatTypeDetector([("198.19.3.10", 4001)])
    sym.observe(("198.18.0.11", 3478), ("198.18.0.103", 31337), 0.0)
    sym.observe(("198.18.0.12", 3478), ("198.18.0.103", 5123), 0.0)
    assert sym.report(0.0).nat_type is NatType.ENDPOINT_DEPENDENT
    assert sym.report(0.0).port_preserving is False
    assert sym.report(10_000.0).nat_type is NatType.UNKNOWN  # observations aged out

    public = NatTypeDetector([("198.18.0.31", 4001)])
    public.observe(("198.18.0.11", 3478), ("198.18.0.31", 4001), 0.0)
    assert public.report(0.0).nat_type is NatType.NO_NAT


def test_nat_type_from_one_observer_and_its_alternate_port():
    """A single public node still classifies the NAT: its main and alternate port are two
    destinations; a repeat from the same endpoint is not a second observer."""
    sym = NatTypeDetector([("198.19.3.10", 4001)])
    sym.observe(("198.18.0.11", 4001), ("198.18.0.103", 31337), 0.0)
    sym.observe(("198.18.0.11", 4001), ("198.18.0.103", 31337), 1.0)
    assert sym.report(1.0).nat_type is NatType.UNKNOWN and sym.report(1.0).observers == 1
    sym.observe(("198.18.0.11", 40123), ("198.18.0.103", 5123), 1.0)
    assert sym.report(1.0).nat_type is NatType.ENDPOINT_DEPENDENT

    cone = NatTypeDetector([("198.19.1.10", 4001)])
    cone.observe(("198.18.0.11", 4001), ("198.18.0.101", 4001), 0.0)
    cone.observe(("198.18.0.11", 40123), ("198.18.0.101", 4001), 0.0)
    assert cone.report(0.0).nat_type is NatType.ENDPOINT_INDEPENDENT


# ------------------------------------------------------------------------------ relay
def test_relay_reservations_and_circuits_with_limits():
    svc = relay.RelayCore(
        relay.RelayConfig(
            max_reservations=2,
            max_reservations_per_ip=1,
            reservation_ttl=60,
            max_circuits_per_peer=1,
            circuit_max_bytes=1000,
        )
    )
    svc.reserve("A", "198.18.0.101", False, 0.0)
    svc.reserve("A", "198.18.0.101", False, 1.0)  # renewal takes no new slot
    with pytest.raises(RelayRefused) as info:
        svc.reserve("A2", "198.18.0.101", False, 1.0)  # per-IP limit
    assert info.value.code == RESOURCE_LIMIT_EXCEEDED
    svc.reserve("B", "198.18.0.102", False, 1.0)
    with pytest.raises(RelayRefused, match="slots") as info:
        svc.reserve("C", "198.18.0.103", False, 1.0)
    assert info.value.code == RESOURCE_LIMIT_EXCEEDED

    circuit = svc.open_circuit("X", "A", False, 2.0)
    with pytest.raises(RelayRefused) as info:
        svc.accept_circuit(circuit.circuit_id, "B", 2.0)  # only the target may accept
    assert info.value.code == PERMISSION_DENIED
    svc.accept_circuit(circuit.circuit_id, "A", 2.0)
    with pytest.raises(RelayRefused) as info:
        svc.open_circuit("Y", "A", False, 2.0)  # A has its one circuit
    assert info.value.code == RESOURCE_LIMIT_EXCEEDED
    assert svc.account(circuit.circuit_id, 600, 3.0) == 400
    with pytest.raises(CircuitLimitExceeded, match="1000-byte"):
        svc.account(circuit.circuit_id, 600, 3.0)
    assert circuit.circuit_id not in svc.circuits

    with pytest.raises(RelayRefused) as info:
        svc.open_circuit("X", "nobody", False, 4.0)
    assert info.value.code == NO_RESERVATION
    assert svc.expire(100.0)[0] == ["A", "B"]  # reservations expire
    with pytest.raises(RelayRefused) as info:
        svc.open_circuit("X", "A", False, 100.0)
    assert info.value.code == NO_RESERVATION


def test_relay_refuses_unauthorized_and_chained_hops():
    svc = relay.RelayCore(
        relay.RelayConfig(allowed_peers=frozenset({"A", "X"}), denied_peers=frozenset({"X"}))
    )
    svc.reserve("A", "198.18.0.101", False, 0.0)
    for src in ("X", "Z"):
        with pytest.raises(RelayRefused, match="not allowed") as info:
            svc.open_circuit(src, "A", False, 0.0)
        assert info.value.code == PERMISSION_DENIED
    with pytest.raises(RelayRefused, match="relayed hops") as info:
        svc.open_circuit("A", "A2", True, 0.0)
    assert info.value.code == PERMISSION_DENIED
    with pytest.raises(RelayRefused, match="do not chain"):
        svc.reserve("A", "198.18.0.101", True, 0.0)
    with pytest.raises(RelayRefused) as info:
        svc.open_circuit("A", "A", False, 0.0)
    assert info.value.code == MALFORMED
    assert svc.refusals[PERMISSION_DENIED] == 4


def test_relay_requests_are_rate_limited_per_peer_and_per_ip_and_circuits_per_ip():
    svc = relay.RelayCore(
        relay.RelayConfig(
            requests_per_peer_rate=0.01,
            requests_per_peer_burst=3,
            requests_per_ip_rate=0.01,
            requests_per_ip_burst=6,
            max_circuits_per_ip=2,
            max_circuits_per_peer=10,
        )
    )
    svc.reserve("A", "198.18.0.101", False, 0.0)
    for _ in range(2):
        svc.reserve("A", "198.18.0.101", False, 0.0)  # renewals count too
    with pytest.raises(RelayRefused, match="peer A sends requests too fast") as info:
        svc.reserve("A", "198.18.0.101", False, 0.0)
    assert info.value.code == RATE_LIMITED
    # another peer from another IP is not held back by A
    svc.reserve("B", "198.18.0.102", False, 0.0)
    # circuits: at most 2 from one source IP, whichever peers ask from it
    svc.open_circuit("X", "A", False, 0.0, "198.18.0.103")
    svc.open_circuit("Y", "A", False, 0.0, "198.18.0.103")
    with pytest.raises(RelayRefused, match=r"198\.18\.0\.103 already has 2 circuits") as info:
        svc.open_circuit("Z", "B", False, 0.0, "198.18.0.103")
    assert info.value.code == RESOURCE_LIMIT_EXCEEDED
    # many peers behind one IP share its request budget (6): X, Y and Z spent 3, W spends 3
    for _ in range(3):
        with pytest.raises(RelayRefused):  # over the circuit limit, yet the request is counted
            svc.open_circuit("W", "B", False, 0.0, "198.18.0.103")
    with pytest.raises(RelayRefused, match=r"198\.18\.0\.103 sends requests too fast") as info:
        svc.open_circuit("V", "B", False, 0.0, "198.18.0.103")
    assert info.value.code == RATE_LIMITED
    # the buckets refill with time
    svc.reserve("A", "198.18.0.101", False, 200.0)
    assert svc.refusals[RATE_LIMITED] == 2


def test_relay_circuit_duration_limit():
    svc = relay.RelayCore(relay.RelayConfig(circuit_max_duration=10))
    svc.reserve("A", "ip", False, 0.0)
    c = svc.open_circuit("B", "A", False, 0.0)
    with pytest.raises(CircuitLimitExceeded, match="duration"):
        svc.account(c.circuit_id, 1, 11.0)


def test_relay_status_messages():
    err = RelayRefused(NO_RESERVATION, "nope")
    with pytest.raises(RelayRefused) as info:
        relay.check_status(wire.decode(relay.connect_refused(err)), "connect_resp")
    assert info.value.code == NO_RESERVATION
    with pytest.raises(RelayRefused, match="expected"):
        relay.check_status({"t": "other"}, "connect_resp")


# ------------------------------------------------------------------------------ hole punching
def exchange(init, resp, now=0.0, rtt=0.1):
    actions = init.start(now)
    data = actions[0].data
    reply = resp.on_message(data, now + rtt / 2)
    return init.on_message(reply[0].data, now + rtt), resp


def test_dcutr_synchronizes_punch_after_rtt_half():
    init = HolePunchSession(Role.INITIATOR, [("198.18.0.101", 4001)], NatType.ENDPOINT_INDEPENDENT)
    resp = HolePunchSession(Role.RESPONDER, [("198.18.0.102", 4001)], NatType.ENDPOINT_INDEPENDENT)
    actions, resp = exchange(init, resp)
    sync, punch = actions
    assert isinstance(punch, StartPunch) and punch.mode is PunchMode.DIRECT
    assert punch.at == pytest.approx(0.15) and init.rtt == pytest.approx(0.1)
    assert punch.remote_addrs == (("198.18.0.102", 4001),)
    r_actions = resp.on_message(sync.data, 0.15)
    assert (
        r_actions[0].remote_addrs == (("198.18.0.101", 4001),) and r_actions[0].token == punch.token
    )
    assert init.on_punch_result(1, ("198.18.0.102", 4001), 0.5) == [
        PunchSucceeded(1, ("198.18.0.102", 4001))
    ]
    assert init.done


def test_dcutr_public_side_is_dialed_by_the_other():
    init = HolePunchSession(
        Role.INITIATOR, [("198.18.0.12", 4001)], NatType.NO_NAT, our_public=True
    )
    resp = HolePunchSession(Role.RESPONDER, [("198.18.0.103", 7)], NatType.ENDPOINT_DEPENDENT)
    (sync, punch), resp = exchange(init, resp)
    assert punch.mode is PunchMode.AWAIT
    assert resp.on_message(sync.data, 0.2)[0].mode is PunchMode.DIAL


def test_dcutr_retries_three_times_then_gives_up():
    init = HolePunchSession(
        Role.INITIATOR,
        [("198.18.0.101", 4001)],
        NatType.ENDPOINT_INDEPENDENT,
        HolePunchConfig(max_attempts=3, retry_delay=1.0),
    )
    resp = HolePunchSession(Role.RESPONDER, [("198.18.0.102", 4001)], NatType.ENDPOINT_INDEPENDENT)
    now = 0.0
    actions = init.start(now)
    for attempt in (1, 2, 3):
        reply = resp.on_message(actions[0].data, now)
        sync, punch = init.on_message(reply[0].data, now)
        assert punch.attempt == attempt
        resp.on_message(sync.data, now)
        result = init.on_punch_result(attempt, None, now + 1)
        resp.on_punch_result(attempt, None, now + 1)
        if attempt < 3:
            assert result == []
            now += 2.5
            actions = init.tick(now)
            assert isinstance(actions[0], SendMessage)
        else:
            assert isinstance(result[0], GiveUp) and "3 attempts" in result[0].reason


def test_dcutr_modes_and_refusals():
    assert (
        holepunch.choose_mode(NatType.ENDPOINT_INDEPENDENT, NatType.ENDPOINT_DEPENDENT)
        is PunchMode.BIRTHDAY_EASY
    )
    assert (
        holepunch.choose_mode(NatType.ENDPOINT_DEPENDENT, NatType.NO_NAT) is PunchMode.BIRTHDAY_HARD
    )
    assert (
        holepunch.choose_mode(NatType.ENDPOINT_DEPENDENT, NatType.NO_NAT, False, True)
        is PunchMode.DIAL
    )
    assert (
        holepunch.choose_mode(NatType.NO_NAT, NatType.ENDPOINT_DEPENDENT, True, False)
        is PunchMode.AWAIT
    )
    sym = NatType.ENDPOINT_DEPENDENT
    init = HolePunchSession(Role.INITIATOR, [("198.18.0.103", 1)], sym)
    resp = HolePunchSession(Role.RESPONDER, [("198.18.0.104", 1)], sym)
    actions, _ = exchange(init, resp)
    assert isinstance(actions[-1], GiveUp) and "symmetric" in actions[-1].reason
    disabled = HolePunchSession(Role.RESPONDER, [], NatType.UNKNOWN, HolePunchConfig(enabled=False))
    init2 = HolePunchSession(Role.INITIATOR, [("198.18.0.101", 1)], NatType.ENDPOINT_INDEPENDENT)
    out = disabled.on_message(init2.start(0.0)[0].data, 0.0)
    assert isinstance(out[-1], GiveUp)
    assert isinstance(init2.on_message(out[0].data, 0.1)[0], GiveUp)
    with pytest.raises(MalformedMessage):
        init2.on_message(
            wire.encode("hp_connect", a=[["1.2.3.4", 5]], nat="weird", tok=b"x" * 16, n=1), 0
        )
    with pytest.raises(MalformedMessage):
        HolePunchSession(Role.RESPONDER, [], NatType.UNKNOWN).on_message(
            wire.encode("hp_sync", n=1), 0
        )


def test_dcutr_responder_timeout_gives_up():
    resp = HolePunchSession(Role.RESPONDER, [], NatType.ENDPOINT_INDEPENDENT)
    init = HolePunchSession(Role.INITIATOR, [("198.18.0.1", 1)], NatType.ENDPOINT_INDEPENDENT)
    resp.on_message(init.start(0.0)[0].data, 0.0)
    assert resp.tick(1.0) == []
    assert isinstance(resp.tick(100.0)[0], GiveUp)


# ------------------------------------------------------------------------------ birthday
def test_birthday_probability_and_planner_bounds():
    assert birthday.success_probability(256, 2048) > 0.999
    assert 0.3 < birthday.success_probability(64, 512) < 0.5
    cfg = birthday.BirthdayConfig(max_probes=500, probe_rate=1000.0, time_budget=2.0)
    prober = birthday.EasySideProber(cfg, 10.0, random.Random(1))
    first = prober.next_batch(10.0)
    assert len(first) == 1
    batch = prober.next_batch(10.1)
    assert len(batch) == 100 and len(set(first + batch)) == 101
    assert all(cfg.port_lo <= p <= cfg.port_hi for p in batch)
    assert len(prober.next_batch(11.9)) == 399 and prober.next_batch(11.95) == []  # count bound
    assert prober.finished(11.95)
    assert prober.on_reply(batch[0]) and prober.hit_port == batch[0]
    timed = birthday.EasySideProber(cfg, 0.0, random.Random(2))
    assert timed.next_batch(2.0) == [] and timed.finished(2.0)  # time bound
    hard = birthday.HardSidePlan(cfg, 0.0)
    assert hard.sends_due(0.0) and not hard.sends_due(0.1) and hard.sends_due(0.5)
    assert not hard.sends_due(2.0) and hard.finished(2.0)
    with pytest.raises(ValueError):
        birthday.BirthdayConfig(hard_sockets=5000)


def test_birthday_simulated_against_random_mappings():
    """Model a symmetric NAT as random ports; the planner finds one in most trials."""
    rng = random.Random(7)
    cfg = birthday.BirthdayConfig(
        hard_sockets=128, max_probes=2048, probe_rate=1e6, time_budget=1.0
    )
    wins = 0
    for trial in range(20):
        mappings = set(rng.sample(range(cfg.port_lo, cfg.port_hi + 1), cfg.hard_sockets))
        prober = birthday.EasySideProber(cfg, 0.0, random.Random(trial))
        for port in prober.next_batch(0.9):
            if port in mappings and prober.on_reply(port):
                wins += 1
                break
    assert wins >= 18  # expected P = 0.98


# ------------------------------------------------------------------------------ rendezvous
def test_rendezvous_register_discover_expire_and_limits():
    rv = rendezvous.RendezvousCore(
        rendezvous.RendezvousConfig(max_registrations_per_peer=1, max_registrations_per_namespace=2)
    )
    rv.register("A", "ns", ["/ip4/198.18.0.101/udp/1/quic-v1"], 60, 0.0)
    rv.register("B", "ns", ["/ip4/198.18.0.102/udp/1/quic-v1"], 120, 0.0)
    regs, cookie = rv.discover("ns", 10, 0, 1.0)
    assert [r.peer for r in regs] == ["A", "B"]
    assert rv.discover("ns", 10, cookie, 1.0)[0] == []
    with pytest.raises(RendezvousRefused, match="full"):
        rv.register("C", "ns", ["/ip4/1.2.3.4/tcp/1"], 60, 1.0)
    with pytest.raises(RendezvousRefused, match="already holds"):
        rv.register("A", "other", ["/ip4/1.2.3.4/tcp/1"], 60, 1.0)
    with pytest.raises(RendezvousRefused, match="ttl"):
        rv.register("D", "x", ["/ip4/1.2.3.4/tcp/1"], 1e9, 1.0)
    with pytest.raises(RendezvousRefused, match="namespace"):
        rv.register("D", "", ["/ip4/1.2.3.4/tcp/1"], 60, 1.0)
    assert [r.peer for r in rv.discover("ns", 10, 0, 61.0)[0]] == ["B"]  # A expired
    assert len(rv) == 1
    assert rv.unregister("B", "ns") and len(rv) == 0


def test_rendezvous_wire_handles_bad_input_without_raising():
    rv = rendezvous.RendezvousCore()
    ok = wire.decode(
        rv.handle("A", wire.encode("register", ns="lab", addrs=["/ip4/1.2.3.4/tcp/1"], ttl=60), 0.0)
    )
    assert ok["s"] == "OK"
    found = wire.decode(rv.handle("B", wire.encode("discover", ns="lab"), 1.0))
    assert found["regs"][0]["peer"] == "A"
    for bad in (
        b"\xc1",
        wire.encode("register", ns="lab", addrs="x"),
        wire.encode("nope"),
        wire.encode("register", ns="lab", addrs=["/a"], ttl="soon"),
        wire.encode("register", ns="lab", addrs=["no-slash"]),
    ):
        reply = wire.decode(rv.handle("A", bad, 2.0))
        assert reply["t"] == "error" and reply["s"] == MALFORMED


def test_relay_bootstrap_address_parsing():
    from latticaray.mesh.errors import MultiaddrError
    from latticaray.mesh.identity import KeyPair
    from latticaray.mesh.nat.config import parse_relay_addr

    peer = KeyPair.generate().peer_id
    assert parse_relay_addr(f"/ip4/198.18.0.11/tcp/4002/p2p/{peer}") == (peer, "198.18.0.11", 4002)
    with pytest.raises(MultiaddrError):
        parse_relay_addr("/ip4/198.18.0.11/udp/4002/quic-v1")
