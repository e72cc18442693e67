"""The two object file formats of the store, read and written: sealed objects and local ones.

A sealed object (``objects/<cid>``)::

    payload (page aligned) | manifest (DAG-CBOR) | u32 manifest length | b"LRAYOBJ1"

A local object (``local/<name>``, put by ``put_local``, not hashed yet)::

    payload | zeros | msgpack [size, chunk, hash code, meta, writer pid] | u32 length | b"LRAYLOC1"

the file as large as its reservation. Linking it under its CID voids the local magic first
(eight zero bytes), then writes the manifest and the sealed trailer in place after the payload
and cuts the file to its sealed size: readers read the local trailer with pread, twice, like a
seqlock (:func:`read_local`), and a crash at any step leaves a file that
:func:`repair_local` puts back in one of the two formats.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from . import dagcbor
from .cid import DAG_CBOR, Cid
from .errors import CodecError, ObjectStoreError
from .manifest import Manifest
from .serialization import SerializedObject, deserialize

__all__ = [
    "LOCAL_MAGIC",
    "SEALED_MAGIC",
    "TRAILER",
    "LocalObject",
    "StoredObject",
    "TornRead",
    "local_trailer",
    "read_local",
    "read_sealed",
    "repair_local",
    "reservation_estimate",
    "seal_local_in_place",
    "sealed_size",
    "sealed_trailer",
]

SEALED_MAGIC = b"LRAYOBJ1"
LOCAL_MAGIC = b"LRAYLOC1"
TRAILER = struct.Struct(">I8s")
_MANIFEST_CACHE_MAX = 1024


@dataclass
class StoredObject:
    """A sealed object mapped read-only: ``payload`` is a zero-copy memoryview of the mapping."""

    cid: Cid
    manifest: Manifest
    payload: memoryview

    def value(self) -> Any:
        return deserialize(self.manifest.meta, self.payload)

    def block(self, index: int) -> memoryview:
        start, end = self.manifest.block_range(index)
        return self.payload[start:end]


def sealed_size(manifest: Manifest) -> int:
    return manifest.size + len(manifest.encoded) + TRAILER.size


def sealed_trailer(manifest: Manifest) -> bytes:
    """What follows the payload in a sealed file."""
    return manifest.encoded + TRAILER.pack(len(manifest.encoded), SEALED_MAGIC)


def reservation_estimate(ser: SerializedObject, chunk_size: int) -> int:
    """Bytes reserved for ``ser``: at least its sealed size (payload, manifest, trailer) and its
    local size (payload, local trailer)."""
    blocks = max(1, -(-ser.nbytes // chunk_size))
    return ser.nbytes + 512 + 2 * len(msgpack.packb(ser.meta, default=bytes)) + 48 * blocks


def map_readonly(path: str) -> tuple[mmap.mmap | None, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None, 0
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ), size
    finally:
        os.close(fd)


def read_sealed(cid: Cid, path: str, manifest_cache: OrderedDict[Cid, Manifest]) -> StoredObject:
    """Map the sealed object at ``path``; its manifest is decoded once (``manifest_cache``)."""
    mapping, size = map_readonly(path)
    if mapping is None or size < TRAILER.size:
        raise ObjectStoreError(f"sealed object file {path} is truncated")
    view = memoryview(mapping)
    manifest_len, magic = TRAILER.unpack(view[size - TRAILER.size :])
    if magic != SEALED_MAGIC or manifest_len > size - TRAILER.size:
        raise ObjectStoreError(f"sealed object file {path} has a bad trailer")
    payload_end = size - TRAILER.size - manifest_len
    manifest = manifest_cache.get(cid)
    if manifest is None:
        manifest = Manifest.decode(cid, view[payload_end : payload_end + manifest_len])
        manifest_cache[cid] = manifest
        while len(manifest_cache) > _MANIFEST_CACHE_MAX:
            manifest_cache.popitem(last=False)
    if manifest.size != payload_end:
        raise ObjectStoreError(
            f"sealed object file {path} has {payload_end} payload bytes, manifest says {manifest.size}"
        )
    return StoredObject(cid, manifest, view[:payload_end])


def local_trailer(nbytes: int, chunk: int, hash_code: int, meta: Any, writer: int) -> bytes:
    """What ends a local object's file (``writer``: the pid its file goes back to, or 0)."""
    blob = msgpack.packb([nbytes, chunk, hash_code, meta, writer], use_bin_type=True, default=bytes)
    return blob + TRAILER.pack(len(blob), LOCAL_MAGIC)


