"""Identifiers of tasks, objects and actors: process-unique prefix plus a counter, no coordination."""

from __future__ import annotations

import itertools
import os
import struct
import threading

TASK_ID_LEN = 16
OBJECT_ID_LEN = 20
_INDEX = struct.Struct(">I")


class IdGenerator:
    """Makes task/actor ids unique across processes: 8 random bytes of prefix, 8 bytes of counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def next_id(self) -> bytes:
        if os.getpid() != self._pid:  # forked: never share a prefix with the parent
            self._prefix, self._counter, self._pid = os.urandom(8), itertools.count(1), os.getpid()
        return self._prefix + next(self._counter).to_bytes(8, "big")


ids = IdGenerator()


def object_id(task_id: bytes, index: int) -> bytes:
    """The id of return value `index` of a task (put objects use index 0 of a fresh id)."""
    return task_id + _INDEX.pack(index)


def task_of(object_id_: bytes) -> bytes:
    return object_id_[:TASK_ID_LEN]


def index_of(object_id_: bytes) -> int:
    return _INDEX.unpack_from(object_id_, TASK_ID_LEN)[0]
