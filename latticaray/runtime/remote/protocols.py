"""The runtime's mesh protocols: their ids, size limits, and the msgpack codec of their maps.

See docs/protocol/runtime.md for every message. Payloads are msgpack maps; a payload that is
not a map is refused as INVALID_ARGUMENT.
"""

from __future__ import annotations

import msgpack

from latticaray.mesh.errors import RpcError
from latticaray.mesh.rpc import Status

ADMIT_PROTOCOL = "/latticaray/admit/1"
VIEW_PROTOCOL = "/latticaray/runtime-view/1"
TASK_PROTOCOL = "/latticaray/task/1"
OBJECT_PROTOCOL = "/latticaray/object/1"
NAMES_PROTOCOL = "/latticaray/names/1"
STREAM_PROTOCOL = "/latticaray/stream/1"
REF_PROTOCOL = "/latticaray/ref/1"

MAX_CONTROL_MESSAGE = 1 << 20  # a unary request of names/, ref/, stream/
MAX_ADMIT_MESSAGE = 4096
MAX_REF_OPS = 65536
CHUNK = 4 << 20  # a large value travels in parts (task/1) or chunks (object/1) of this size
UNPACK_LIMITS = {"raw": False, "strict_map_key": False}


def unpack(data: bytes) -> dict:
    message = msgpack.unpackb(data, **UNPACK_LIMITS)
    if not isinstance(message, dict):
        raise RpcError(Status.INVALID_ARGUMENT, "runtime messages are msgpack maps")
    return message


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)
