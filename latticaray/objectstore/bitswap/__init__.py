"""Bitswap-style block exchange over ``/latticaray/bitswap/1``, sans-I/O (docs/protocol/bitswap.md).

A fetcher opens one server-stream call per request; the request carries a want-list, the provider
streams back presences and blocks. This package holds the protocol's logic without I/O; the
asyncio shell that runs it over RPC streams and the store is ``objectstore/exchange.py``.

* :mod:`.messages` -- the wire messages (msgpack, size- and count-bounded on decode) and
  have-bitmaps.
* :mod:`.ledgers` -- bytes sent/received per peer and the upload policy against free riding.
* :mod:`.session` -- :class:`FetchSession`, fetching one object (manifest, then blocks) from a
  changing set of peers; with :mod:`.config` (its tunables), :mod:`.actions` (what it returns, the
  sink it writes to), :mod:`.peers` (its view of each provider) and :mod:`.schedule` (which block
  to ask of whom, the end game).
* :mod:`.serve` -- :func:`plan_response`, what a holder answers to one request.

The names below are re-exported here: ``from latticaray.objectstore import bitswap as bs`` then
``bs.FetchSession``, ``bs.encode_request`` and so on.
"""

from .actions import (
    BlockSink,
    CancelRequest,
    Completed,
    Failed,
    FindProviders,
    ManifestReady,
    Penalize,
    SendRequest,
)
from .config import SessionConfig
from .ledgers import Ledgers, PeerLedger
from .messages import (
    BLOCK_RESPONSE_OVERHEAD,
    BLOCK_RESPONSE_PREFIX,
    DONT_HAVE,
    HAVE,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    MAX_WANTS_PER_REQUEST,
    PENDING,
    PROTOCOL_ID,
    WANT_BLOCK,
    WANT_HAVE,
    Request,
    Response,
    WantEntry,
    bitmap_from_flags,
    bitmap_has,
    decode_request,
    decode_response,
    encode_block_response,
    encode_request,
    encode_response,
)
from .serve import ServePlan, plan_response
from .session import FetchSession

__all__ = [
    "BLOCK_RESPONSE_OVERHEAD",
    "BLOCK_RESPONSE_PREFIX",
    "DONT_HAVE",
    "HAVE",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "MAX_WANTS_PER_REQUEST",
    "PENDING",
    "PROTOCOL_ID",
    "WANT_BLOCK",
    "WANT_HAVE",
    "BlockSink",
    "CancelRequest",
    "Completed",
    "Failed",
    "FetchSession",
    "FindProviders",
    "Ledgers",
    "ManifestReady",
    "PeerLedger",
    "Penalize",
    "Request",
    "Response",
    "SendRequest",
    "ServePlan",
    "SessionConfig",
    "WantEntry",
    "bitmap_from_flags",
    "bitmap_has",
    "decode_request",
    "decode_response",
    "encode_block_response",
    "encode_request",
    "encode_response",
    "plan_response",
]
