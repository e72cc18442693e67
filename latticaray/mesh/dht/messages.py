"""Wire codec of ``/latticaray/dht/1``: msgpack maps, size-bounded and shape-checked on decode.

In memory a message is a dict whose ``"op"`` names the operation; peers are :class:`Contact` and
records :class:`Record` objects. On the wire every message is a msgpack map with string keys;
contacts travel as ``[peer_id_bytes, [addr_str, ...]]`` and records as
``[key, subkey|nil, value, expiration_f64, publisher, signature]``. Anything malformed, oversize or
of the wrong type raises :class:`DhtProtocolError`; nothing from the wire is trusted further.
See docs/protocol/dht.md.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from .errors import DhtProtocolError
from .keyspace import ID_BYTES, Contact
from .records import Record

__all__ = [
    "ADD_PROVIDER",
    "FIND_NODE",
    "GET_PROVIDERS",
    "GET_VALUE",
    "MAX_MESSAGE_SIZE",
    "OPS",
    "PING",
    "PROTOCOL_ID",
    "PUT_VALUE",
    "decode_records",
    "decode_request",
    "decode_response",
    "encode",
    "encode_records",
    "error_response",
]

PROTOCOL_ID = "/latticaray/dht/1"

PING = "ping"
FIND_NODE = "find_node"
GET_VALUE = "get_value"
PUT_VALUE = "put_value"
ADD_PROVIDER = "add_provider"
GET_PROVIDERS = "get_providers"
OPS = frozenset({PING, FIND_NODE, GET_VALUE, PUT_VALUE, ADD_PROVIDER, GET_PROVIDERS})

MAX_MESSAGE_SIZE = 2 * 1024 * 1024
MAX_PEERS = 64
MAX_ADDRS = 8
MAX_ADDR_LEN = 256
MAX_PEER_ID_LEN = 64
MAX_RECORDS = 256
MAX_KEY_LEN = 1024
MAX_FIELD_BIN = 256 * 1024

_CONTACT_FIELDS = ("peers", "providers")


def _contact_to_wire(c: Contact) -> list:
    return [c.peer_id, list(c.addrs)]


def encode(message: dict[str, Any]) -> bytes:
    """Encode an in-memory request or response for the wire."""
    wire: dict[str, Any] = {}
    for name, value in message.items():
        if name in _CONTACT_FIELDS:
            value = [_contact_to_wire(c) for c in value]
        elif name == "records":
            value = [r.to_wire() for r in value]
        elif name == "addrs":
            value = list(value)
        wire[name] = value
    data = msgpack.packb(wire, use_bin_type=True)
    if len(data) > MAX_MESSAGE_SIZE:
        raise DhtProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    return data


def error_response(code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message[:500]}


def _unpack_bounded(data: bytes, what: str, max_map_len: int) -> Any:
    """Bounded msgpack decoding of a DHT message or record list (``what`` names it in errors)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DhtProtocolError(f"{what} must be bytes")
    if len(data) > MAX_MESSAGE_SIZE:
        raise DhtProtocolError(f"{what} of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    try:
        return msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=MAX_FIELD_BIN,
            max_str_len=4096,
            max_array_len=1024,
            max_map_len=max_map_len,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DhtProtocolError(f"not a valid msgpack {what}: {type(exc).__name__}: {exc}") from None


def _unpack(data: bytes) -> dict:
    obj = _unpack_bounded(data, "message", 32)
    if not isinstance(obj, dict):
        raise DhtProtocolError(f"message must be a map, got {type(obj).__name__}")
    return obj


def _bytes(obj: dict, name: str, max_len: int, *, exact: int | None = None) -> bytes:
    value = obj.get(name)
    if not isinstance(value, bytes):
        raise DhtProtocolError(f"field {name!r} must be bytes")
    if exact is not None and len(value) != exact:
        raise DhtProtocolError(f"field {name!r} must be {exact} bytes, got {len(value)}")
    if not value or len(value) > max_len:
        raise DhtProtocolError(f"field {name!r} must be 1..{max_len} bytes")
    return value


def _addrs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_ADDRS:
        raise DhtProtocolError(f"addresses must be a list of at most {MAX_ADDRS}")
    for a in value:
        if not isinstance(a, str) or len(a) > MAX_ADDR_LEN:
            raise DhtProtocolError(f"an address must be a string of at most {MAX_ADDR_LEN} chars")
    return tuple(value)


def _contacts(value: Any, name: str) -> list[Contact]:
    if not isinstance(value, list) or len(value) > MAX_PEERS:
        raise DhtProtocolError(f"field {name!r} must be a list of at most {MAX_PEERS} peers")
    out = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], bytes)
            or not 0 < len(item[0]) <= MAX_PEER_ID_LEN
        ):
            raise DhtProtocolError(f"field {name!r} holds a malformed peer entry")
        out.append(Contact(item[0], _addrs(item[1])))
    return out


