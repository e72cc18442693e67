"""Mesh: identity, multiaddr, transports, connection manager, RPC, DHT, NAT traversal, simulator."""
