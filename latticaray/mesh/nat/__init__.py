"""NAT traversal: AutoNAT reachability, NAT type detection, circuit relay, hole punching, rendezvous.

Sans-I/O cores (no sockets, no clock): ``autonat`` (dial-back client/server), ``nattype``
(mapping type from observed addresses), ``relay`` (reservations, circuits, limits), ``holepunch``
(DCUtR-like coordination, path metrics), ``birthday`` (probing planner), ``rendezvous``
(namespace registrations), with ``wire`` (bounded msgpack) and ``addresses`` (which ranges count
as public). Drivers: ``tunnel`` (end-to-end TLS over any byte stream), ``relay_transport``
(relay over TCP+TLS), ``tcp_punch`` (TCP simultaneous open), ``host.NatNode`` (all of it over one
shared QUIC socket) and ``mesh_nat.MeshNat`` (the same, attached to a ``MeshNode``). Wire formats:
docs/protocol/nat.md.
"""
