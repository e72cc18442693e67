"""How the runtime turns values into bytes and back; the seam to the object store layer.

Small values are pickled (protocol 5; cloudpickle where plain pickle cannot) and travel inline.
Values larger than STORE_THRESHOLD are written once into the node's shared-memory LocalStore
(latticaray.objectstore: Arrow for arrays/tables, pickle-5 out-of-band buffers otherwise) and
travel as a small reference ``STORE_MAGIC + <name>``; every process of the node (driver, node,
workers) maps them read-only, so arrays reach workers and drivers without copies.

A put names its object by a local name (``LocalStore.put_local``: copied, not hashed); its CID
(CIDv1, latticaray.objectstore.cid) is computed when something asks for it: ``store_cid`` /
``cid_of`` (``ref.cid``, serving it to a peer) and ``portable`` (a reference about to leave the
node, which peers resolve by CID). ``store_name`` is the name as written, for bookkeeping that
must not hash (pin counts).
"""

from __future__ import annotations

import os
import pickle
import pickletools
import struct
from typing import Any, TypeGuard

import cloudpickle

STORE_THRESHOLD = 1 << 20
STORE_MAGIC = b"\x00LRSTORE1:"
STORE_ROOT_ENV = "LATTICARAY_STORE_ROOT"

_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})
_store = None


def set_store(store) -> None:
    """The LocalStore this process writes large values into (None: keep everything inline)."""
    global _store
    _store = store


def get_store():
    global _store
    if _store is None and os.environ.get(STORE_ROOT_ENV):
        from latticaray.objectstore.errors import ObjectStoreError
        from latticaray.objectstore.store import LocalStore

        try:
            _store = LocalStore.attach(os.environ[STORE_ROOT_ENV])
        except ObjectStoreError:
            return None  # the node is still creating it: values travel inline meanwhile
    return _store


def close_store() -> None:
    """Give back this process's warm spare before it exits (``os._exit`` skips exit hooks)."""
    if _store is not None:
        try:
            _store.close()
        except OSError:
            pass


def _is_plain(value, depth: int = 0) -> bool:
    cls = type(value)
    if cls in _PLAIN_TYPES:
        return (cls is not bytes and cls is not bytearray) or len(value) < STORE_THRESHOLD
    if depth > 2 or cls not in (tuple, list, dict):
        return False
    if cls is dict:
        return len(value) <= 32 and all(
            _is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in value.items()
        )
    return len(value) <= 32 and all(_is_plain(v, depth + 1) for v in value)


def serialize(value) -> bytes:
    """Inline bytes for small values; a store reference for large ones (when a store is set)."""
    if _is_plain(value):
        return pickle.dumps(value, protocol=5)
    store = get_store()
    if store is not None:
        nbytes = getattr(value, "nbytes", None)
        if (isinstance(nbytes, int) and nbytes >= STORE_THRESHOLD) or (
            type(value) in (bytes, bytearray) and len(value) >= STORE_THRESHOLD
        ):
            ref = _put_in_store(store, value)
            if ref is not None:
                return ref
    data = cloudpickle.dumps(value, protocol=5)
    if store is not None and len(data) >= STORE_THRESHOLD:
        ref = _put_in_store(store, value)
        if ref is not None:
            return ref
    return data


def _put_in_store(store, value) -> bytes | None:
    from latticaray.objectstore.errors import ObjectStoreError
    from latticaray.objectstore.serialization import serialize as store_serialize

    try:
        name = store.put_serialized_local(store_serialize(value))
    except (ObjectStoreError, pickle.PicklingError, TypeError, AttributeError):
        return None  # not storable (e.g. a lambda inside) or store full: travel inline instead
    return STORE_MAGIC + str(name).encode("ascii")


def is_store_ref(data: Any) -> TypeGuard[bytes]:
    """Whether ``data`` (sealed bytes, or None while pending) refers to a store object."""
    return data is not None and data[: len(STORE_MAGIC)] == STORE_MAGIC


