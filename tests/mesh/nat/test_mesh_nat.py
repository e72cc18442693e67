"""NAT traversal through the real MeshNode (connection manager, identify, RPC) on the netlab.

A MeshNode behind a NAT is reached by dialing its ``/p2p-circuit`` address: the call goes over the
relay (end-to-end encrypted), and, with hole punching on, the node upgrades to a direct QUIC
connection and closes the relayed one.
"""

import time

import pytest

from latticaray.mesh.nat.autonat import Reachability

from .labnodes import MeshLab

pytestmark = pytest.mark.netlab

SECRET = b"mesh-node-secret-over-the-relay-" * 8


async def echo(ctx, payload):
    return b"echo " + bytes(payload) + b" from " + str(ctx.transport).encode()


def wait_until(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def setup(lab: MeshLab):
    lab.start()
    found = lab.discover_and_reserve()
    for host in lab.hosts:
        lab.nodes[host].register_unary("/test/echo/1", echo)
    return found


@pytest.fixture
def relay_only(nat_lab):
    lab = MeshLab(
        nat_lab[0],
        ["pub2", "hostA", "hostB"],
        quic_port=4401,
        relay_port=4402,
        hole_punching=False,
        relay_capture=True,
    )
    try:
        lab.found = setup(lab)
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def punching(nat_lab):
    lab = MeshLab(nat_lab[0], ["pub2", "hostA", "hostB", "hostC"], quic_port=4501, relay_port=4502)
    try:
        lab.found = setup(lab)
        yield lab
    finally:
        lab.stop()


def call(lab, src, dst, payload, circuit=True):
    node = lab.nodes[src]
    target = lab.nodes[dst].peer_id
    if circuit:
        node.add_addrs(target, [lab.circuit_addr(dst)])
    return lab.loops[src].run(node.call(target, "/test/echo/1", payload, timeout=15), 30)


def test_mesh_node_rpc_over_relay_with_punching_disabled(relay_only):
    lab = relay_only
    assert lab.found["hostA"][1] is Reachability.PRIVATE
    for src, dst in (("hostA", "hostB"), ("hostB", "hostA"), ("pub2", "hostA")):
        reply = call(lab, src, dst, SECRET)
        assert reply == b"echo " + SECRET + b" from relay"
        assert lab.nodes[src].connection_to(lab.nodes[dst].peer_id).transport == "relay"
    relay = lab.nats["pub1"].relay_server
    assert relay.bytes_relayed > 3 * len(SECRET)
    assert SECRET[:32] not in bytes(relay.captured)


def test_mesh_node_upgrades_to_direct_and_survives_relay_loss(punching):
    lab = punching
    a, b = lab.nodes["hostA"], lab.nodes["hostB"]
    assert call(lab, "hostA", "hostB", b"first").endswith(b"from relay")
    links = lab.nats["hostA"].links
    assert wait_until(
        lambda: (
            b.peer_id in links
            and links[b.peer_id].upgrade_task is not None
            and links[b.peer_id].upgrade_task.done()
        ),
        30,
    )
    assert links[b.peer_id].metrics.path == "punched", links[b.peer_id].metrics.events
    assert wait_until(
        lambda: all(c.transport == "quic" for c in a.connections.connections(b.peer_id))
    )
    lab.loops["pub1"].run(lab.nats["pub1"].relay_server.stop(), 20)
    assert (
        call(lab, "hostA", "hostB", b"after relay", circuit=False) == b"echo after relay from quic"
    )
    # the reverse direction uses the same direct connection
    assert (
        lab.loops["hostB"]
        .run(b.call(a.peer_id, "/test/echo/1", b"back", timeout=10), 20)
        .endswith(b"quic")
    )


def test_mesh_node_birthday_upgrade_cone_to_symmetric(punching):
    lab = punching
    a, c = lab.nodes["hostA"], lab.nodes["hostC"]
    assert call(lab, "hostA", "hostC", b"first").endswith(b"from relay")
    links = lab.nats["hostA"].links
    assert wait_until(
        lambda: (
            c.peer_id in links
            and links[c.peer_id].upgrade_task is not None
            and links[c.peer_id].upgrade_task.done()
        ),
        30,
    )
    link = links[c.peer_id]
    assert link.metrics.path == "birthday", link.metrics.events
    assert wait_until(lambda: a.connection_to(c.peer_id).transport == "quic")
    assert call(lab, "hostA", "hostC", b"direct", circuit=False) == b"echo direct from quic"
