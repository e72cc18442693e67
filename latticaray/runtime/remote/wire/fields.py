"""What every runtime wire message shares: protocol ids, size bounds, `WireError`, the field
checkers the decoders use (each raises `WireError` naming the field), the msgpack packer and the
`Message` base class."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, Final, TypeAlias

import msgpack

from latticaray.mesh.errors import RpcError
from latticaray.mesh.rpc import Status
from latticaray.runtime.ids import OBJECT_ID_LEN, TASK_ID_LEN

ADMIT_PROTOCOL: Final = "/latticaray/admit/1"
RENEW_PROTOCOL: Final = "/latticaray/renew/1"
VIEW_PROTOCOL: Final = "/latticaray/runtime-view/1"
TASK_PROTOCOL: Final = "/latticaray/task/1"
OBJECT_PROTOCOL: Final = "/latticaray/object/1"
NAMES_PROTOCOL: Final = "/latticaray/names/1"
REF_PROTOCOL: Final = "/latticaray/ref/1"
STREAM_PROTOCOL: Final = "/latticaray/stream/1"

#: Values up to this size travel inline (in `done`/`yield`); larger ones as `part` chunks of it.
CHUNK: Final = 4 << 20
#: The largest message the RPC layer carries (RpcLimits.max_frame_size).
MAX_FRAME: Final = 16 << 20
#: Unary control requests (`ref`, `names`, `stream`) are refused above this size unread.
MAX_CONTROL_MESSAGE: Final = 1 << 20
MAX_ADMIT_REQUEST: Final = 4096
MAX_CREDENTIAL: Final = 2048
MAX_MANIFEST: Final = 2 << 20  # a store object's manifest block (objectstore.manifest)
MAX_REF_OPS: Final = 65536
#: Bounds of single fields: task/actor/method/namespace names, node ids, CIDs, code hashes,
#: lists (returns, CIDs, refs), option maps, exception class names, view contents.
MAX_NAME: Final = 4096
MAX_NODE_ID: Final = 256
MAX_CID: Final = 256
MAX_CODE_HASH: Final = 64
MAX_LIST: Final = 1 << 20
MAX_OPTS: Final = 1024
MAX_MRO: Final = 1024
MAX_REASON: Final = 64 << 10
MAX_RESOURCES: Final = 1024
MAX_VIEW_PEERS: Final = 65536
MAX_ADDRS: Final = 256
MAX_ADDR: Final = 1024
MAX_VIEW_NAMES: Final = 65536
MAX_INCARNATION: Final = 64  # a view's `inc`

BORROW: Final = 1
UNBORROW: Final = 0

#: Task arguments as the wire carries them: ``["b", bytes]`` or ``["l", [arg...], {name: arg}]``
#: with ``arg`` = ``[0, value]``, ``[0, store ref, object id, owner(, holder)]`` or
#: ``[1, object id, owner]``. Kept as the msgpack lists: the caller names store references by
#: CID in place just before sending, the executor replaces fetched ones in place.
WireArgs: TypeAlias = list[Any]
#: Options of a task or actor (a msgpack map with string keys, read by the node).
WireOpts: TypeAlias = dict[str, Any]
#: A reference pickled inside a value: ``[object id, owner node]``.
InnerRef: TypeAlias = list[Any]
#: A `part`'s slot: a result's index, or ``("y", index)`` for a streamed item.
Slot: TypeAlias = int | tuple[str, int]


class WireError(RpcError, ValueError):
    """A peer's message is malformed: not msgpack, not a map, a key missing, a field of the
    wrong type or over its bound. Raised from a handler, the RPC layer answers the caller
    with status INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        super().__init__(Status.INVALID_ARGUMENT, message)


class UnknownKind(WireError):
    """A task-session message of a kind this node does not know (a newer peer's): skipped."""

    def __init__(self, kind: object) -> None:
        super().__init__(f"unknown task session message kind {kind!r}")
        self.kind = kind


