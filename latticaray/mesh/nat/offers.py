"""How a node tells its peers which NAT services it offers (so others find them with no flags).

A node that serves the relay registers the unary RPC :data:`RELAY_HOP_PROTOCOL`; one that serves
AutoNAT registers :data:`AUTONAT_INFO_PROTOCOL`. Registered services are listed in identify
replies, so every peer that meets the node sees the offer; a relay also announces itself as a
DHT provider of :data:`RELAY_PROVIDER_KEY`, so a node short of relays can look for more.

The replies are typed messages (bounded msgpack, ``wire``):

* :class:`RelayHop` ``{t: "hop", port}``: the relay's TCP port, at the IP the asker reached the
  node at;
* :class:`AutoNatInfo` ``{t: "autonat", ap}``: AutoNAT is answered on the QUIC socket the asker
  is connected to; ``ap`` is the alternate observer port (0: none).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire

RELAY_HOP_PROTOCOL = "/latticaray/relay/hop/1"
AUTONAT_INFO_PROTOCOL = "/latticaray/autonat/info/1"
RELAY_PROVIDER_KEY = b"/latticaray/relay/1"
MAX_OFFER_BYTES = 256


@dataclass(frozen=True, slots=True)
class RelayHop:
    port: int

    def encode(self) -> bytes:
        return wire.encode("hop", port=self.port)

    @classmethod
    def decode(cls, data: bytes) -> RelayHop:
        msg = wire.decode(data, MAX_OFFER_BYTES)
        wire.expect_type(msg, "hop")
        return cls(wire.get_int(msg, "port", 1, 65535))


@dataclass(frozen=True, slots=True)
class AutoNatInfo:
    alt_port: int

    def encode(self) -> bytes:
        return wire.encode("autonat", ap=self.alt_port)

    @classmethod
    def decode(cls, data: bytes) -> AutoNatInfo:
        msg = wire.decode(data, MAX_OFFER_BYTES)
        wire.expect_type(msg, "autonat")
        return cls(wire.get_int(msg, "ap", 0, 65535))
