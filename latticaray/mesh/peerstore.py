"""Known addresses of peers, for dialing by peer ID: :class:`PeerStore`."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

from .errors import PeerIdMismatch
from .identity import PeerId
from .multiaddr import Multiaddr
from .paths import is_dialable_addr

__all__ = ["MAX_ADDRS_PER_PEER", "MAX_PEERS_IN_STORE", "PeerStore"]

log = logging.getLogger(__name__)

MAX_ADDRS_PER_PEER = 32
MAX_PEERS_IN_STORE = 100_000


class PeerStore:
    """Known addresses per peer (most recently added first), bounded in peers and addresses.

    Addresses are stored without the peer's own trailing ``/p2p/<id>`` (a circuit address keeps
    its relay part: ``<relay addr>/p2p/RELAY/p2p-circuit``). Undialable addresses (unspecified IP
    or port 0) are dropped.
    """

    def __init__(self) -> None:
        self._addrs: OrderedDict[PeerId, list[Multiaddr]] = OrderedDict()

    def add(self, peer: PeerId, addrs: Iterable[Multiaddr | str]) -> None:
        """Remember ``addrs`` for ``peer``; raises :class:`PeerIdMismatch` for an address that
        names another peer as its target."""
        known = self._addrs.pop(peer, [])
        try:
            for given in addrs:
                addr = Multiaddr.parse(given)
                if addr.peer_id is not None and addr.peer_id != peer:
                    raise PeerIdMismatch(peer, addr.peer_id)
                if not is_dialable_addr(addr):
                    log.debug("not storing undialable address %s of %s", addr, peer)
                    continue
                bare = addr.without_peer()
                if bare in known:
                    known.remove(bare)
                known.insert(0, bare)
        finally:
            if known:
                self._addrs[peer] = known[:MAX_ADDRS_PER_PEER]
        while len(self._addrs) > MAX_PEERS_IN_STORE:
            self._addrs.popitem(last=False)

    def get(self, peer: PeerId) -> list[Multiaddr]:
        return list(self._addrs.get(peer, ()))

    def remove(self, peer: PeerId, addr: Multiaddr) -> None:
        known = self._addrs.get(peer)
        bare = Multiaddr.parse(addr).without_peer()
        if known and bare in known:
            known.remove(bare)

    def peers(self) -> list[PeerId]:
        return list(self._addrs)
