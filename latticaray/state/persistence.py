"""State snapshots on disk, so a restarted node resumes from its last state instead of resyncing.

A snapshot is ``MAGIC`` followed by one msgpack map ``{"saved_at", "hlc": [wall_ms, logical],
"atoms": [wire atoms]}``, written to a temporary file, fsynced and renamed into place. Loading
re-admits every atom through :meth:`CrdtStore.merge` (signatures, write rules, horizons), so a
corrupted or tampered file cannot inject state. A snapshot older than the tombstone TTL is not
loaded at all: tombstones it predates may already be collected elsewhere, and replaying it could
resurrect deleted entries; such a node resyncs by anti-entropy instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgpack

from .atoms import DEFAULT_LIMITS, Limits, decode_atom, encode_atom
from .errors import MalformedDelta, SnapshotError
from .hlc import Hlc
from .store import CrdtStore

__all__ = [
    "SNAPSHOT_MAGIC",
    "SnapshotLoad",
    "encode_snapshot",
    "load_snapshot",
    "save_snapshot",
    "write_snapshot_file",
]

SNAPSHOT_MAGIC = b"latticaray-state-snapshot/1\n"
MAX_SNAPSHOT_BYTES = 1 << 30


@dataclass
class SnapshotLoad:
    loaded: int = 0
    rejected: int = 0
    skipped_reason: str | None = None


def encode_snapshot(store: CrdtStore, now: float) -> bytes:
    """The snapshot bytes of ``store`` (call on the thread that owns the store)."""
    return SNAPSHOT_MAGIC + msgpack.packb(
        {
            "saved_at": now,
            "hlc": list(store.clock.last),
            "atoms": [encode_atom(a) for a in store.atoms()],
        },
        use_bin_type=True,
    )


def write_snapshot_file(path: str | os.PathLike, data: bytes) -> int:
    """Write snapshot bytes atomically (temp file, fsync, rename); safe to run in a thread."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return len(data)


def save_snapshot(path: str | os.PathLike, store: CrdtStore, now: float) -> int:
    """Write every atom of ``store`` to ``path`` atomically; returns the number of bytes."""
    return write_snapshot_file(path, encode_snapshot(store, now))


def load_snapshot(
    path: str | os.PathLike, store: CrdtStore, now: float, limits: Limits = DEFAULT_LIMITS
) -> SnapshotLoad:
    """Merge a snapshot into ``store``. A missing file loads nothing; a bad one raises."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return SnapshotLoad(skipped_reason="no snapshot")
    if size > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"snapshot {path} is {size} bytes (limit {MAX_SNAPSHOT_BYTES})")
    data = path.read_bytes()
    if not data.startswith(SNAPSHOT_MAGIC):
        raise SnapshotError(f"{path} is not a latticaray state snapshot (or another version)")
    try:
        body = msgpack.unpackb(data[len(SNAPSHOT_MAGIC) :], raw=False)
        saved_at = float(body["saved_at"])
        hlc = Hlc(int(body["hlc"][0]), int(body["hlc"][1]))
        raw_atoms = body["atoms"]
        if not isinstance(raw_atoms, list):
            raise TypeError("atoms is not a list")
    except Exception as exc:  # any decoding problem means the file is unusable
        raise SnapshotError(f"snapshot {path} is malformed: {exc}") from None
    if now - saved_at > store.tombstone_ttl:
        return SnapshotLoad(
            skipped_reason=f"snapshot is {now - saved_at:.0f} s old, past the "
            f"tombstone TTL; resyncing instead"
        )
    atoms, rejected = [], 0
    for item in raw_atoms:
        try:
            atoms.append(decode_atom(item, limits))
        except MalformedDelta:
            rejected += 1
    if hlc.wall_ms <= int(now * 1000) + store.clock.max_drift_ms:
        store.clock.last = max(store.clock.last, hlc)
    report = store.merge(atoms, now)
    return SnapshotLoad(loaded=len(report.applied), rejected=rejected + len(report.rejected))