# --------------------------------------------------------------------------- field checks
def describe(value: object) -> str:
    if isinstance(value, (bytes, str, list, dict)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def bad_field(m: dict[Any, Any], key: str, where: str, expected: str) -> WireError:
    if key not in m:
        return WireError(f"{where} message has no {key!r}")
    return WireError(f"{where} message: {key!r} must be {expected}, not {describe(m[key])}")


def unpack_map(data: bytes, where: str) -> dict[Any, Any]:
    """A msgpack map (keys must be strings or bytes: every map of these protocols has string
    keys; the size of the data bounds every container in it)."""
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError, TypeError, ExtraData, StackError...
        raise WireError(f"{where} message is not valid msgpack: {exc}") from None
    if type(message) is not dict:
        raise WireError(f"{where} message must be a msgpack map, not {describe(message)}")
    return message


def field_id(m: dict[Any, Any], key: str, where: str, size: int = TASK_ID_LEN) -> bytes:
    value = m.get(key)
    if type(value) is bytes and len(value) == size:
        return value
    raise bad_field(m, key, where, f"{size} bytes")


def field_bin(m: dict[Any, Any], key: str, where: str, limit: int) -> bytes:
    value = m.get(key)
    if type(value) is bytes and len(value) <= limit:
        return value
    raise bad_field(m, key, where, f"bytes of at most {limit}")


def field_opt_bin(m: dict[Any, Any], key: str, where: str, limit: int) -> bytes | None:
    value = m.get(key)
    if value is None or (type(value) is bytes and len(value) <= limit):
        return value
    raise bad_field(m, key, where, f"nil or bytes of at most {limit}")


def field_str(m: dict[Any, Any], key: str, where: str, limit: int) -> str:
    value = m.get(key)
    if type(value) is str and len(value) <= limit:
        return value
    raise bad_field(m, key, where, f"a string of at most {limit} characters")


def field_opt_str(m: dict[Any, Any], key: str, where: str, limit: int) -> str | None:
    value = m.get(key)
    if value is None or (type(value) is str and len(value) <= limit):
        return value
    raise bad_field(m, key, where, f"nil or a string of at most {limit} characters")


def field_int(m: dict[Any, Any], key: str, where: str, low: int, high: int) -> int:
    value = m.get(key)
    if type(value) is int and low <= value <= high:
        return value
    raise bad_field(m, key, where, f"an integer in [{low}, {high}]")


def field_flag(m: dict[Any, Any], key: str, where: str, default: bool) -> bool:
    """A boolean; an absent key or nil is ``default``. Integers are read as truth values
    (a flag a user passed as 0/1 travels as an integer)."""
    value = m.get(key)
    if value is None:
        return default
    if type(value) is bool or type(value) is int:
        return bool(value)
    raise bad_field(m, key, where, "a boolean")


def field_number(m: dict[Any, Any], key: str, where: str, optional: bool) -> float | int | None:
    value = m.get(key)
    if value is None and optional:
        return None
    if (type(value) is float and math.isfinite(value)) or type(value) is int:
        return value
    raise bad_field(m, key, where, "nil or a finite number" if optional else "a finite number")


def field_map(m: dict[Any, Any], key: str, where: str, limit: int) -> dict[str, Any]:
    value = m.get(key)
    if type(value) is dict and len(value) <= limit and all(type(k) is str for k in value):
        return value
    raise bad_field(m, key, where, f"a map of at most {limit} string keys")


def field_opt_map(m: dict[Any, Any], key: str, where: str, limit: int) -> dict[str, Any] | None:
    if m.get(key) is None:
        return None
    return field_map(m, key, where, limit)


def body_of(message: dict[Any, Any], where: str) -> dict[Any, Any]:
    body = message.get("m")
    if type(body) is dict:
        return body
    raise bad_field(message, "m", where, "a map")


def is_amounts(value: object) -> bool:
    """A map of resource name -> finite amount (a view's ``total`` / ``avail``)."""
    return (
        type(value) is dict
        and len(value) <= MAX_RESOURCES
        and all(
            type(k) is str
            and len(k) <= MAX_NAME
            and (type(v) is int or (type(v) is float and math.isfinite(v)))
            for k, v in value.items()
        )
    )


def is_counted_id(value: object) -> bool:
    """What reference counts name: an object's id, or an actor's (its handles are counted)."""
    return type(value) is bytes and (len(value) == OBJECT_ID_LEN or len(value) == TASK_ID_LEN)


def is_ref(ref: object) -> bool:
    """``[object or actor id, owner node]``: a ref, or an actor handle, inside a value."""
    return (
        type(ref) is list
        and len(ref) == 2
        and is_counted_id(ref[0])
        and type(ref[1]) is str
        and len(ref[1]) <= MAX_NODE_ID
    )


def field_refs(m: dict[Any, Any], key: str, where: str) -> list[InnerRef] | None:
    """``[[object id, owner], ...]`` or absent."""
    value = m.get(key)
    if value is None:
        return None
    if type(value) is list and len(value) <= MAX_LIST and all(is_ref(r) for r in value):
        return value
    raise bad_field(m, key, where, "[[object id, owner node], ...]")


def is_arg(item: object) -> bool:
    if type(item) is not list or not item:
        return False
    size = len(item)
    if item[0] == 0 and type(item[0]) is int:
        if size == 2:
            return type(item[1]) is bytes and len(item[1]) <= MAX_FRAME
        return (
            4 <= size <= 5
            and type(item[1]) is bytes
            and len(item[1]) <= MAX_FRAME
            and type(item[2]) is bytes
            and len(item[2]) == OBJECT_ID_LEN
            and type(item[3]) is str
            and len(item[3]) <= MAX_NODE_ID
            and (size == 4 or (type(item[4]) is str and len(item[4]) <= MAX_NODE_ID))
        )
    return (
        item[0] == 1
        and type(item[0]) is int
        and size == 3
        and type(item[1]) is bytes
        and len(item[1]) == OBJECT_ID_LEN
        and type(item[2]) is str
        and len(item[2]) <= MAX_NODE_ID
    )


def field_args(m: dict[Any, Any], where: str) -> WireArgs:
    args = m.get("args")
    if type(args) is list and args:
        tag = args[0]
        if tag == "b":
            if len(args) == 2 and type(args[1]) is bytes and len(args[1]) <= MAX_FRAME:
                return args
        elif (
            tag == "l"
            and len(args) == 3
            and type(args[1]) is list
            and type(args[2]) is dict
            and len(args[1]) + len(args[2]) <= MAX_LIST
            and all(is_arg(item) for item in args[1])
            and all(type(k) is str and len(k) <= MAX_NAME and is_arg(v) for k, v in args[2].items())
        ):
            return args
    raise bad_field(m, "args", where, '["b", bytes] or ["l", [argument...], {name: argument}]')


def checked(
    message: dict[Any, Any], key: str, where: str, ok: Callable[[Any], bool], expected: str
) -> Any:
    value = message.get(key)
    if ok(value):
        return value
    raise bad_field(message, key, where, expected)


_packers = threading.local()


def pack(obj: object) -> bytes:
    """msgpack with bin types, by one Packer per thread (packb would make one per message)."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


class Message:
    """What every message does: ``to_wire()`` gives its msgpack-ready map, ``encode()`` the
    bytes."""

    __slots__ = ()

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self) -> bytes:
        return pack(self.to_wire())
