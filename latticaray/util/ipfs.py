"""Share objects with IPFS peers (kubo, Helia, any libp2p Bitswap 1.2.0 node), opt-in.

    import latticaray as lattica
    from latticaray.util import ipfs

    lattica.init(ipfs=True, listen=["/ip4/0.0.0.0/udp/4001/quic-v1", "/ip4/0.0.0.0/tcp/4001"])
    ref = lattica.put(data)
    cid = ipfs.share(ref)          # "bafyrei..." (or "bafkrei..." for a small value)
    # an IPFS node connected to this one, or finding it in the DHT, fetches cid over Bitswap
    ipfs.unshare(cid)
    ipfs.connect("/ip4/198.51.100.7/tcp/4001/p2p/12D3KooW...")  # an IPFS peer to dial
    data = ipfs.get("bafkrei...")  # bytes IPFS peers hold (a raw block, or an object's payload)

Only a node started with ``latticaray.init(ipfs=True)`` or ``latticaray start --ipfs`` serves
IPFS peers; elsewhere these calls raise :class:`RuntimeError`. Even then, only what ``share``
named is served to non-members: every other object stays on the mesh's members-only paths. A
shared object is pinned in the node's store (it outlives its refs) until ``unshare``.

What an IPFS peer gets: a large value's payload (its serialized bytes: Arrow IPC for arrays and
tables, pickle 5 otherwise) as raw blocks of at most 1 MiB under a DAG-CBOR manifest
``{"v": 1, "size", "chunk", "blocks": [CID links], "sizes", "meta"}`` (the returned CID; read it
with ``ipfs dag get``, a block with ``ipfs block get``); a small value as one raw block, its
pickle bytes. Every block is named with sha2-256, which IPFS nodes verify (the runtime's own CIDs
use BLAKE3, so a large value's IPFS CID differs from ``ref.cid``). The driver's node does the
serving: a call from a task or an attached driver shares through the node it runs on.

``get`` reads content from IPFS peers as bytes, verified against its CID: it is never
deserialized (unpickling what a non-member wrote would run its code) and never enters the store.
"""

from __future__ import annotations

from latticaray.runtime import context
from latticaray.runtime.client import raise_error_value
from latticaray.runtime.refs import ObjectRef

__all__ = ["connect", "get", "share", "shared", "unshare"]


def _request(message: dict) -> dict:
    reply = context.require_core().request({"op": "ipfs", **message})
    if "error" in reply:
        raise_error_value(reply["error"])
    return reply


def share(ref: ObjectRef) -> str:
    """Serve the object of ``ref`` to IPFS peers over Bitswap 1.2.0 and announce it in the DHT;
    the CID they fetch it by. Waits for the object if it is not ready yet, and copies it to
    this node if another node holds it."""
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"share() takes an ObjectRef (from put() or a task), not {type(ref)}")
    return str(_request({"do": "share", "oid": ref.id, "owner": ref.owner})["cid"])


def unshare(cid: str) -> None:
    """Stop serving ``cid`` (as ``share`` returned it) and announcing it; its store pin goes."""
    if not isinstance(cid, str):
        raise TypeError("unshare() takes the CID share() returned")
    _request({"do": "unshare", "cid": cid})


def shared() -> list[str]:
    """The CIDs this node shares with IPFS peers."""
    return list(_request({"do": "shared"})["cids"])


def get(cid: str, *, timeout: float | None = None, max_bytes: int = 256 << 20) -> bytes:
    """The bytes IPFS peers hold under ``cid``: a raw block's, or a latticaray object's payload
    (a DAG-CBOR manifest root, e.g. a CID another node's ``share`` returned), every block
    verified; from connected Bitswap peers, else from the providers the DHT names. Raises
    :class:`LookupError` if none sent it within ``timeout`` (default 120 s), ValueError for an
    object larger than ``max_bytes``."""
    if not isinstance(cid, str):
        raise TypeError("get() takes a CID string")
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    if timeout is not None and not timeout > 0:
        raise ValueError("timeout must be positive (or None for the default, 120 s)")
    message = {"do": "get", "cid": cid, "timeout": timeout, "max_bytes": int(max_bytes)}
    return bytes(_request(message)["data"])


def connect(addr: str) -> str:
    """Dial the IPFS peer at ``addr`` (a multiaddr ending in ``/p2p/<peer id>``, TCP or QUIC)
    from this node: it can then fetch what this node shares, ``get`` asks it, and it joins the
    DHT's routing table if it is a Kademlia server. Its peer ID; ConnectionError if unreachable."""
    if not isinstance(addr, str):
        raise TypeError("connect() takes a multiaddr string")
    return str(_request({"do": "connect", "addr": addr})["peer"])
