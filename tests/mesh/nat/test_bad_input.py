"""Bad input never crashes a NAT core: random bytes and random msgpack maps only ever raise NatError."""

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.mesh.nat import relay, wire
from latticaray.mesh.nat.addresses import LAB_PUBLIC_RANGES, AddressPolicy
from latticaray.mesh.nat.autonat import AutoNatClientCore, AutoNatServerCore
from latticaray.mesh.nat.errors import NatError
from latticaray.mesh.nat.holepunch import HolePunchSession, Role
from latticaray.mesh.nat.nattype import NatType
from latticaray.mesh.nat.rendezvous import RendezvousCore

LAB = AddressPolicy(treat_as_public=LAB_PUBLIC_RANGES)

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
messages = st.fixed_dictionaries(
    {
        "t": st.sampled_from(
            [
                "dial",
                "dial_resp",
                "dial_back",
                "hp_connect",
                "hp_sync",
                "hp_refuse",
                "register",
                "discover",
                "unregister",
                "reserve_resp",
                "connect_resp",
                "x",
            ]
        )
    },
    optional=dict.fromkeys(
        (
            "id",
            "a",
            "n",
            "r",
            "tok",
            "nat",
            "pub",
            "ns",
            "addrs",
            "ttl",
            "limit",
            "cookie",
            "s",
            "m",
        ),
        values,
    ),
)


def feed_everything(data: bytes) -> None:
    try:
        msg = wire.decode(data)
    except NatError:
        return
    client = AutoNatClientCore(policy=LAB)
    client.add_candidate(("198.18.0.101", 4001), 0.0)
    client.probes_due(0.0, [("s", "198.18.0.11")])
    for step in (
        lambda: AutoNatServerCore(policy=LAB).handle_request(("198.18.0.101", 1), msg, 0.0),
        lambda: client.on_response("s", msg, 0.1),
        lambda: client.on_dial_back(msg, ("198.18.0.11", 1), 0.1),
        lambda: HolePunchSession(Role.RESPONDER, [], NatType.UNKNOWN).on_message(data, 0.0),
        lambda: HolePunchSession(Role.INITIATOR, [], NatType.UNKNOWN).on_message(data, 0.0),
        lambda: relay.check_status(msg, "connect_resp"),
    ):
        try:
            step()
        except NatError:
            pass
    reply = wire.decode(RendezvousCore().handle("peer", data, 0.0))  # never raises
    assert reply["t"] in ("register_resp", "unregister_resp", "discover_resp", "error")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_nat_errors(data):
    feed_everything(data)


@settings(max_examples=250, deadline=None)
@given(messages)
def test_random_messages_only_raise_nat_errors(msg):
    feed_everything(msgpack.packb(msg, use_bin_type=True))