def _records(value: Any) -> list[Record]:
    if not isinstance(value, list) or len(value) > MAX_RECORDS:
        raise DhtProtocolError(f"records must be a list of at most {MAX_RECORDS}")
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) != 6:
            raise DhtProtocolError("a record must be a 6-element array")
        key, subkey, val, expiration, publisher, signature = item
        if not (
            isinstance(key, bytes)
            and isinstance(val, bytes)
            and isinstance(publisher, bytes)
            and isinstance(signature, bytes)
            and (subkey is None or isinstance(subkey, bytes))
        ):
            raise DhtProtocolError("record fields have the wrong types")
        if isinstance(expiration, int) and not isinstance(expiration, bool):
            expiration = float(expiration)
        if not isinstance(expiration, float) or not math.isfinite(expiration):
            raise DhtProtocolError("record expiration must be a finite float")
        if (
            not 0 < len(key) <= MAX_KEY_LEN
            or len(publisher) > MAX_PEER_ID_LEN
            or len(signature) > 128
        ):
            raise DhtProtocolError("record key, publisher or signature has a bad length")
        out.append(Record(key, subkey, val, expiration, publisher, signature))
    return out


def encode_records(records: list[Record]) -> bytes:
    """Records as one msgpack array (the value of a latticaray record in libp2p Kademlia)."""
    return msgpack.packb([r.to_wire() for r in records], use_bin_type=True)


def decode_records(data: bytes) -> list[Record]:
    """The records of :func:`encode_records`, shape-checked (signatures are the caller's)."""
    obj = _unpack_bounded(data, "record list", 0)
    return _records(obj)


def decode_request(data: bytes) -> dict[str, Any]:
    """Decode and shape-check a request. Unknown fields are ignored (forward compatibility)."""
    obj = _unpack(data)
    op = obj.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise DhtProtocolError(f"unknown operation {op!r}")
    msg: dict[str, Any] = {"op": op}
    if "addrs" in obj:
        msg["addrs"] = _addrs(obj["addrs"])
    server = obj.get("server", True)
    if not isinstance(server, bool):
        raise DhtProtocolError("field 'server' must be a boolean")
    msg["server"] = server
    if op == FIND_NODE:
        msg["target"] = _bytes(obj, "target", ID_BYTES, exact=ID_BYTES)
    elif op in (GET_VALUE, GET_PROVIDERS):
        msg["key"] = _bytes(obj, "key", MAX_KEY_LEN)
    elif op == PUT_VALUE:
        records = _records(obj.get("records"))
        if not records:
            raise DhtProtocolError("put_value carries no records")
        msg["records"] = records
    elif op == ADD_PROVIDER:
        msg["key"] = _bytes(obj, "key", MAX_KEY_LEN)
        ttl = obj.get("ttl")
        if isinstance(ttl, int) and not isinstance(ttl, bool):
            ttl = float(ttl)
        if not isinstance(ttl, float) or not math.isfinite(ttl) or ttl <= 0:
            raise DhtProtocolError("add_provider 'ttl' must be a positive finite number")
        msg["ttl"] = ttl
    return msg


def decode_response(data: bytes) -> dict[str, Any]:
    """Decode and shape-check a response (any operation's; absent lists become empty)."""
    obj = _unpack(data)
    if "error" in obj:
        code, text = obj.get("error"), obj.get("message", "")
        if not isinstance(code, str) or not isinstance(text, str):
            raise DhtProtocolError("error response fields must be strings")
        return {"error": code, "message": text}
    msg: dict[str, Any] = {}
    for name in _CONTACT_FIELDS:
        if name in obj:
            msg[name] = _contacts(obj[name], name)
    if "records" in obj:
        msg["records"] = _records(obj["records"])
    if "results" in obj:
        results = obj["results"]
        if (
            not isinstance(results, list)
            or len(results) > MAX_RECORDS
            or not all(r is None or isinstance(r, str) for r in results)
        ):
            raise DhtProtocolError("put_value 'results' must be a list of null or error codes")
        msg["results"] = results
    return msg
