"""Object store: CIDs, serialization, shared-memory store, eviction/spill, Bitswap exchange.

What the runtime imports (details in each module's docstring)::

    from latticaray.objectstore import (Cid, serialize, deserialize, serialize_inline,
        deserialize_inline, INLINE_THRESHOLD, LocalStore, ObjectExchange, ExchangeConfig,
        ObjectNotFound, StoreFull)

    # values <= INLINE_THRESHOLD (64 KiB) ride inline in task messages:
    blob = serialize_inline(value); value = deserialize_inline(blob)
    # larger values go through the node's shared-memory store:
    store = LocalStore(root=None, capacity_bytes=None)    # /dev/shm/latticaray-<uid>/...; 30% of RAM
    cid = store.put(value, pin=True)                       # Cid; str(cid) == "bafyrei..."
    value = store.get(cid)                                 # zero-copy, read-only views
    worker_side = LocalStore.attach(store.root)            # from a worker process on the same host
    # across nodes:
    exchange = ObjectExchange(node, dht, store); await exchange.start()
    await exchange.provide(cid)
    await exchange.fetch(cid, timeout=30.0)                # into the local store; ObjectNotFound
    value = await exchange.get(cid, timeout=30.0)
    await exchange.replicate(cid, n=2)
"""

from .cid import BLAKE3, DAG_CBOR, RAW, SHA2_256, Cid
from .errors import (
    BlockVerificationError,
    CodecError,
    ExchangeError,
    InvalidCid,
    ObjectNotFound,
    ObjectStoreError,
    SerializationError,
    StoreFull,
)
from .manifest import DEFAULT_CHUNK_SIZE, MAX_BLOCK_SIZE, Manifest, build_manifest
from .serialization import (
    INLINE_THRESHOLD,
    SerializedObject,
    deserialize,
    deserialize_inline,
    serialize,
    serialize_inline,
)
from .store import LocalStore, StoredObject

__all__ = [
    "BLAKE3",
    "DAG_CBOR",
    "DEFAULT_CHUNK_SIZE",
    "INLINE_THRESHOLD",
    "MAX_BLOCK_SIZE",
    "RAW",
    "SHA2_256",
    "BlockVerificationError",
    "Cid",
    "CodecError",
    "ExchangeConfig",
    "ExchangeError",
    "InvalidCid",
    "LocalStore",
    "Manifest",
    "ObjectExchange",
    "ObjectNotFound",
    "ObjectStoreError",
    "SerializationError",
    "SerializedObject",
    "StoreFull",
    "StoredObject",
    "build_manifest",
    "deserialize",
    "deserialize_inline",
    "serialize",
    "serialize_inline",
]


def __getattr__(name: str):
    # the exchange pulls in the mesh layer; import it only when asked for
    if name in ("ObjectExchange", "ExchangeConfig"):
        from . import exchange

        return getattr(exchange, name)
    raise AttributeError(name)