class TornRead(Exception):
    """A local object's trailer changed while it was read (it was being linked under its CID)."""


class LocalObject(NamedTuple):
    """An unresolved local object as read: ``payload`` maps its bytes (empty if not asked)."""

    meta: dict[str, Any]
    payload: memoryview
    nbytes: int
    chunk: int
    hash_code: int
    writer: int  # the pid that takes its file back, else 0


def read_local(path: str, map_payload: bool = True) -> LocalObject:
    """Map an unresolved local object (``map_payload=False``: an empty payload view).

    The trailer is read with pread (never through the mapping: linking the object under its CID
    shrinks the file below the trailer) and read again after, like a seqlock: linking voids
    the magic first, so an unchanged second read proves the first saw a whole trailer."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        tail = os.pread(fd, TRAILER.size, size - TRAILER.size) if size >= TRAILER.size else b""
        if len(tail) != TRAILER.size:
            raise TornRead(path)
        blob_len, magic = TRAILER.unpack(tail)
        if magic != LOCAL_MAGIC or blob_len > size - TRAILER.size:
            raise TornRead(path)
        blob = os.pread(fd, blob_len, size - TRAILER.size - blob_len)
        if os.pread(fd, TRAILER.size, size - TRAILER.size) != tail or len(blob) != blob_len:
            raise TornRead(path)
        try:
            nbytes, chunk, code, meta, writer = msgpack.unpackb(
                blob, raw=False, strict_map_key=False
            )
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ObjectStoreError(f"local object {path} has a bad trailer: {exc}") from None
        if nbytes + blob_len + TRAILER.size > size:
            raise ObjectStoreError(f"local object {path} is truncated")
        if nbytes == 0 or not map_payload:
            return LocalObject(meta, memoryview(b""), nbytes, chunk, code, writer)
        # only the payload is mapped: it is never cut off, unlike the trailer
        mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ)
        return LocalObject(meta, memoryview(mapping), nbytes, chunk, code, writer)
    finally:
        os.close(fd)


def seal_local_in_place(path: str, manifest: Manifest) -> int:
    """Turn the local object at ``path`` into a sealed one (same inode): void the local magic,
    write the manifest and sealed trailer after the payload, cut the file. Returns its size."""
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(8), size - 8)  # void the local magic first (see read_local)
        trailer = sealed_trailer(manifest)
        if os.pwrite(fd, trailer, manifest.size) != len(trailer):
            raise ObjectStoreError(f"short write of the manifest of {manifest.root}")
        sealed = sealed_size(manifest)
        os.ftruncate(fd, sealed)
    finally:
        os.close(fd)
    return sealed


def repair_local(path: str, default_hash_code: int) -> Cid | None:
    """Put a local file that a crash left mid-link back in one format: a voided magic is
    restored (its trailer is intact); a file already carrying its manifest is sealed, and its
    CID returned (the caller links it). None: still (or again) a local object, or unreadable."""
    try:
        with open(path, "r+b") as file:
            size = os.fstat(file.fileno()).st_size
            if size < TRAILER.size:
                return None
            file.seek(size - TRAILER.size)
            length, magic = TRAILER.unpack(file.read(TRAILER.size))
            if magic == bytes(8) and length <= size - TRAILER.size:
                file.seek(size - TRAILER.size - length)
                fields = msgpack.unpackb(file.read(length), raw=False, strict_map_key=False)
                if isinstance(fields, list) and len(fields) == 5:
                    file.seek(size - len(LOCAL_MAGIC))
                    file.write(LOCAL_MAGIC)
                return None
            if magic != SEALED_MAGIC or length > size - TRAILER.size:
                return None
            file.seek(size - TRAILER.size - length)
            encoded = file.read(length)
        blocks = dagcbor.decode(encoded).get("blocks") or []
        code = blocks[0].hash_code if blocks else default_hash_code
        root = Cid.of(encoded, DAG_CBOR, code)
        Manifest.decode(root, encoded)
    except (
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        msgpack.UnpackException,
        ObjectStoreError,
        CodecError,
    ):
        return None
    return root
