"""Kademlia DHT: sans-I/O routing/lookup/record core and its asyncio driver over mesh RPC.

Public surface::

    from latticaray.mesh.dht import DhtService, DhtConfig, DhtValue, ProviderInfo
    dht = DhtService(node)            # registers /latticaray/dht/1
    await dht.bootstrap(); await dht.put(key, value, expiration, subkey=None); await dht.get(key)
    await dht.provide(cid); async for p in dht.find_providers(cid, count=20): ...
    await dht.find_peer(peer_id)

The core (``core.DhtCore``) is what the simulator (``latticaray.mesh.sim.dht``) runs at scale.
"""

from .config import DhtConfig
from .core import DhtCore
from .errors import DhtError, DhtOperationFailed, DhtProtocolError, RecordRejected
from .messages import PROTOCOL_ID
from .records import OwnerOnlyKey, OwnerOnlySubkey, Record, RecordPolicy, default_validators
from .service import DhtService, DhtValue, ProviderInfo

__all__ = [
    "PROTOCOL_ID",
    "DhtConfig",
    "DhtCore",
    "DhtError",
    "DhtOperationFailed",
    "DhtProtocolError",
    "DhtService",
    "DhtValue",
    "OwnerOnlyKey",
    "OwnerOnlySubkey",
    "ProviderInfo",
    "Record",
    "RecordPolicy",
    "RecordRejected",
    "default_validators",
]
