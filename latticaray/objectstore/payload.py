"""Putting a serialized payload into its file: copied (into a mapping, or by write(2)) and hashed.

Three ways, all spreading the work over the hash pool's threads:

- :func:`copy_payload` copies into a mapping without hashing (local puts), in spans;
- :func:`copy_and_hash` copies into a mapping and hashes every block: with ``ser.pieces`` each
  block is copied and then hashed by one thread while it is still in that core's cache (the
  source is read from RAM once); otherwise the payload is written in one pass, blocks inside
  verbatim source buffers being hashed from the source meanwhile, the rest from the copy after;
- :func:`write_and_hash` writes a file with write(2) (cheaper than faulting fresh tmpfs pages
  through a mapping) and hashes it likewise.

``zero_first``: the destination holds an old object's bytes (a recycled file): a payload that
could skip bytes (padding) is written over zeroed memory, so nothing of the old object survives.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .cid import hash_digest
from .fileformat import map_readonly
from .manifest import Manifest, block_spans, build_manifest, hash_pool, manifest_from_digests
from .serialization import SerializedObject

__all__ = ["copy_and_hash", "copy_payload", "write_and_hash"]

COPY_SPAN = 8 << 20  # a payload is copied by the pool's threads in spans of this size

_Sources = list[tuple[int, np.ndarray]]


def _sources(ser: SerializedObject) -> _Sources:
    assert ser.pieces is not None
    return [(offset, np.frombuffer(piece, dtype=np.uint8)) for offset, piece in ser.pieces]


def _copy_span(span: tuple[int, int], sources: _Sources, target: np.ndarray) -> None:
    """Copy payload bytes [start, end) from the pieces; gaps between pieces are zeroed."""
    start, end = span
    position = start
    for offset, source in sources:  # few pieces (a header and a body, or pickle buffers)
        piece_end = offset + source.size
        if piece_end <= start or source.size == 0:
            continue
        if offset >= end:
            break
        low, high = max(offset, start), min(piece_end, end)
        if low > position:
            target[position:low] = 0
        target[low:high] = source[low - offset : high - offset]
        position = high
    if position < end:
        target[position:end] = 0


def _write_whole(ser: SerializedObject, dest: memoryview, zero_first: bool) -> None:
    if zero_first:  # zeroing resident pages costs far less than the old bytes could
        np.frombuffer(dest, dtype=np.uint8)[:] = 0
    ser.write_into(dest)


def copy_payload(ser: SerializedObject, dest: memoryview, zero_first: bool) -> None:
    """Fill ``dest`` with the payload (no hashing), spans copied by the pool's threads."""
    if ser.pieces is None:
        _write_whole(ser, dest, zero_first)
        return
    target = np.frombuffer(dest, dtype=np.uint8)
    sources = _sources(ser)
    spans = block_spans(ser.nbytes, COPY_SPAN)
    if len(spans) == 1:
        _copy_span(spans[0], sources, target)
    else:
        list(hash_pool().map(lambda span: _copy_span(span, sources, target), spans))


def copy_and_hash(
    ser: SerializedObject, dest: memoryview, chunk_size: int, hash_code: int, zero_first: bool
) -> Manifest:
    """Fill ``dest`` with the payload and hash its blocks (see the module docstring)."""
    spans = block_spans(ser.nbytes, chunk_size)
    pool = hash_pool()
    if ser.pieces is not None:
        target = np.frombuffer(dest, dtype=np.uint8)
        sources = _sources(ser)

        def copy_block(span: tuple[int, int]) -> bytes:
            _copy_span(span, sources, target)
            return hash_digest(hash_code, dest[span[0] : span[1]])

        digests = list(pool.map(copy_block, spans))
        return manifest_from_digests(ser.nbytes, chunk_size, digests, ser.meta, hash_code)
    early = _hash_inside_sources(pool, ser, spans, hash_code)
    _write_whole(ser, dest, zero_first)
    digests = _digests_of_written(pool, ser, spans, early, dest, hash_code)
    return manifest_from_digests(ser.nbytes, chunk_size, digests, ser.meta, hash_code)


def write_and_hash(ser: SerializedObject, temp: str, chunk_size: int, hash_code: int) -> Manifest:
    """Write the payload to ``temp`` and hash its blocks; blocks that lie inside a verbatim
    source buffer (``ser.segments``) are hashed from the source while the write runs."""
    if not ser.nbytes:
        ser.write_to_file(temp)
        return build_manifest(b"", ser.meta, chunk_size, hash_code)
    spans = block_spans(ser.nbytes, chunk_size)
    pool = hash_pool()
    early = _hash_inside_sources(pool, ser, spans, hash_code)
    ser.write_to_file(temp)  # write(2) beats faulting fresh tmpfs pages via a mapping
    mapping, _ = map_readonly(temp)
    assert mapping is not None  # the payload is not empty
    view = memoryview(mapping)
    try:
        digests = _digests_of_written(pool, ser, spans, early, view, hash_code)
    finally:
        view.release()
        mapping.close()
    return manifest_from_digests(ser.nbytes, chunk_size, digests, ser.meta, hash_code)


def _hash_inside_sources(
    pool: ThreadPoolExecutor,
    ser: SerializedObject,
    spans: Sequence[tuple[int, int]],
    hash_code: int,
) -> dict[int, Future[bytes]]:
    """Start hashing, from the source, every block that lies inside a verbatim source buffer
    (``ser.segments``): block index -> future digest."""
    early: dict[int, Future[bytes]] = {}
    for offset, source in ser.segments:
        end = offset + source.nbytes
        for i, (a, b) in enumerate(spans):
            if offset <= a and b <= end:
                early[i] = pool.submit(hash_digest, hash_code, source[a - offset : b - offset])
    return early


def _digests_of_written(
    pool: ThreadPoolExecutor,
    ser: SerializedObject,
    spans: Sequence[tuple[int, int]],
    early: dict[int, Future[bytes]],
    written: memoryview,
    hash_code: int,
) -> list[bytes]:
    """Every block's digest once the payload is in ``written``: the ones hashed from the
    sources stand only if the write kept the layout promise (checked at both ends of every
    segment); the rest are hashed from ``written``."""
    for offset, source in ser.segments:
        edge = min(64, source.nbytes)
        end = offset + source.nbytes
        if (
            written[offset : offset + edge] != source[:edge]
            or written[end - edge : end] != source[source.nbytes - edge :]
        ):
            early.clear()
            break
    late = {
        i: pool.submit(hash_digest, hash_code, written[a:b])
        for i, (a, b) in enumerate(spans)
        if i not in early
    }
    return [(early.get(i) or late[i]).result() for i in range(len(spans))]