def store_name(data: bytes) -> str:
    """The name in a store reference as written: a CID, or a local name (never hashes)."""
    return bytes(data[len(STORE_MAGIC) :]).decode("ascii")


def store_cid(data: bytes) -> str:
    """The CID of a store reference; a local name is resolved (its object hashed, once)."""
    name = store_name(data)
    if name[:1] == "b":
        return name
    store = get_store()
    if store is None:
        raise RuntimeError("a value lives in a shared-memory store this process cannot see")
    return str(store.resolve(name))


def portable(data: bytes) -> bytes:
    """A store reference as it may leave this node: named by its CID."""
    if is_store_ref(data) and data[len(STORE_MAGIC) : len(STORE_MAGIC) + 1] != b"b":
        return STORE_MAGIC + store_cid(data).encode("ascii")
    return data


def deserialize(data) -> object:
    if data[: len(STORE_MAGIC)] == STORE_MAGIC:
        store = get_store()
        if store is None:
            raise RuntimeError("a value lives in a shared-memory store this process cannot see")
        return store.get(store_name(data))
    return pickle.loads(data)


def materialize(data: bytes) -> bytes:
    """Inline bytes of a value, reading it out of the store if it lives there (to ship it)."""
    if not is_store_ref(data):
        return data
    return cloudpickle.dumps(deserialize(data), protocol=5)


def materialize_pieces(data) -> list:
    """``materialize(data)`` as a list of pieces whose concatenation is a pickle equal in
    meaning to it, without copying the value's buffers: pickle's own bytes plus read-only
    memoryviews of the buffers (for a store object, its shared-memory mapping).

    The value is pickled with its protocol-5 buffers out of band; each ``NEXT_BUFFER``
    (``READONLY_BUFFER``) is replaced by the in-band opcode pickle itself would write
    (BINBYTES8 for a read-only buffer, BYTEARRAY8 otherwise) followed by the buffer. FRAME
    opcodes are dropped (frames are optional in a pickle) so that no frame spans a buffer."""
    if not is_store_ref(data):
        return [data]
    buffers: list[pickle.PickleBuffer] = []
    head = cloudpickle.dumps(deserialize(data), protocol=5, buffer_callback=buffers.append)
    if not buffers:
        return [head]
    pieces: list[bytes | memoryview] = []
    at = taken = 0
    view = memoryview(head)
    pending: Any = None  # the buffer (memoryview) whose NEXT_BUFFER was just read
    for op, _arg, pos in pickletools.genops(head):
        assert pos is not None  # genops over bytes gives every opcode's offset
        if pending is not None:
            readonly = op.code == "\x98"  # READONLY_BUFFER
            pieces.append(
                (b"\x8e" if readonly else b"\x96")  # BINBYTES8 / BYTEARRAY8
                + struct.pack("<Q", pending.nbytes)
            )
            pieces.append(pending)
            pending = None
            if readonly:
                at = pos + 1
                continue
        if op.code == "\x95":  # FRAME: opcode and an 8-byte length
            pieces.append(view[at:pos])
            at = pos + 9
        elif op.code == "\x97":  # NEXT_BUFFER
            pieces.append(view[at:pos])
            at = pos + 1
            pending = buffers[taken].raw().toreadonly()
            taken += 1
    pieces.append(view[at:])
    return [p for p in pieces if len(p)]


def dumps_code(obj) -> bytes:
    """Functions, classes and errors travel by value (cloudpickle)."""
    return cloudpickle.dumps(obj, protocol=5)


def error_blob(exc: BaseException) -> bytes:
    """An exception as an error value (the bytes a failed object is sealed with)."""
    return dumps_code(exc)


def code_hash(blob: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(blob).digest()[:16]


def cid_of(data) -> str:
    """The CID naming an object: its store CID if it lives in the store, else CIDv1 raw sha2-256."""
    if is_store_ref(data):
        return store_cid(data)
    from latticaray.objectstore.cid import Cid

    return str(Cid.of(bytes(data)))


def is_cid_string(text: str) -> bool:
    return isinstance(text, str) and len(text) > 8 and text[0] == "b" and text.isalnum()
