"""How the runtime turns values into bytes and back, and names bytes by CID.

This is the seam to the object store layer: values are serialized with pickle protocol 5
(cloudpickle where plain pickle cannot), errors travel as pickled exception objects, and
object names are CIDv1 strings computed by the object store's `cid` function when present.
"""
from __future__ import annotations

import base64
import hashlib
import pickle

import cloudpickle

# Types plain pickle handles by value with no reference to importable code.
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})
_PLAIN_CONTAINERS = (tuple, list, dict)


def _is_plain(value, depth: int = 0) -> bool:
    cls = type(value)
    if cls in _PLAIN_TYPES:
        return True
    if depth > 2 or cls not in (tuple, list, dict):
        return False
    if cls is dict:
        return len(value) <= 32 and all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1)
                                        for k, v in value.items())
    return len(value) <= 32 and all(_is_plain(v, depth + 1) for v in value)


def serialize(value) -> bytes:
    """Bytes for `value`; plain data takes the fast C pickler, anything else cloudpickle."""
    if _is_plain(value):
        return pickle.dumps(value, protocol=5)
    return cloudpickle.dumps(value, protocol=5)


def deserialize(data) -> object:
    return pickle.loads(data)


def dumps_code(obj) -> bytes:
    """Functions and classes travel by value (cloudpickle), shipped once per node by hash."""
    return cloudpickle.dumps(obj, protocol=5)


def code_hash(blob: bytes) -> bytes:
    return hashlib.sha256(blob).digest()[:16]


def cid_of(data) -> str:
    """CIDv1 (raw codec, sha2-256 multihash, base32 'b' prefix) of `data`."""
    try:
        from latticaray.objectstore.cid import cid_for_bytes  # object store's naming, when built
    except ImportError:
        cid_for_bytes = None
    if cid_for_bytes is not None:
        return str(cid_for_bytes(bytes(data)))
    digest = hashlib.sha256(data).digest()
    raw = bytes([0x01, 0x55, 0x12, 0x20]) + digest
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def is_cid_string(text: str) -> bool:
    return isinstance(text, str) and len(text) > 8 and text[0] == "b" and text.isalnum()
