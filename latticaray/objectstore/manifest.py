"""Chunking of object payloads into blocks under a DAG-CBOR manifest node; the manifest names the object.

An object's payload is cut into blocks of ``chunk_size`` bytes (1 MiB by default; peers accept
blocks up to ``MAX_BLOCK_SIZE`` = 2 MiB). Each block is a raw leaf (``bafkrei...``). The manifest
is a DAG-CBOR node (``bafyrei...``) and its CID is the object's root CID::

    {"v": 1, "size": <payload bytes>, "chunk": <chunk size>,
     "blocks": [<CID link>, ...], "sizes": [<block bytes>, ...],
     "meta": {"ser": ..., <serializer metadata: dtype/shape, Arrow schema, pickle layout>}}

``build_manifest(payload, meta)`` hashes the blocks (in parallel threads: hashlib releases the
GIL) and returns a :class:`Manifest`; ``Manifest.decode(root_cid, data)`` verifies and validates
a received manifest block.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import dagcbor
from .cid import DAG_CBOR, RAW, SHA2_256, Cid, hash_digest
from .errors import BlockVerificationError, CodecError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_BLOCK_SIZE",
    "MAX_MANIFEST_SIZE",
    "Manifest",
    "block_spans",
    "build_manifest",
    "hash_pool",
    "manifest_from_digests",
]

DEFAULT_CHUNK_SIZE = 1 << 20
MAX_BLOCK_SIZE = 2 << 20
MAX_MANIFEST_SIZE = 2 << 20
_HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
_hash_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="latticaray-hash")
    return _hash_pool


@dataclass(frozen=True)
class Manifest:
    root: Cid
    encoded: bytes  # the manifest block's bytes (what ``root`` hashes)
    size: int
    chunk_size: int
    blocks: tuple[Cid, ...]
    sizes: tuple[int, ...]
    meta: dict[str, Any]

    def block_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, start + self.sizes[index]

    def index_of(self, cid: Cid) -> int | None:
        """The first place of block ``cid`` in the object (None if it is not one of its blocks)."""
        places = self.indexes_of(cid)
        return places[0] if places else None

    def indexes_of(self, cid: Cid) -> tuple[int, ...]:
        """Every place of block ``cid``: blocks of equal content (zero pages) share one CID."""
        index_map = self.__dict__.get("_index")
        if index_map is None:
            index_map = {}
            for i, block in enumerate(self.blocks):
                index_map[block] = index_map.get(block, ()) + (i,)
            object.__setattr__(self, "_index", index_map)
        return index_map.get(cid, ())

    @classmethod
    def decode(cls, root: Cid, data: bytes | memoryview) -> Manifest:
        """Verify ``data`` against ``root`` and check the manifest is self-consistent."""
        if root.codec != DAG_CBOR:
            raise CodecError(f"{root} is not a DAG-CBOR manifest CID")
        if len(data) > MAX_MANIFEST_SIZE:
            raise CodecError(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_SIZE}")
        if not root.verify(data):
            raise BlockVerificationError(root, "manifest bytes do not match the root CID")
        node = dagcbor.decode(data)
        try:
            version, size, chunk = node["v"], node["size"], node["chunk"]
            blocks, sizes, meta = node["blocks"], node["sizes"], node["meta"]
        except (KeyError, TypeError):
            raise CodecError("manifest lacks v/size/chunk/blocks/sizes/meta") from None
        if version != 1:
            raise CodecError(f"unsupported manifest version {version!r}")
        if not (
            isinstance(size, int)
            and isinstance(chunk, int)
            and 0 < chunk <= MAX_BLOCK_SIZE
            and size >= 0
            and isinstance(meta, dict)
            and isinstance(blocks, list)
            and isinstance(sizes, list)
            and len(blocks) == len(sizes)
        ):
            raise CodecError("manifest fields have the wrong types or bounds")
        expected_count = (size + chunk - 1) // chunk
        if len(blocks) != expected_count:
            raise CodecError(
                f"manifest lists {len(blocks)} blocks, size/chunk imply {expected_count}"
            )
        for i, (block, block_size) in enumerate(zip(blocks, sizes)):
            expected = min(chunk, size - i * chunk)
            if not isinstance(block, Cid) or block.codec != RAW or block_size != expected:
                raise CodecError(f"manifest block {i} is not a raw CID of {expected} bytes")
        return cls(root, bytes(data), size, chunk, tuple(blocks), tuple(sizes), meta)


def _encode(
    size: int, chunk: int, blocks: list[Cid], sizes: list[int], meta: dict[str, Any], hash_code: int
) -> Manifest:
    node = {"v": 1, "size": size, "chunk": chunk, "blocks": blocks, "sizes": sizes, "meta": meta}
    encoded = dagcbor.encode(node)
    if len(encoded) > MAX_MANIFEST_SIZE:
        raise CodecError(
            f"object of {size} bytes needs a {len(encoded)}-byte manifest; raise chunk size"
        )
    root = Cid.of(encoded, DAG_CBOR, hash_code)
    return Manifest(root, encoded, size, chunk, tuple(blocks), tuple(sizes), meta)


def build_manifest(
    payload: Any,
    meta: dict[str, Any],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    hash_code: int = SHA2_256,
) -> Manifest:
    """Chunk ``payload`` (any buffer), hash every block, and return the object's manifest."""
    if not 0 < chunk_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"chunk size must be in (0, {MAX_BLOCK_SIZE}]")
    view = memoryview(payload).cast("B")
    size = view.nbytes
    spans = block_spans(size, chunk_size)
    chunks = [view[a:b] for a, b in spans]
    if len(chunks) > 2:
        digests = list(_pool().map(lambda c: hash_digest(hash_code, c), chunks))
    else:
        digests = [hash_digest(hash_code, c) for c in chunks]
    return manifest_from_digests(size, chunk_size, digests, meta, hash_code)


def block_spans(size: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, size)) for start in range(0, size, chunk_size)]


def manifest_from_digests(
    size: int,
    chunk_size: int,
    digests: list[bytes],
    meta: dict[str, Any],
    hash_code: int = SHA2_256,
) -> Manifest:
    """The manifest of a payload whose blocks (``block_spans``) hash to ``digests``."""
    spans = block_spans(size, chunk_size)
    if len(digests) != len(spans):
        raise ValueError(f"{len(digests)} digests for {len(spans)} blocks")
    blocks = [Cid(RAW, hash_code, d) for d in digests]
    return _encode(size, chunk_size, blocks, [b - a for a, b in spans], meta, hash_code)


def hash_pool() -> ThreadPoolExecutor:
    """The shared thread pool that hashes blocks (hashlib and blake3 release the GIL)."""
    return _pool()
