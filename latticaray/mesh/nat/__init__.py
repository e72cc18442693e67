"""NAT traversal: AutoNAT reachability, NAT type detection, circuit relay, hole punching, rendezvous.

Sans-I/O cores (no sockets, no clock): ``autonat`` (dial-back client/server cores), ``nattype``
(mapping type from observed addresses), ``relay`` (reservations, circuits, limits), ``holepunch``
(DCUtR-like coordination, path metrics), ``birthday`` (probing planner), ``rendezvous``
(namespace registrations), ``autorelay`` (which relays to hold: RTT pick, two reservations,
replacement; rate limits are ``latticaray.mesh.ratelimit``'s token buckets), with ``wire``
(bounded msgpack), ``offers`` (the typed replies of the relay/AutoNAT offers) and ``addresses``
(which ranges count as public).

Asyncio shells over one shared QUIC socket: ``control`` (the control datagrams),
``reachability`` (observations, NAT type, AutoNAT rounds), ``reservations`` (relay
reservations), ``punch`` (hole punching), composed by ``service.NatService`` (configured by
``config.NatConfig``, per-peer state in ``links``). Its two bindings: ``host.NatHost`` (a
standalone peer with its own links) and ``mesh_service.MeshNatService`` (on a ``MeshNode``, with
``circuit`` for relayed connections in the connection manager, ``migration`` for moving a
peer off the relay and ``auto`` for the zero-flag mode: AutoNAT servers and relays found among
the peers met). Transports: ``tunnel`` (end-to-end TLS over any byte stream), the relay
over TCP+TLS (``relay_transport`` framing, ``relay_server``, ``relay_client``), ``tcp_punch``
(TCP simultaneous open). Wire formats: docs/protocol/nat.md.
"""
