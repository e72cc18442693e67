"""libp2p-standard protocols on the wire, for interop with other libp2p peers.

Sans-I/O cores (``*Core``) for multistream-select, Noise XX and yamux, typed protobuf message
codecs for identify, ping, Kademlia, Bitswap 1.2, circuit relay v2 and DCUtR, the key types of
libp2p, and a thin asyncio TCP transport that stacks them the libp2p way
(multistream -> ``/noise`` -> multistream -> ``/yamux/1.0.0``). See ``docs/protocol/libp2p.md``.
"""
