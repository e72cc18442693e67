"""Per-node object store in shared memory (files under /dev/shm, memory-mapped), with a budget.

Layout of a store directory (``root``, on tmpfs)::

    config            msgpack {capacity, spill_dir, spill_capacity}: lets other processes attach
    lock              fcntl.flock'ed around every change to the ledger and the objects directory
    ledger            msgpack {used, spill_used, reservations {owner: bytes}, pins {cid: {pid: n}}}
    objects/<cid>     sealed objects: payload (page aligned) | manifest | u32 length | b"LRAYOBJ1"
    local/<name>      objects put by ``put_local``, not hashed yet: payload | zeros | msgpack
                      [size, chunk, hash code, meta, writer pid] | u32 length | b"LRAYLOC1",
                      the file as large as the reservation; once linked, a symlink to
                      ../objects/<cid>
    tmp/<pid>-<id>    objects being written; sealed by rename(2), so a half-written object is never
                      visible under objects/ (crash-safe); leftovers of dead processes are removed

Budget: bytes under ``objects/`` plus reservations of writes in flight never exceed ``capacity``.
A put reserves its size first, evicting least-recently-used unpinned objects (use time = file
mtime, touched on ``get``): they are spilled to ``spill_dir`` on disk (written, fsynced, renamed)
while the spill budget allows, else deleted. Pinned objects are never evicted or spilled; a put
that cannot fit beside them raises :class:`StoreFull`. ``get`` of a spilled object restores it
transparently. Two puts of the same content (any processes) keep one copy: the second sees the
sealed CID and discards its temp file.

Any process on the host may open the same directory (``LocalStore.attach(root)``) and put/get;
reads are zero-copy: ``get`` returns values whose buffers are read-only views of the mapping.
A mapping stays valid after its file is evicted (tmpfs frees the pages when the last view dies).

Warm spare (put throughput): on this kind of host, a put's cost is dominated not by copying but by
the kernel allocating, zeroing and mapping fresh tmpfs pages (write(2) into /dev/shm ~2 GB/s while
memcpy into mapped memory is ~11 GB/s). After a large put (>= ``WARM_MIN_BYTES``), each process
prepares in a background thread one spare temp file of that size: ``posix_fallocate``d, mapped
writable and every page touched. The next put that fits copies its payload straight into that
mapping block by block (no intermediate buffer), hashing each block right after copying it while
it is in cache, on the hash pool's threads; then it trims the file to its sealed size and
renames it into ``objects/`` as usual. The spare is a reservation in the ledger (so the budget
holds), is made only from free room (never evicts anything, needs twice its size free), and the
spares of all processes together stay within ``capacity // 8``; its reservation token ends in
``-warm`` and ``stats()["warm"]`` reports it. Making a spare costs more CPU than the write it
saves (the pages are allocated, zeroed and mapped either way), so it is made by a niced thread,
and only while large puts leave it the idle time: a put that comes sooner takes the plain path.
``close()`` (or process exit) gives it back; spares of processes that died without closing are
reclaimed when room is needed or the next spare is made. ``warm=False`` disables it.

Recycling (back-to-back puts): ``delete`` of a large sealed object (>= ``WARM_MIN_BYTES``), or
a large put whose content is already sealed (a duplicate: its temp file would be discarded), may
turn that file into this process's spare instead of unlinking it, so the next put reuses pages
that are already allocated and resident. Under the ledger lock the file is renamed out of
``objects/`` (or its temp name) into
``tmp/<pid>-<id>-warm`` (from then on no CID names it and nobody can open it by name; a crash
leaves only a temp file that recovery removes) and its bytes become a spare reservation (rounded
up to the spare granule; only if that keeps the budget and all spares within ``capacity // 8``).
The rule that keeps readers safe: a recycled file is written only after the kernel proves that
no one else has it open or mapped: a background thread opens it and takes a write lease
(``F_SETLEASE F_WRLCK``), which Linux grants only when the file has no other open file, and a
mapping (even after its fd is closed) keeps its file open. Since the file can no longer be
opened by name, what is proven at that moment stays true. If the lease is refused (a reader in
any process, this one included, still holds a view, or leases are unavailable) the file is
unlinked as a plain delete would, and readers keep their bytes. Eviction never recycles (it runs
precisely when room is needed). A put into a recycled spare writes every byte it keeps (payload
``pieces`` are copied with their gaps zeroed; other payloads are written over zeroed memory) and
trims the file to the new object's size, so nothing of the old object survives. ``recycle=False``
(or the environment variable ``LATTICARAY_STORE_RECYCLE=0``) turns recycling off; ``warm=False``
turns it off too. A fresh spare being made when a file to recycle comes gives way (its maker
stops within one granule and gives its reservation back).
A duplicate put that went into the spare finds the object sealed before trimming the spare and
keeps the spare as it is (no file to recycle, nothing to map again). A recycled file's pages
exist, so it is mapped writable with ``MADV_POPULATE_WRITE`` (no page-by-page faulting) by a
thread that is not niced; a put that comes while a file fitting it is being recycled waits for
it (bounded; ~20 ms per 100 MB), and a put that went into a recycled file schedules no fresh
spare. Measured trade-off: a recycled spare is ready far sooner than a fresh one, but a put into
it ran slower here (~2.5-4 GB/s) than into a fresh, fully touched spare (~5 GB/s).

Local names (taking the hash off the put's path): hashing every block costs more than copying it
(BLAKE3 ~3 GB/s per core, memcpy ~11 GB/s), and most objects are only ever read on this host. So
``put_local`` copies the payload (into a spare, block spans on the pool's threads; or write(2))
and seals it, by the same temp-file-and-rename(2) as any put, under ``local/<name>``: ``name`` is
``L`` + 32 random hex digits, unguessable, readable by every process of the host that is given
it (``get(name)`` maps it zero-copy, no hashing). The CID is computed by ``resolve(name)``, by
whichever process asks first (the runtime asks when ``ref.cid`` is read and when a reference or
the object leaves the node): it hashes the blocks from the mapping, then under the ledger lock
writes the manifest and the usual trailer in place (voiding the local trailer's magic first),
cuts the file to its sealed size (never below the payload, which readers have mapped), links
it as ``objects/<cid>`` (a hard link) and replaces ``local/<name>`` by a symlink to it; a store
opened after a crash finishes a link cut short (or restores the voided magic). If that CID is
sealed already the local file is dropped instead (dedup). Readers read the local trailer with pread,
twice, like a seqlock: a trailer that changed meanwhile is read again, via the symlink. The
ledger's ``links`` counts the names linked to each CID; deleting a linked name deletes the
object with the last name, unless the object was sealed under its CID before any of them
(``links`` entries: [names, made by a link, writer pid]). Pins
taken by name move to the CID. Eviction links a local object first (the spill is named by
CID), then spills it as any other. Objects received from peers are untouched by this: they are
verified block by block and sealed under their CID as before.

Gifts (back-to-back local puts): a local object's trailer names its writer (and ``links``
keeps it once linked). When an unresolved local object is deleted (by any process: in the
runtime, the node), or the last name of an object its link sealed, its file (>=
``WARM_MIN_BYTES``) is renamed to ``tmp/<writer pid>-<id>-gift-warm`` and its bytes become a
reservation of the writer, instead of being unlinked (given-back files of all processes stay
within ``capacity // 8``, apart from fresh spares). The writer's next put that finds no spare
takes it: it proves with the write lease that no one else has the file open or mapped (else it
unlinks it: readers keep their bytes), and writes through the mapping it kept when it wrote the
file (``_RETAINED_MAX`` such mappings, with their fds; dropped once their file is deleted
elsewhere), so the put is a plain memcpy into mapped, resident pages. The lease is taken on the
kept fd itself, which the kernel counts as the only opener when nobody else has the file. A
process that drops its last reference to an object it put (``expect_back``) lets its next put
wait, at most a quarter of what fresh pages would cost, for that file to come back.
``warm=False`` or ``LATTICARAY_STORE_RECYCLE=0`` (of the writer or of the deleter) turn gifts
off. Before a given-back file is written, it is cut to the new payload's size, so nothing of the
old object survives.

Public API::

    store = LocalStore(root=None, capacity_bytes=None, spill_dir=None, spill_capacity_bytes=None,
                       chunk_size=1 << 20, hash_code=SHA2_256, warm=True, recycle=None)
    client = LocalStore.attach(root)                 # another process on the same host
    cid = store.put(value, pin=False)                # serialize + seal -> root CID (bafyrei...)
    name = store.put_local(value, pin=False)         # seal without hashing -> local name (L...)
    cid = store.resolve(name)                        # hash + link it (once); CIDs pass through
    store.cid_if_resolved(name)                      # its CID if known without hashing, or None
    value = store.get(cid)                           # zero-copy; ObjectNotFound if absent
    obj = store.get_object(cid)                      # StoredObject: .manifest, .payload (memoryview)
    store.contains(cid); store.pin(cid); store.unpin(cid); store.delete(cid); store.stats()
                                                     # (all of these take local names too)
    writer = store.open_writer(manifest)             # for fetched blocks: write_block(i, data), seal()
    store.wait_warm(timeout); store.close()          # the warm spare: wait for it; give it back
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import fcntl
import mmap
import multiprocessing.util
import os
import secrets
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import psutil

from . import dagcbor
from .cid import DAG_CBOR, SHA2_256, Cid, hash_digest
from .errors import BlockVerificationError, CodecError, ObjectNotFound, ObjectStoreError, StoreFull
from .manifest import (
    DEFAULT_CHUNK_SIZE,
    Manifest,
    block_spans,
    build_manifest,
    hash_pool,
    manifest_from_digests,
)
from .serialization import SerializedObject, deserialize, serialize

__all__ = [
    "WARM_MIN_BYTES",
    "LocalStore",
    "ObjectWriter",
    "StoredObject",
    "default_capacity",
    "is_local_name",
]

_TRAILER_MAGIC = b"LRAYOBJ1"
_LOCAL_MAGIC = b"LRAYLOC1"
_TRAILER = struct.Struct(">I8s")
_LOCAL_PREFIX = "L"
_LOCAL_NAME_HEX = 32
_COPY_SPAN = 8 << 20  # a payload is copied by the pool's threads in spans of this size
_DEFAULT_RAM_FRACTION = 0.3
WARM_MIN_BYTES = 16 << 20
_WARM_GRANULE = 16 << 20
_WARM_SUFFIX = "-warm"
_GIFT_SUFFIX = "-gift" + _WARM_SUFFIX  # a spare handed to the process that wrote it (Gifts)
_RETAINED_MAX = 2  # spent spares whose mappings a process keeps for when their files come back
RECYCLE_ENV = "LATTICARAY_STORE_RECYCLE"
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14


def _prove_not_open_elsewhere(fd: int) -> None:
    """Raise OSError unless ``fd`` is the only open file (or mapping) of its inode: Linux grants
    a write lease only then. The lease is dropped at once; it is only a probe."""
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def is_local_name(name: Any) -> bool:
    """True for the names ``put_local`` gives (``L`` + 32 hex digits); CIDs never look like it."""
    return (
        isinstance(name, str)
        and len(name) == 1 + _LOCAL_NAME_HEX
        and name[0] == _LOCAL_PREFIX
        and all(c in "0123456789abcdef" for c in name[1:])
    )


class _TornRead(Exception):
    """A local object's trailer changed while it was read (it was being linked under its CID)."""


def _read_local(
    path: str, map_payload: bool = True
) -> tuple[dict[str, Any], memoryview, int, int, int, int]:
    """Map an unresolved local object: (meta, payload view, size, chunk size, hash code, pid of
    the writer if it takes recycled files back, else 0). ``map_payload=False``: an empty view.

    The trailer is read with pread (never through the mapping: linking the object under its CID
    shrinks the file below the trailer) and read again after, like a seqlock: linking voids
    the magic first, so an unchanged second read proves the first saw a whole trailer."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        tail = os.pread(fd, _TRAILER.size, size - _TRAILER.size) if size >= _TRAILER.size else b""
        if len(tail) != _TRAILER.size:
            raise _TornRead(path)
        blob_len, magic = _TRAILER.unpack(tail)
        if magic != _LOCAL_MAGIC or blob_len > size - _TRAILER.size:
            raise _TornRead(path)
        blob = os.pread(fd, blob_len, size - _TRAILER.size - blob_len)
        if os.pread(fd, _TRAILER.size, size - _TRAILER.size) != tail or len(blob) != blob_len:
            raise _TornRead(path)
        try:
            nbytes, chunk, code, meta, writer = msgpack.unpackb(
                blob, raw=False, strict_map_key=False
            )
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ObjectStoreError(f"local object {path} has a bad trailer: {exc}") from None
        if nbytes + blob_len + _TRAILER.size > size:
            raise ObjectStoreError(f"local object {path} is truncated")
        if nbytes == 0 or not map_payload:
            return meta, memoryview(b""), nbytes, chunk, code, writer
        # only the payload is mapped: it is never cut off, unlike the trailer
        mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ)
        return meta, memoryview(mapping), nbytes, chunk, code, writer
    finally:
        os.close(fd)


def default_capacity(fraction: float = _DEFAULT_RAM_FRACTION, shm_root: str = "/dev/shm") -> int:
    """A fraction of RAM, bounded by the free space of the shm filesystem."""
    budget = int(psutil.virtual_memory().total * fraction)
    with contextlib.suppress(OSError):
        budget = min(budget, int(shutil.disk_usage(shm_root).free * 0.9))
    return budget


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_default_stores(parent: str, spill_parent: str) -> None:
    """Default-named stores (``store-<pid>-<hex>``) of processes that died leak shared memory:
    remove them (and their spill directories) when a new default store is created."""
    for directory in (parent, spill_parent):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            parts = name.split("-")
            if (
                len(parts) == 3
                and parts[0] == "store"
                and parts[1].isdigit()
                and not _pid_alive(int(parts[1]))
            ):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


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


def _map_readonly(path: str) -> tuple[mmap.mmap | None, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None, 0
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ), size
    finally:
        os.close(fd)


def _read_sealed(cid: Cid, path: str, manifest_cache: OrderedDict[Cid, Manifest]) -> StoredObject:
    mapping, size = _map_readonly(path)
    if mapping is None or size < _TRAILER.size:
        raise ObjectStoreError(f"sealed object file {path} is truncated")
    view = memoryview(mapping)
    manifest_len, magic = _TRAILER.unpack(view[size - _TRAILER.size :])
    if magic != _TRAILER_MAGIC or manifest_len > size - _TRAILER.size:
        raise ObjectStoreError(f"sealed object file {path} has a bad trailer")
    payload_end = size - _TRAILER.size - manifest_len
    manifest = manifest_cache.get(cid)
    if manifest is None:
        manifest = Manifest.decode(cid, view[payload_end : payload_end + manifest_len])
        manifest_cache[cid] = manifest
        while len(manifest_cache) > 1024:
            manifest_cache.popitem(last=False)
    if manifest.size != payload_end:
        raise ObjectStoreError(
            f"sealed object file {path} has {payload_end} payload bytes, manifest says {manifest.size}"
        )
    return StoredObject(cid, manifest, view[:payload_end])


def _sealed_size(manifest: Manifest) -> int:
    return manifest.size + len(manifest.encoded) + _TRAILER.size


class ObjectWriter:
    """An object being assembled in a temp file (from a local put or from fetched blocks).

    ``write_block`` verifies each block against the manifest before accepting it. ``seal`` makes
    the object visible atomically; ``abort`` discards it and releases its reservation.
    """

    def __init__(
        self, store: LocalStore, manifest: Manifest, temp_path: str, reservation: str
    ) -> None:
        self.store = store
        self.manifest = manifest
        self._path = temp_path
        self._reservation = reservation
        self._have = bytearray(len(manifest.blocks))
        self._missing = len(manifest.blocks)
        # blocks are written with pwrite (cheaper than faulting fresh tmpfs pages through a
        # mapping) and read back, for peers we serve while fetching, through a read-only mapping
        self._fd = os.open(temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(self._fd, max(manifest.size, 1))
            self._map = mmap.mmap(self._fd, max(manifest.size, 1), access=mmap.ACCESS_READ)
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._map)[: manifest.size]
        self._done = False

    @property
    def root(self) -> Cid:
        return self.manifest.root

    def has_block(self, index: int) -> bool:
        return bool(self._have[index])

    def have_bitmap(self) -> bytes:
        return bytes(self._have)

    def missing_blocks(self) -> list[int]:
        return [i for i, have in enumerate(self._have) if not have]

    @property
    def complete(self) -> bool:
        return self._missing == 0

    def write_block(self, index: int, data: bytes | memoryview) -> bool:
        """Verify and store block ``index``; False if it was already present."""
        if self._done:
            raise ObjectStoreError("writer already sealed or aborted")
        if not 0 <= index < len(self._have):
            raise IndexError(f"block index {index} out of range")
        if self._have[index]:
            return False
        expected = self.manifest.blocks[index]
        if len(data) != self.manifest.sizes[index] or not expected.verify(data):
            raise BlockVerificationError(expected)
        start, _ = self.manifest.block_range(index)
        written = os.pwrite(self._fd, data, start)
        while written < len(data):  # pwrite may write less on huge buffers
            written += os.pwrite(self._fd, memoryview(data)[written:], start + written)
        self._have[index] = 1
        self._missing -= 1
        return True

    def read_block(self, index: int) -> memoryview | None:
        if self._done or not self._have[index]:
            return None  # sealed (now served from the store) or aborted, or not here yet
        start, end = self.manifest.block_range(index)
        return self._view[start:end]

    def payload_view(self) -> memoryview:
        return self._view

    def seal(self, pin: bool = False) -> Cid:
        if not self.complete:
            raise ObjectStoreError(f"cannot seal {self.root}: {self._missing} blocks missing")
        self._release_mapping()
        with open(self._path, "r+b") as file:
            file.truncate(self.manifest.size)
            file.seek(self.manifest.size)
            file.write(self.manifest.encoded)
            file.write(_TRAILER.pack(len(self.manifest.encoded), _TRAILER_MAGIC))
        self._done = True
        return self.store._seal(self.manifest, self._path, self._reservation, pin)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._release_mapping()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        self.store._release_reservation(self._reservation)

    def _release_mapping(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # a block view handed out is still alive; the GC closes it later
            pass

    def __del__(self) -> None:  # pragma: no cover - safety net
        with contextlib.suppress(Exception):
            self.abort()


_stores_with_spares: dict[int, LocalStore] = {}
_exit_hooks_installed = False


def _close_stores_at_exit() -> None:
    for store in list(_stores_with_spares.values()):
        with contextlib.suppress(Exception):
            store.close()


def _register_for_exit(store: LocalStore) -> None:
    """Keep ``store`` until it is closed or the process exits, then give its spare back."""
    global _exit_hooks_installed
    _stores_with_spares[id(store)] = store
    if not _exit_hooks_installed:
        _exit_hooks_installed = True
        atexit.register(_close_stores_at_exit)
        # multiprocessing children skip atexit; they run these finalizers instead
        multiprocessing.util.Finalize(None, _close_stores_at_exit, exitpriority=10)


class _WarmFile:
    """A pre-allocated, pre-faulted temp file mapped writable, waiting for the next large put."""

    def __init__(
        self,
        path: str,
        token: str,
        size: int,
        recycled: bool = False,
        abandon: threading.Event | None = None,
    ) -> None:
        self.path = path
        self.token = token
        self.size = size
        self.recycled = recycled  # made from a deleted object's file (see the module docstring)
        self.fd = os.open(
            path, os.O_RDWR if recycled else os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600
        )
        try:
            if recycled:
                _prove_not_open_elsewhere(self.fd)  # before any byte of it is written
            # in steps, so that a fresh spare can be given up for a recycled file (``abandon``)
            for start in range(0, size, _WARM_GRANULE):
                if abandon is not None and abandon.is_set():
                    raise InterruptedError("spare abandoned for a recycled file")
                os.posix_fallocate(self.fd, start, min(_WARM_GRANULE, size - start))
            self.map = mmap.mmap(self.fd, size)
            if recycled:
                # its pages exist: map them writable in one call per granule (no per-page fault);
                # kernels without MADV_POPULATE_WRITE fall back to touching every page below
                try:
                    for start in range(0, size, _WARM_GRANULE):
                        self.map.madvise(
                            _MADV_POPULATE_WRITE, start, min(_WARM_GRANULE, size - start)
                        )
                except OSError:
                    recycled_populated = False
                else:
                    recycled_populated = True
            # map every page now, with one store per page (numpy lets the GIL go): unlike
            # MAP_POPULATE this never holds the address-space lock for long, which would stall
            # the mmap/munmap of puts running beside it
            pages = np.frombuffer(self.map, dtype=np.uint8)
            for start in range(0, 0 if recycled and recycled_populated else size, _WARM_GRANULE):
                if abandon is not None and abandon.is_set():
                    del pages
                    self.map.close()
                    raise InterruptedError("spare abandoned for a recycled file")
                pages[start : start + _WARM_GRANULE : mmap.PAGESIZE] = 0
            del pages
        except BaseException:
            os.close(self.fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise

    def close(self) -> None:
        """Unmap and close (the file itself stays)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.map.close()
        except BufferError:  # a view of the mapping is still alive; the GC unmaps it later
            pass


class LocalStore:
    """The shared-memory object store of one node, attachable from other processes on the host."""

    def __init__(
        self,
        root: str | None = None,
        capacity_bytes: int | None = None,
        spill_dir: str | None = None,
        spill_capacity_bytes: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        hash_code: int = SHA2_256,
        warm: bool = True,
        recycle: bool | None = None,
        _attach: bool = False,
    ) -> None:
        if root is None:
            parent = os.path.join(
                "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                f"latticaray-{os.getuid()}",
            )
            if spill_dir is None:
                _remove_dead_default_stores(
                    parent, os.path.join(tempfile.gettempdir(), f"latticaray-spill-{os.getuid()}")
                )
            root = os.path.join(parent, f"store-{os.getpid()}-{secrets.token_hex(3)}")
        self.root = os.path.abspath(root)
        self.chunk_size = chunk_size
        self.hash_code = hash_code
        self._objects = os.path.join(self.root, "objects")
        self._tmp = os.path.join(self.root, "tmp")
        self._local = os.path.join(self.root, "local")
        self._thread_lock = threading.RLock()
        self._manifests: OrderedDict[Cid, Manifest] = OrderedDict()
        self.warm_enabled = warm
        if recycle is None:
            recycle = os.environ.get(RECYCLE_ENV, "1") not in ("0", "false", "no", "off")
        self.recycle_enabled = warm and recycle
        self.spares_recycled = 0  # deleted objects' files made into spares (observability; tests)
        self._warm: _WarmFile | None = None
        self._warm_lock = threading.Lock()
        self._warm_ready = threading.Condition(self._warm_lock)  # notified when a refill ends
        self._warm_refilling = False
        self._abandon_refill = threading.Event()  # tells a fresh spare's maker to give up
        self._fresh_token: str | None = None  # reservation of the fresh spare being made
        self._recycling = False  # a file is on its way to become the spare (one at a time)
        self._recycling_size = 0
        self._last_large_put_end = float("-inf")
        self._refill_seconds = 0.0  # how long the last spare took to make
        self.spares_made = 0  # by this process (observability; tests)
        self._warm_pid = os.getpid()
        self._warm_unmap: list[_WarmFile] = []  # spent spares whose mappings are yet to be closed
        # spares written by local puts, still mapped (and open) for when their files come back
        self._retained: OrderedDict[tuple[int, int], _WarmFile] = OrderedDict()
        self.gifts_taken = 0  # recycled files this process got back (observability; tests)
        self.gifts_reused_mapping = 0  # of which it still had mapped
        self._expected: collections.deque[str] = collections.deque(maxlen=4)  # see expect_back
        config_path = os.path.join(self.root, "config")
        if _attach:
            try:
                with open(config_path, "rb") as file:
                    config = msgpack.unpackb(file.read(4096))
            except FileNotFoundError:
                raise ObjectStoreError(f"no object store at {self.root}") from None
            self.capacity = int(config["capacity"])
            self.spill_dir = config["spill_dir"]
            self.spill_capacity = int(config["spill_capacity"])
            return
        self.capacity = int(capacity_bytes) if capacity_bytes is not None else default_capacity()
        if spill_dir is None:
            spill_dir = os.path.join(
                tempfile.gettempdir(),
                f"latticaray-spill-{os.getuid()}",
                os.path.basename(self.root),
            )
        self.spill_dir = spill_dir
        self.spill_capacity = (
            int(spill_capacity_bytes) if spill_capacity_bytes is not None else 4 * self.capacity
        )
        for path in (
            self._objects,
            self._tmp,
            self._local,
            self.spill_dir,
            os.path.join(self.spill_dir, ".tmp"),
        ):
            os.makedirs(path, exist_ok=True)
        with self._locked() as ledger:
            with open(config_path + ".tmp", "wb") as file:
                file.write(
                    msgpack.packb(
                        {
                            "capacity": self.capacity,
                            "spill_dir": self.spill_dir,
                            "spill_capacity": self.spill_capacity,
                        }
                    )
                )
            os.replace(config_path + ".tmp", config_path)
            self._recover(ledger)

    @classmethod
    def attach(cls, root: str) -> LocalStore:
        """Open an existing store directory from another process (the same-host client)."""
        return cls(root, _attach=True)

    # --- ledger under flock ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        with self._thread_lock:
            fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                ledger = self._load_ledger()
                before = msgpack.packb(ledger)
                yield ledger
                after = msgpack.packb(ledger)
                if after != before:
                    path = os.path.join(self.root, "ledger")
                    with open(path + ".tmp", "wb") as file:
                        file.write(after)
                    os.replace(path + ".tmp", path)
            finally:
                os.close(fd)  # closing releases the flock

    def _load_ledger(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.root, "ledger"), "rb") as file:
                ledger = msgpack.unpackb(file.read(), strict_map_key=False)
        except FileNotFoundError:
            ledger = {}
        ledger.setdefault("used", 0)
        ledger.setdefault("spill_used", 0)
        ledger.setdefault("reservations", {})
        ledger.setdefault("pins", {})
        ledger.setdefault("links", {})  # {cid: [local names linked to it, made by linking one]}
        return ledger

    def _recover(self, ledger: dict[str, Any]) -> None:
        """Drop state of dead processes and recount bytes from the directories."""
        made = self._recover_local()
        for name in os.listdir(self._tmp):
            pid = name.split("-", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._tmp, name))
        ledger["reservations"] = {
            k: v for k, v in ledger["reservations"].items() if _pid_alive(int(k.split("-", 1)[0]))
        }
        pins = {}
        for cid, holders in ledger["pins"].items():
            alive = {pid: n for pid, n in holders.items() if _pid_alive(int(pid))}
            if alive:
                pins[cid] = alive
        ledger["pins"] = pins
        ledger["used"] = sum(
            e.stat().st_size for e in os.scandir(self._objects) if e.is_file()
        ) + sum(
            e.stat().st_size for e in os.scandir(self._local) if e.is_file(follow_symlinks=False)
        )
        counts: dict[str, int] = {}
        for entry in os.scandir(self._local):
            if entry.is_symlink():
                target = os.path.basename(os.readlink(entry.path))
                counts[target] = counts.get(target, 0) + 1
        old = ledger["links"]
        ledger["links"] = {}
        for cid, n in counts.items():
            _, born, writer = (list(old.get(cid) or []) + [0, False, 0])[:3]
            ledger["links"][cid] = [n, cid in made or bool(born), int(writer)]
        ledger["spill_used"] = sum(
            e.stat().st_size for e in os.scandir(self.spill_dir) if e.is_file()
        )

    # --- budget ----------------------------------------------------------------------------------
    def _reserve(self, ledger: dict[str, Any], nbytes: int, keep: str | None = None) -> str:
        if nbytes > self.capacity:
            raise StoreFull(
                f"object of {nbytes} bytes exceeds the store capacity of {self.capacity}"
            )
        self._make_room(ledger, nbytes, keep)
        token = f"{os.getpid()}-{secrets.token_hex(6)}"
        ledger["reservations"][token] = nbytes
        return token

    def _release_reservation(self, token: str) -> None:
        with self._locked() as ledger:
            ledger["reservations"].pop(token, None)

    def _committed(self, ledger: dict[str, Any]) -> int:
        return ledger["used"] + sum(ledger["reservations"].values())

    def _reclaim_dead(self, ledger: dict[str, Any]) -> None:
        """Drop the reservations (writes in flight, spares) and temp files of dead processes."""
        for token in [t for t in ledger["reservations"] if not _pid_alive(int(t.split("-", 1)[0]))]:
            del ledger["reservations"][token]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._tmp, token))

    def _make_room(self, ledger: dict[str, Any], nbytes: int, keep: str | None) -> None:
        if self._committed(ledger) + nbytes <= self.capacity:
            return
        self._reclaim_dead(ledger)
        candidates = []
        for directory in (self._objects, self._local):
            for entry in os.scandir(directory):
                if entry.is_file(follow_symlinks=False) and entry.name not in ledger["pins"]:
                    stat = entry.stat(follow_symlinks=False)
                    candidates.append((stat.st_mtime_ns, entry.name, stat.st_size))
        candidates.sort()
        for _, name, size in candidates:
            if self._committed(ledger) + nbytes <= self.capacity:
                break
            if is_local_name(name):
                # spilled objects are named by CID: link it under its CID first (hashing it now)
                try:
                    manifest, writer = self._hash_local(os.path.join(self._local, name))
                except (FileNotFoundError, _TornRead):
                    continue
                cid = self._link_local(ledger, name, manifest, writer, gift=False)
                if self._committed(ledger) + nbytes <= self.capacity:
                    break  # a copy of it was sealed already: linking freed this one
                name = str(cid)
                try:
                    size = os.stat(os.path.join(self._objects, name)).st_size
                except FileNotFoundError:
                    continue
                if name in ledger["pins"]:
                    continue
            self._evict_one(ledger, name, size, keep)
        if self._committed(ledger) + nbytes > self.capacity:
            raise StoreFull(
                f"cannot fit {nbytes} bytes: {self._committed(ledger)} of {self.capacity} "
                "are pinned or reserved by writes in flight"
            )

    def _evict_one(self, ledger: dict[str, Any], name: str, size: int, keep: str | None) -> None:
        source = os.path.join(self._objects, name)
        if size <= self.spill_capacity:
            self._make_spill_room(ledger, size, keep)
            if ledger["spill_used"] + size <= self.spill_capacity:
                temp = os.path.join(self.spill_dir, ".tmp", f"{os.getpid()}-{secrets.token_hex(6)}")
                try:
                    shutil.copyfile(source, temp)
                    with open(temp, "rb") as file:
                        os.fsync(file.fileno())
                    os.replace(temp, os.path.join(self.spill_dir, name))
                    ledger["spill_used"] += size
                except OSError:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(source)
        ledger["used"] -= size

    def _make_spill_room(self, ledger: dict[str, Any], nbytes: int, keep: str | None) -> None:
        if ledger["spill_used"] + nbytes <= self.spill_capacity:
            return
        spilled = []
        for entry in os.scandir(self.spill_dir):
            if entry.is_file() and entry.name not in ledger["pins"] and entry.name != keep:
                stat = entry.stat()
                spilled.append((stat.st_mtime_ns, entry.name, stat.st_size))
        spilled.sort()
        for _, name, size in spilled:
            if ledger["spill_used"] + nbytes <= self.spill_capacity:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.spill_dir, name))
            ledger["spill_used"] -= size

    # --- writing ---------------------------------------------------------------------------------
    def open_writer(self, manifest: Manifest) -> ObjectWriter:
        """Reserve room for ``manifest``'s object and return a writer for its blocks."""
        with self._locked() as ledger:
            token = self._reserve(ledger, _sealed_size(manifest))
        temp = os.path.join(self._tmp, f"{token}")
        try:
            return ObjectWriter(self, manifest, temp, token)
        except BaseException:
            self._release_reservation(token)
            raise

    def put(self, value: Any, pin: bool = False) -> Cid:
        """Serialize ``value`` into the store; return its root CID (deduplicated by content)."""
        return self.put_serialized(serialize(value), pin=pin)

    def _estimate(self, ser: SerializedObject) -> int:
        """Bytes reserved for ``ser``: at least its sealed size (payload, manifest, trailer)."""
        blocks = max(1, -(-ser.nbytes // self.chunk_size))
        return ser.nbytes + 512 + 2 * len(msgpack.packb(ser.meta, default=bytes)) + 48 * blocks

    def put_local(self, value: Any, pin: bool = False) -> str:
        """Serialize ``value`` into the store without hashing it; return its local name.

        The object is sealed (complete, crash-safe, readable by every process of the host that
        is given the name) at once; its CID is computed later, by ``resolve`` (see Local names
        in the module docstring)."""
        return self.put_serialized_local(serialize(value), pin=pin)

    def put_serialized_local(self, ser: SerializedObject, pin: bool = False) -> str:
        estimate = self._estimate(ser)
        writer = os.getpid() if self.recycle_enabled else 0  # who takes its file back (Gifts)
        trailer = msgpack.packb(
            [ser.nbytes, self.chunk_size, self.hash_code, ser.meta, writer],
            use_bin_type=True,
            default=bytes,
        )
        trailer += _TRAILER.pack(len(trailer), _LOCAL_MAGIC)
        if ser.nbytes + len(trailer) > estimate:
            raise ObjectStoreError("internal error: local trailer larger than its reservation")
        started = time.monotonic()
        name = _LOCAL_PREFIX + secrets.token_hex(_LOCAL_NAME_HEX // 2)
        if writer and ser.nbytes >= WARM_MIN_BYTES:
            _register_for_exit(self)  # its file may come back: given-back spares go at exit
        warm = self._take_warm(estimate, ser) if ser.nbytes >= WARM_MIN_BYTES else None
        recycled_spare = warm is not None and warm.recycled
        try:
            if warm is not None:
                path, token = warm.path, warm.token
                try:
                    with memoryview(warm.map) as view, view[: ser.nbytes] as payload:
                        self._copy_into(ser, payload, zero_first=warm.recycled)
                    # the file keeps the reserved size, so linking it under its CID later
                    # writes the manifest in place and only shrinks it (the budget holds); cut
                    # to the payload first, so no byte of a recycled file's object survives
                    os.ftruncate(warm.fd, ser.nbytes)
                    os.ftruncate(warm.fd, estimate)
                    if os.pwrite(warm.fd, trailer, estimate - len(trailer)) != len(trailer):
                        raise ObjectStoreError("short write of a local object's trailer")
                    self._retain(warm)
                except BaseException:
                    self._discard_spare(warm)
                    raise
            else:
                with self._locked() as ledger:
                    if (
                        self._warm is not None
                        and self._committed(ledger) + estimate > self.capacity
                    ):
                        self._drop_warm(ledger)
                    token = self._reserve(ledger, estimate)
                path = os.path.join(self._tmp, token)
                try:
                    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                    ser.write_to_file(path)
                    with open(path, "r+b") as file:
                        file.truncate(estimate)
                        file.seek(estimate - len(trailer))
                        file.write(trailer)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    self._release_reservation(token)
                    raise
            with self._locked() as ledger:
                ledger["reservations"].pop(token, None)
                try:
                    os.rename(path, os.path.join(self._local, name))
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    raise
                ledger["used"] += estimate
                if pin:
                    self._add_pin(ledger, name)
            return name
        finally:
            if ser.nbytes >= WARM_MIN_BYTES:
                self._schedule_warm(estimate, started, fresh=not recycled_spare)

    def _copy_into(self, ser: SerializedObject, dest: memoryview, zero_first: bool) -> None:
        """Fill ``dest`` with the payload (no hashing), spans copied by the pool's threads."""
        if ser.pieces is None:
            if zero_first:  # a writer that skips padding must not leave a recycled file's bytes
                np.frombuffer(dest, dtype=np.uint8)[:] = 0
            ser.write_into(dest)
            return
        target = np.frombuffer(dest, dtype=np.uint8)
        sources = [(offset, np.frombuffer(piece, dtype=np.uint8)) for offset, piece in ser.pieces]
        spans = block_spans(ser.nbytes, _COPY_SPAN)
        if len(spans) == 1:
            self._copy_span(spans[0], sources, target)
        else:
            list(hash_pool().map(lambda span: self._copy_span(span, sources, target), spans))

    # --- local names -----------------------------------------------------------------------------
    def _alias(self, name: str) -> Cid | None:
        """The CID a local name was linked to; None while it is unresolved. ObjectNotFound if
        the name is unknown (never put, or deleted)."""
        try:
            return Cid.parse(os.path.basename(os.readlink(os.path.join(self._local, name))))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None  # a regular file: not linked yet
            if exc.errno == errno.ENOENT:
                raise ObjectNotFound(name) from None
            raise

    def cid_if_resolved(self, name: str | Cid) -> Cid | None:
        """The CID of ``name`` if it is known without hashing (a CID, or a linked local name)."""
        if not is_local_name(name):
            return Cid.coerce(name)
        return self._alias(name)

    def _hash_local(self, path: str) -> tuple[Manifest, int]:
        """The manifest of an unresolved local object, and its writer (0: none to give back to)."""
        meta, payload, nbytes, chunk, code, writer = _read_local(path)
        try:
            spans = block_spans(nbytes, chunk)
            digests = list(
                hash_pool().map(lambda span: hash_digest(code, payload[span[0] : span[1]]), spans)
            )
        finally:
            payload.release()
        return manifest_from_digests(nbytes, chunk, digests, meta, code), writer

    def resolve(self, name: str | Cid) -> Cid:
        """The CID of a local name: hashes the object (once, by whichever process asks first)
        and links it under its CID (deduplicated against a copy sealed already)."""
        if not is_local_name(name):
            return Cid.coerce(name)
        for _ in range(3):
            cid = self._alias(name)
            if cid is not None:
                return cid
            try:
                manifest, writer = self._hash_local(os.path.join(self._local, name))
            except (FileNotFoundError, _TornRead):
                continue  # linked meanwhile by another process: the alias says where
            with self._locked() as ledger:
                return self._link_local(ledger, name, manifest, writer, gift=True)
        raise ObjectNotFound(name, "local object kept changing while being resolved")

    def _link_local(
        self, ledger: dict[str, Any], name: str, manifest: Manifest, writer: int, gift: bool
    ) -> Cid:
        """Seal the local object ``name`` under ``manifest``'s CID (the caller holds the ledger
        lock); ``name`` becomes a symlink to it. If a copy is sealed already, this file is
        dropped (``gift``: given back to its writer). The writer is remembered with the link
        count: when the last name goes, so does the object, back to its writer."""
        path = os.path.join(self._local, name)
        cid = self._alias(name)
        if cid is not None:
            return cid  # linked by another process between our hashing and the lock
        size = os.stat(path).st_size
        cname = str(manifest.root)
        final = os.path.join(self._objects, cname)
        previous = ledger["links"].get(cname)
        if os.path.exists(final):  # a copy is sealed: keep that one, drop this file
            os.utime(final)
            if not (gift and self._gift_file(ledger, path, writer)):
                os.unlink(path)
                ledger["used"] -= size
            born = bool(previous and previous[1])
            writer = int(previous[2]) if previous and len(previous) > 2 else 0
        else:
            spilled = os.path.join(self.spill_dir, cname)
            if os.path.exists(spilled):
                ledger["spill_used"] -= os.stat(spilled).st_size
                os.unlink(spilled)
            sealed = _sealed_size(manifest)
            fd = os.open(path, os.O_RDWR)
            try:
                os.pwrite(fd, bytes(8), size - 8)  # void the local magic first (see _read_local)
                trailer = manifest.encoded + _TRAILER.pack(len(manifest.encoded), _TRAILER_MAGIC)
                if os.pwrite(fd, trailer, manifest.size) != len(trailer):
                    raise ObjectStoreError(f"short write of the manifest of {cname}")
                os.ftruncate(fd, sealed)
            finally:
                os.close(fd)
            # a second name first, then the local one becomes a symlink: a crash in between
            # leaves both names on one sealed file, which recovery turns into the symlink
            os.link(path, final)
            ledger["used"] += sealed - size
            born = previous is None or bool(previous[1])
        self._symlink_local(name, cname)
        ledger["links"][cname] = [(previous[0] if previous else 0) + 1, born, writer]
        holders = ledger["pins"].pop(name, None)
        if holders:
            merged = ledger["pins"].setdefault(cname, {})
            for pid, count in holders.items():
                merged[pid] = merged.get(pid, 0) + count
        self._manifests[manifest.root] = manifest
        return manifest.root

    def _symlink_local(self, name: str, cname: str) -> None:
        link = os.path.join(self._tmp, f"{os.getpid()}-{secrets.token_hex(6)}-link")
        os.symlink(os.path.join("..", "objects", cname), link)
        os.replace(link, os.path.join(self._local, name))

    def _recover_local(self) -> set[str]:
        """Finish or undo links that a crash interrupted (the caller holds the ledger lock):
        a local file whose magic was voided gets it back (its trailer is intact); one already
        carrying its manifest is linked under its CID. Returns the CIDs so made."""
        made = set()
        for entry in os.scandir(self._local):
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                with open(entry.path, "r+b") as file:
                    size = os.fstat(file.fileno()).st_size
                    if size < _TRAILER.size:
                        continue
                    file.seek(size - _TRAILER.size)
                    length, magic = _TRAILER.unpack(file.read(_TRAILER.size))
                    if magic == bytes(8) and length <= size - _TRAILER.size:
                        file.seek(size - _TRAILER.size - length)
                        fields = msgpack.unpackb(file.read(length), raw=False, strict_map_key=False)
                        if isinstance(fields, list) and len(fields) == 5:
                            file.seek(size - len(_LOCAL_MAGIC))
                            file.write(_LOCAL_MAGIC)
                        continue
                    if magic != _TRAILER_MAGIC or length > size - _TRAILER.size:
                        continue
                    file.seek(size - _TRAILER.size - length)
                    encoded = file.read(length)
                blocks = dagcbor.decode(encoded).get("blocks") or []
                code = blocks[0].hash_code if blocks else self.hash_code
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
                continue
            final = os.path.join(self._objects, str(root))
            try:
                if os.stat(final).st_ino == entry.inode():
                    made.add(str(root))  # the crash came between the two names
            except FileNotFoundError:
                os.link(entry.path, final)
                made.add(str(root))
            self._symlink_local(entry.name, str(root))
        return made

    def put_serialized(self, ser: SerializedObject, pin: bool = False) -> Cid:
        estimate = self._estimate(ser)
        started = time.monotonic()
        warm = self._take_warm(estimate, ser) if ser.nbytes >= WARM_MIN_BYTES else None
        duplicate = False
        recycled_spare = warm is not None and warm.recycled
        if warm is not None:
            manifest, duplicate = self._put_into_warm(ser, warm, estimate, pin)
        else:
            with self._locked() as ledger:
                if self._warm is not None and self._committed(ledger) + estimate > self.capacity:
                    self._drop_warm(ledger)  # our idle spare gives its room back first
                token = self._reserve(ledger, estimate)
            temp = os.path.join(self._tmp, token)
            try:
                os.close(os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                manifest = self._write_and_hash(ser, temp)
                if _sealed_size(manifest) > estimate:
                    raise ObjectStoreError("internal error: manifest larger than its reservation")
                with open(temp, "r+b") as file:
                    file.truncate(manifest.size)
                    file.seek(manifest.size)
                    file.write(manifest.encoded)
                    file.write(_TRAILER.pack(len(manifest.encoded), _TRAILER_MAGIC))
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                self._release_reservation(token)
                raise
            warm = None
        self._manifests[manifest.root] = manifest
        try:
            if duplicate:
                return manifest.root
            if warm is not None:
                return self._seal(manifest, warm.path, warm.token, pin)
            return self._seal(manifest, temp, token, pin)
        finally:
            if ser.nbytes >= WARM_MIN_BYTES:
                # after a put into a recycled file, deletes (or duplicates) are feeding spares:
                # a fresh one would only be abandoned for the next recycled file
                self._schedule_warm(estimate, started, fresh=not recycled_spare)

    # --- warm spare ------------------------------------------------------------------------------
    def _forget_parents_warm(self) -> None:
        """After a fork the spare (and its refill thread) belong to the parent: never touch them."""
        if self._warm_pid != os.getpid():
            self._warm_pid = os.getpid()
            self._warm, self._warm_unmap, self._warm_refilling = None, [], False
            self._retained = OrderedDict()
            self._expected = collections.deque(maxlen=4)
            self._recycling, self._fresh_token = False, None

    def _take_warm(self, estimate: int, ser: SerializedObject) -> _WarmFile | None:
        with self._warm_lock:
            self._forget_parents_warm()
            if self._warm is None and self._recycling and self._recycling_size >= estimate:
                # a file on its way to become the spare is ready in a few ms (its pages exist):
                # far sooner than this put would allocate fresh ones
                self._warm_ready.wait_for(lambda: not self._recycling, timeout=2.0)
            warm = self._warm
            if warm is not None and warm.size >= estimate:
                self._warm = None
                return warm
        return self._take_gift(estimate)

    # --- gifts: files of deleted local objects, back to the process that wrote them ------------
    def _gift_file(self, ledger: dict[str, Any], path: str, writer: int | None = None) -> bool:
        """Hand the file of a deleted object (an unresolved local object, whose trailer names
        its writer; or a sealed one whose ``writer`` is known) to the process that wrote it, as
        a spare (the caller holds the ledger lock). False when it is to be unlinked instead."""
        if not self.recycle_enabled:
            return False
        try:
            size = os.stat(path).st_size
            if writer is None:
                writer = _read_local(path, map_payload=False)[5] if size >= WARM_MIN_BYTES else 0
        except (OSError, _TornRead, ObjectStoreError):
            return False
        if size < WARM_MIN_BYTES:
            return False
        if not writer or not _pid_alive(writer):
            return False
        rounded = -(-size // _WARM_GRANULE) * _WARM_GRANULE
        # given-back files have a cap of their own: a fresh spare that a starved, niced thread
        # is still making must not keep pages that exist from being reused
        gifts = sum(v for k, v in ledger["reservations"].items() if k.endswith(_GIFT_SUFFIX))
        if (
            gifts + rounded > self.capacity // 8
            or self._committed(ledger) - size + rounded > self.capacity
        ):
            return False
        token = f"{writer}-{secrets.token_hex(6)}{_GIFT_SUFFIX}"
        try:
            os.rename(path, os.path.join(self._tmp, token))
        except OSError:
            return False
        ledger["used"] -= size
        ledger["reservations"][token] = rounded
        return True

    def _take_gift(self, estimate: int) -> _WarmFile | None:
        """A file given back to this process that fits ``estimate``, made this put's spare
        (proven unshared first); gifts that do not fit are given up."""
        with self._warm_lock:  # kept mappings of files deleted elsewhere hold their pages
            stale = [key for key, kept in self._retained.items() if os.fstat(kept.fd).st_nlink == 0]
            dropped = [self._retained.pop(key) for key in stale]
        for kept in dropped:
            self._unmap_later(kept)
        prefix = f"{os.getpid()}-"
        names = [
            n for n in os.listdir(self._tmp) if n.startswith(prefix) and n.endswith(_GIFT_SUFFIX)
        ]
        if not names:  # listed again either way: a file may have come back meanwhile
            self._await_expected(estimate)
            names = [
                n
                for n in os.listdir(self._tmp)
                if n.startswith(prefix) and n.endswith(_GIFT_SUFFIX)
            ]
        if not names:
            return None
        chosen = None
        with self._locked() as ledger:
            for name in names:
                size = ledger["reservations"].get(name)
                if size is None:
                    continue
                if chosen is None and size >= estimate:
                    # in use from now on: no longer an idle spare (the spares' cap is for those)
                    token = f"{os.getpid()}-{secrets.token_hex(6)}"
                    path = os.path.join(self._tmp, token)
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(os.path.join(self._tmp, name), path)
                        del ledger["reservations"][name]
                        ledger["reservations"][token] = size
                        chosen = (path, token, size)
                        continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._tmp, name))
                del ledger["reservations"][name]
        if chosen is None:
            return None
        path, token, size = chosen
        try:
            warm = self._adopt(path, token, size)
        except OSError:  # someone still has it open or mapped: it goes as a plain delete would
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._release_reservation(token)
            return None
        self.gifts_taken += 1
        with self._warm_lock:
            if self._warm_refilling:  # files come back: a fresh spare would cost for nothing
                self._abandon_refill.set()
        return warm

    def expect_back(self, name: str) -> None:
        """This process dropped its last reference to its local object ``name``: whoever deletes
        it gives its file back here, soon. The next put that finds no spare waits for that
        (bounded) rather than write fresh pages (which the kernel zeroes at ~2 GB/s)."""
        if self.recycle_enabled and is_local_name(name):
            with self._warm_lock:
                self._expected.append(name)

    def _await_expected(self, estimate: int) -> bool:
        """Wait for the files of the expected names to leave ``local/``, at most a quarter of
        what writing ``estimate`` fresh bytes would cost; True if one did."""
        with self._warm_lock:
            expected, self._expected = list(self._expected), collections.deque(maxlen=4)
        if not expected:
            return False
        deadline = time.monotonic() + min(0.25, estimate / 8e9)
        # names gone already were dealt with by earlier puts (taken, or not given back)
        pending = [
            p for p in (os.path.join(self._local, name) for name in expected) if os.path.lexists(p)
        ]
        while pending:
            if any(not os.path.lexists(p) for p in pending):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0002)
        return False

    def _adopt(self, path: str, token: str, size: int) -> _WarmFile:
        """Make the given-back file at ``path`` a spare: through the mapping this process kept
        of it when it wrote it (no mapping or page-table work at all), else mapped anew."""
        stat = os.stat(path)
        with self._warm_lock:
            retained = self._retained.pop((stat.st_dev, stat.st_ino), None)
        if retained is not None and retained.size < size:
            self._unmap_later(retained)
            retained = None
        if retained is None:
            return _WarmFile(path, token, size, recycled=True)
        try:
            # the write lease is taken on the very file the mapping holds: granted only if no
            # other process (nor another open file here) has the inode open or mapped
            _prove_not_open_elsewhere(retained.fd)
            if os.fstat(retained.fd).st_size < size:
                os.ftruncate(retained.fd, size)  # its pages up to there exist and are mapped
        except OSError:
            self._unmap_later(retained)
            raise
        retained.path, retained.token, retained.size, retained.recycled = path, token, size, True
        self.gifts_reused_mapping += 1
        return retained

    def _retain(self, warm: _WarmFile) -> None:
        """Keep a spent spare's fd and mapping (bounded): if its file comes back, it is reused."""
        stat = os.fstat(warm.fd)
        with self._warm_lock:
            self._retained[(stat.st_dev, stat.st_ino)] = warm
            stale = [
                key for key, kept in self._retained.items() if os.fstat(kept.fd).st_nlink == 0
            ]  # deleted, not given back
            while len(self._retained) - len(stale) > _RETAINED_MAX:
                stale.append(next(k for k in self._retained if k not in stale))
            dropped = [self._retained.pop(key) for key in stale]
        for kept in dropped:
            self._unmap_later(kept)

    def _release_retained(self, path: str) -> None:
        """Close this process's kept mapping of ``path``'s file (it would refuse the lease)."""
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            with self._warm_lock:
                kept = self._retained.pop((stat.st_dev, stat.st_ino), None)
            if kept is not None:
                kept.close()

    def _unmap_later(self, warm: _WarmFile) -> None:
        """Close a spare's fd now and its mapping on a background thread (~8 ms per 100 MB)."""
        if warm.fd >= 0:
            os.close(warm.fd)
            warm.fd = -1
        with self._warm_lock:
            self._warm_unmap.append(warm)
        threading.Thread(
            target=self._unmap_spent, name="latticaray-store-unmap", daemon=True
        ).start()

    def _put_into_warm(
        self, ser: SerializedObject, warm: _WarmFile, estimate: int, pin: bool
    ) -> tuple[Manifest, bool]:
        """Write the payload straight into the pre-faulted mapping, hash it, trim and trail it.
        If the object turns out to be sealed already (a duplicate put), the spare stays this
        process's spare, untouched but for the bytes just written: (manifest, True)."""
        try:
            view = memoryview(warm.map)
            try:
                payload = view[: ser.nbytes]
                if warm.recycled and ser.pieces is None:
                    # a writer that could skip bytes (padding) must not leave old bytes there:
                    # zeroing resident pages costs far less than fresh ones
                    np.frombuffer(payload, dtype=np.uint8)[:] = 0
                manifest = self._copy_and_hash(ser, payload)
                payload.release()
            finally:
                view.release()
            if _sealed_size(manifest) > estimate:
                raise ObjectStoreError("internal error: manifest larger than its reservation")
            if self.recycle_enabled and self._touch_if_sealed(manifest, pin):
                self._install_warm(warm)
                return manifest, True
            trailer = manifest.encoded + _TRAILER.pack(len(manifest.encoded), _TRAILER_MAGIC)
            os.ftruncate(warm.fd, manifest.size)  # frees the spare's unused pages
            if os.pwrite(warm.fd, trailer, manifest.size) != len(trailer):
                raise ObjectStoreError(f"short write of the manifest of {manifest.root}")
            os.close(warm.fd)
            warm.fd = -1
            with self._warm_lock:  # unmapping 100 MB takes ~8 ms: the refill thread does it
                self._warm_unmap.append(warm)
            return manifest, False
        except BaseException:
            self._discard_spare(warm)
            raise

    def _discard_spare(self, warm) -> None:
        """A spare whose put failed: closed, its file removed, its reservation given back."""
        warm.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(warm.path)
        self._release_reservation(warm.token)

    def _touch_if_sealed(self, manifest: Manifest, pin: bool) -> bool:
        """True if ``manifest``'s object is already sealed (marked used, pinned if asked)."""
        name = str(manifest.root)
        final = os.path.join(self._objects, name)
        if not os.path.exists(final):
            return False
        with self._locked() as ledger:
            try:
                os.utime(final)
            except FileNotFoundError:
                return False  # deleted meanwhile: seal ours
            if pin:
                self._add_pin(ledger, name)
        return True

    def _copy_and_hash(self, ser: SerializedObject, dest: memoryview) -> Manifest:
        """Fill ``dest`` with the payload and hash its blocks.

        With ``ser.pieces``, each block is copied and then hashed by one pool thread while it is
        still in that core's cache (the source is read from RAM once). Otherwise the payload is
        written in one pass, blocks inside verbatim source buffers being hashed from the source
        meanwhile, and the rest hashed from ``dest`` afterwards."""
        spans = block_spans(ser.nbytes, self.chunk_size)
        pool = hash_pool()
        if ser.pieces is not None:
            target = np.frombuffer(dest, dtype=np.uint8)
            sources = [
                (offset, np.frombuffer(piece, dtype=np.uint8)) for offset, piece in ser.pieces
            ]
            digests = list(
                pool.map(lambda span: self._copy_block(span, sources, target, dest), spans)
            )
            return manifest_from_digests(
                ser.nbytes, self.chunk_size, digests, ser.meta, self.hash_code
            )
        early = self._hash_inside_sources(pool, ser, spans)
        ser.write_into(dest)
        digests = self._digests_of_written(pool, ser, spans, early, dest)
        return manifest_from_digests(ser.nbytes, self.chunk_size, digests, ser.meta, self.hash_code)

    def _copy_block(
        self,
        span: tuple[int, int],
        sources: list[tuple[int, np.ndarray]],
        target: np.ndarray,
        dest: memoryview,
    ) -> bytes:
        self._copy_span(span, sources, target)
        return hash_digest(self.hash_code, dest[span[0] : span[1]])

    @staticmethod
    def _copy_span(
        span: tuple[int, int], sources: list[tuple[int, np.ndarray]], target: np.ndarray
    ) -> None:
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

    def _schedule_warm(self, estimate: int, put_started: float, fresh: bool = True) -> None:
        """Prepare a spare of about ``estimate`` bytes in the background, if there is free room
        and large puts leave enough idle time between them to make one (a spare costs more CPU
        than it saves: it only helps when it is made in otherwise idle time)."""
        size = -(-estimate // _WARM_GRANULE) * _WARM_GRANULE
        with self._warm_lock:
            self._forget_parents_warm()
            idle = put_started - self._last_large_put_end
            self._last_large_put_end = time.monotonic()
            if (
                not self.warm_enabled
                or not fresh
                or size > self.capacity // 8
                or self._warm_refilling
                or self._recycling
                or idle < self._refill_seconds
                or (self._warm is not None and self._warm.size >= size)
            ):
                unmap_now = not self._warm_refilling
                size = 0
            else:
                self._warm_refilling = True
                self._abandon_refill.clear()
        if size == 0:
            if unmap_now and self._warm_unmap:  # off the put's path: it takes ~8 ms per 100 MB
                threading.Thread(
                    target=self._unmap_spent, name="latticaray-store-unmap", daemon=True
                ).start()
            return
        _register_for_exit(self)
        threading.Thread(
            target=self._refill_warm, args=(size,), name="latticaray-store-warm", daemon=True
        ).start()

    def _unmap_spent(self) -> None:
        with self._warm_lock:
            spent, self._warm_unmap = self._warm_unmap, []
        for warm in spent:
            warm.close()

    def _refill_warm(self, size: int) -> None:
        token = None
        with contextlib.suppress(OSError, AttributeError):
            # making a spare costs more CPU than the write it saves (pages are allocated, zeroed
            # and mapped either way): it must only use idle time, never slow the puts beside it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            self._unmap_spent()
            with self._locked() as ledger:
                self._reclaim_dead(ledger)
                spares = sum(
                    v for k, v in ledger["reservations"].items() if k.endswith(_WARM_SUFFIX)
                )
                if (
                    self._committed(ledger) + 2 * size > self.capacity
                    or spares + size > self.capacity // 8
                    or self._abandon_refill.is_set()
                ):
                    return  # only from free room (never evicts), all processes' spares <= 1/8
                token = f"{os.getpid()}-{secrets.token_hex(6)}{_WARM_SUFFIX}"
                ledger["reservations"][token] = size
                self._fresh_token = token
            started = time.monotonic()
            warm = _WarmFile(
                os.path.join(self._tmp, token), token, size, abandon=self._abandon_refill
            )
            self._refill_seconds = time.monotonic() - started
            self.spares_made += 1
            token = None
            self._install_warm(warm)
        except OSError:
            pass  # no spare this time (e.g. shm full): puts take the plain path
        finally:
            if token is not None:
                self._release_reservation(token)
            with self._warm_lock:
                self._fresh_token = None
                self._warm_refilling = False
                self._warm_ready.notify_all()

    def _install_warm(self, warm: _WarmFile) -> None:
        with self._warm_lock:
            previous, self._warm = self._warm, warm
        if previous is not None:
            self._discard_warm(previous)

    def _recycle_file(
        self, ledger: dict[str, Any], path: str, sealed: bool
    ) -> tuple[str, int] | None:
        """Move ``path`` (a sealed object's file, or a temp file a duplicate put wrote) to become
        this process's next spare (the caller holds the ledger lock); None when it is not to be
        recycled. The file is not written until ``_finish_recycle`` has proven nobody else has
        it open or mapped."""
        if not self.recycle_enabled:
            return None
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None
        if size < WARM_MIN_BYTES:
            return None
        rounded = -(-size // _WARM_GRANULE) * _WARM_GRANULE
        with self._warm_lock:
            self._forget_parents_warm()
            if self._recycling or (self._warm is not None and self._warm.size >= rounded):
                return None
            self._recycling, self._recycling_size = True, rounded
            fresh = self._warm_refilling  # a fresh spare is being made: it will give way
        # a fresh spare (pages yet to be allocated and zeroed) is worth less than this file: its
        # maker gives up within one granule, so its reservation is not counted against the cap
        spares = sum(
            v
            for k, v in ledger["reservations"].items()
            if k.endswith(_WARM_SUFFIX) and not (fresh and k == self._fresh_token)
        )
        token = f"{os.getpid()}-{secrets.token_hex(6)}{_WARM_SUFFIX}"
        if (
            spares + rounded > self.capacity // 8
            or self._committed(ledger) - size + rounded > self.capacity
        ):
            token = None
        else:
            try:
                os.rename(path, os.path.join(self._tmp, token))
            except OSError:
                token = None
        if token is None:
            with self._warm_lock:
                self._recycling = False
                self._warm_ready.notify_all()
            return None
        if fresh:
            self._abandon_refill.set()
        if sealed:
            ledger["used"] -= size
        ledger["reservations"][token] = rounded
        return token, rounded

    def _start_recycle(self, recycled: tuple[str, int] | None) -> None:
        if recycled is not None:
            _register_for_exit(self)
            threading.Thread(
                target=self._finish_recycle,
                args=recycled,
                name="latticaray-store-recycle",
                daemon=True,
            ).start()

    def _finish_recycle(self, token: str, size: int) -> None:
        """Background: prove the file unshared, extend it to ``size``, map and fault it in. Not
        niced (unlike making a fresh spare): it only maps pages that exist, a cost the next put
        would pay anyway, and a starved recycle would leave back-to-back puts without a spare."""
        path = os.path.join(self._tmp, token)
        try:
            with self._warm_lock:  # a fresh spare's maker gives up within one granule
                self._warm_ready.wait_for(lambda: not self._warm_refilling, timeout=60)
                if self._warm_refilling:
                    raise TimeoutError("a fresh spare is still being made")
            self._unmap_spent()  # our own leftover mapping of it would (rightly) refuse the lease
            self._release_retained(path)
            warm = _WarmFile(path, token, size, recycled=True)
            self.spares_recycled += 1
            self._install_warm(warm)
        except OSError:  # still open or mapped somewhere (or no leases here): delete it plainly
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._release_reservation(token)
        finally:
            with self._warm_lock:
                self._recycling = False
                self._warm_ready.notify_all()

    def _discard_warm(self, warm: _WarmFile) -> None:
        warm.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(warm.path)
        self._release_reservation(warm.token)

    def _drop_warm(self, ledger: dict[str, Any]) -> None:
        """Give this process's spare back (the caller holds the ledger lock)."""
        with self._warm_lock:
            warm, self._warm = self._warm, None
        if warm is not None:
            warm.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(warm.path)
            ledger["reservations"].pop(warm.token, None)

    def wait_warm(self, timeout: float) -> bool:
        """Wait (bounded) until no spare is being prepared; True if a spare is ready."""
        with self._warm_lock:
            self._forget_parents_warm()
            self._warm_ready.wait_for(
                lambda: not self._warm_refilling and not self._recycling, timeout=timeout
            )
            return not self._warm_refilling and not self._recycling and self._warm is not None

    def close(self) -> None:
        """Release this process's spare (the store's objects stay)."""
        _stores_with_spares.pop(id(self), None)
        self.wait_warm(30.0)
        self._unmap_spent()
        with self._warm_lock:
            self._forget_parents_warm()
            warm, self._warm = self._warm, None
            retained, self._retained = list(self._retained.values()), OrderedDict()
        for kept in retained:
            kept.close()
        if warm is not None:
            self._discard_warm(warm)
        prefix = f"{os.getpid()}-"
        with contextlib.suppress(FileNotFoundError):
            gifts = [
                n
                for n in os.listdir(self._tmp)
                if n.startswith(prefix) and n.endswith(_GIFT_SUFFIX)
            ]
            if gifts:
                with self._locked() as ledger:
                    for name in gifts:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(self._tmp, name))
                        ledger["reservations"].pop(name, None)

    def _hash_inside_sources(self, pool, ser: SerializedObject, spans) -> dict[int, Any]:
        """Start hashing, from the source, every block that lies inside a verbatim source buffer
        (``ser.segments``): block index -> future digest."""
        early: dict[int, Any] = {}
        for offset, source in ser.segments:
            end = offset + source.nbytes
            for i, (a, b) in enumerate(spans):
                if offset <= a and b <= end:
                    early[i] = pool.submit(
                        hash_digest, self.hash_code, source[a - offset : b - offset]
                    )
        return early

    def _digests_of_written(
        self, pool, ser: SerializedObject, spans, early: dict[int, Any], written
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
            i: pool.submit(hash_digest, self.hash_code, written[a:b])
            for i, (a, b) in enumerate(spans)
            if i not in early
        }
        return [(early.get(i) or late[i]).result() for i in range(len(spans))]

    def _write_and_hash(self, ser: SerializedObject, temp: str) -> Manifest:
        """Write the payload to ``temp`` and hash its blocks; blocks that lie inside a verbatim
        source buffer (``ser.segments``) are hashed from the source while the write runs."""
        if not ser.nbytes:
            ser.write_to_file(temp)
            return build_manifest(b"", ser.meta, self.chunk_size, self.hash_code)
        spans = block_spans(ser.nbytes, self.chunk_size)
        pool = hash_pool()
        early = self._hash_inside_sources(pool, ser, spans)
        ser.write_to_file(temp)  # write(2) beats faulting fresh tmpfs pages via a mapping
        mapping, _ = _map_readonly(temp)
        view = memoryview(mapping)
        try:
            digests = self._digests_of_written(pool, ser, spans, early, view)
        finally:
            view.release()
            mapping.close()
        return manifest_from_digests(ser.nbytes, self.chunk_size, digests, ser.meta, self.hash_code)

    def _seal(self, manifest: Manifest, temp: str, token: str, pin: bool) -> Cid:
        name = str(manifest.root)
        final = os.path.join(self._objects, name)
        recycled = None
        with self._locked() as ledger:
            ledger["reservations"].pop(token, None)
            if os.path.exists(final):  # a duplicate: its freshly written file may be recycled
                recycled = self._recycle_file(ledger, temp, sealed=False)
                if recycled is None:
                    os.unlink(temp)
                os.utime(final)
            else:
                spilled = os.path.join(self.spill_dir, name)
                if os.path.exists(spilled):
                    ledger["spill_used"] -= os.stat(spilled).st_size
                    os.unlink(spilled)
                os.rename(temp, final)
                ledger["used"] += os.stat(final).st_size
            if pin:
                self._add_pin(ledger, name)
        self._start_recycle(recycled)
        return manifest.root

    # --- reading ---------------------------------------------------------------------------------
    def get_object(self, cid: Cid | str) -> StoredObject:
        """Map a sealed object read-only (restoring it from spill if needed); a local name is
        resolved first (its manifest names its blocks)."""
        cid = self.resolve(cid)
        path = os.path.join(self._objects, str(cid))
        for _ in range(3):  # an eviction may race with us; restore and retry
            try:
                stored = _read_sealed(cid, path, self._manifests)
            except FileNotFoundError:
                if not self._restore(cid):
                    raise ObjectNotFound(cid) from None
                continue
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
            return stored
        raise ObjectNotFound(cid, "object kept being evicted while being read")

    def get(self, cid: Cid | str) -> Any:
        """The deserialized value; arrays are read-only views into shared memory. Accepts a
        CID or a local name (read without hashing while it is unresolved)."""
        if is_local_name(cid):
            for _ in range(3):
                linked = self._alias(cid)
                if linked is not None:
                    return self.get_object(linked).value()
                path = os.path.join(self._local, cid)
                try:
                    meta, payload, _, _, _, _ = _read_local(path)
                except (FileNotFoundError, _TornRead):
                    continue  # being linked under its CID right now: the alias comes next
                with contextlib.suppress(FileNotFoundError):
                    os.utime(path, follow_symlinks=False)
                return deserialize(meta, payload)
            raise ObjectNotFound(cid, "local object kept changing while being read")
        return self.get_object(cid).value()

    def manifest(self, cid: Cid | str) -> Manifest:
        cid = self.resolve(cid)
        manifest = self._manifests.get(cid)
        return manifest if manifest is not None else self.get_object(cid).manifest

    def _unresolved_local(self, name: Any) -> str | None:
        """The path of ``name`` if it is a local name whose object is not linked to a CID yet."""
        if not is_local_name(name):
            return None
        path = os.path.join(self._local, name)
        return path if os.path.isfile(path) and not os.path.islink(path) else None

    def _known_cid(self, name: Cid | str) -> Cid | None:
        """``name`` as a CID if it is one or a linked local name; None for an unresolved or
        unknown local name."""
        if not is_local_name(name):
            return Cid.coerce(name)
        try:
            return self._alias(name)
        except ObjectNotFound:
            return None

    def contains(self, cid: Cid | str) -> bool:
        if self._unresolved_local(cid) is not None:
            return True
        cid = self._known_cid(cid)
        if cid is None:
            return False
        name = str(cid)
        return os.path.exists(os.path.join(self._objects, name)) or os.path.exists(
            os.path.join(self.spill_dir, name)
        )

    def in_memory(self, cid: Cid | str) -> bool:
        if self._unresolved_local(cid) is not None:
            return True
        cid = self._known_cid(cid)
        return cid is not None and os.path.exists(os.path.join(self._objects, str(cid)))

    def is_spilled(self, cid: Cid | str) -> bool:
        cid = self._known_cid(cid)
        if cid is None:
            return False
        name = str(cid)
        return not self.in_memory(cid) and os.path.exists(os.path.join(self.spill_dir, name))

    def _restore(self, cid: Cid) -> bool:
        name = str(cid)
        spilled = os.path.join(self.spill_dir, name)
        with self._locked() as ledger:
            if os.path.exists(os.path.join(self._objects, name)):
                return True
            try:
                size = os.stat(spilled).st_size
            except FileNotFoundError:
                return False
            token = self._reserve(ledger, size, keep=name)
            temp = os.path.join(self._tmp, token)
            try:
                shutil.copyfile(spilled, temp)
                os.rename(temp, os.path.join(self._objects, name))
                ledger["used"] += size
                os.unlink(spilled)
                ledger["spill_used"] -= size
            except OSError as exc:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                if exc.errno != errno.ENOENT:
                    raise
                return False
            finally:
                ledger["reservations"].pop(token, None)
        return True

    def list(self) -> list[Cid]:
        names = set(os.listdir(self._objects)) | {
            n for n in os.listdir(self.spill_dir) if n != ".tmp"
        }
        return [Cid.parse(n) for n in sorted(names)]

    # --- pins, deletion, stats -------------------------------------------------------------------
    def _add_pin(self, ledger: dict[str, Any], name: str) -> None:
        holders = ledger["pins"].setdefault(name, {})
        pid = str(os.getpid())
        holders[pid] = holders.get(pid, 0) + 1

    def pin(self, cid: Cid | str) -> None:
        """Keep the object in memory (never evicted or spilled) until as many ``unpin`` calls."""
        if is_local_name(cid):
            with self._locked() as ledger:  # linking moves pins under the lock: check under it
                if self._alias(cid) is None:
                    self._add_pin(ledger, cid)
                    return
            cid = self.resolve(cid)
        cid = Cid.coerce(cid)
        if not self.in_memory(cid) and not self._restore(cid):
            raise ObjectNotFound(cid)
        with self._locked() as ledger:
            self._add_pin(ledger, str(cid))

    def unpin(self, cid: Cid | str) -> None:
        pid = str(os.getpid())
        with self._locked() as ledger:
            if is_local_name(cid) and cid in ledger["pins"]:
                name = cid
            else:
                known = self._known_cid(cid)  # an unresolved local name not pinned: no pin
                if known is None:
                    return
                name = str(known)
            holders = ledger["pins"].get(name, {})
            if holders.get(pid, 0) > 1:
                holders[pid] -= 1
            else:
                holders.pop(pid, None)
            if not holders:
                ledger["pins"].pop(name, None)

    def is_pinned(self, cid: Cid | str) -> bool:
        with self._locked() as ledger:
            if is_local_name(cid) and cid in ledger["pins"]:
                return True
            known = self._known_cid(cid)
            return known is not None and str(known) in ledger["pins"]

    def delete(self, cid: Cid | str) -> None:
        """Remove the object (memory and spill) and its pins; a large one's file may become this
        process's spare (see Recycling in the module docstring). Deleting a local name removes
        the name; the object it was linked to goes with the last such name, unless it was
        sealed under its CID before any of them (then it stays, evictable, until deleted)."""
        with self._locked() as ledger:
            if is_local_name(cid):
                recycled = self._delete_local(ledger, cid)
            else:
                recycled = self._delete_sealed(ledger, str(Cid.coerce(cid)))
        self._start_recycle(recycled)

    def _delete_local(self, ledger: dict[str, Any], name: str) -> tuple[str, int] | None:
        ledger["pins"].pop(name, None)
        try:
            linked = self._alias(name)
        except ObjectNotFound:
            return None
        path = os.path.join(self._local, name)
        if linked is None:
            if not self._gift_file(ledger, path):
                with contextlib.suppress(FileNotFoundError):
                    size = os.stat(path).st_size
                    os.unlink(path)
                    ledger["used"] -= size
            return None
        os.unlink(path)
        cname = str(linked)
        entry = ledger["links"].get(cname)
        if entry is None:
            return None
        entry[0] -= 1
        if entry[0] > 0:
            return None
        del ledger["links"][cname]
        if not entry[1]:
            return None
        return self._delete_sealed(ledger, cname, entry[2] if len(entry) > 2 else 0)

    def _delete_sealed(
        self, ledger: dict[str, Any], name: str, writer: int = 0
    ) -> tuple[str, int] | None:
        ledger["pins"].pop(name, None)
        ledger["links"].pop(name, None)  # local names linked to it now lead nowhere
        path = os.path.join(self._objects, name)
        recycled = None
        if not (writer and self._gift_file(ledger, path, writer)):
            recycled = self._recycle_file(ledger, path, sealed=True)
        for directory, key in ((self._objects, "used"), (self.spill_dir, "spill_used")):
            path = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                size = os.stat(path).st_size
                os.unlink(path)
                ledger[key] -= size
        self._manifests.pop(Cid.parse(name), None)
        return recycled

    def stats(self) -> dict[str, int]:
        with self._locked() as ledger:
            warm = sum(v for k, v in ledger["reservations"].items() if k.endswith(_WARM_SUFFIX))
            local = sum(1 for e in os.scandir(self._local) if e.is_file(follow_symlinks=False))
            return {
                "local": local,
                "capacity": self.capacity,
                "used": ledger["used"],
                "reserved": sum(ledger["reservations"].values()) - warm,
                "warm": warm,
                "spill_capacity": self.spill_capacity,
                "spill_used": ledger["spill_used"],
                "objects": len(os.listdir(self._objects)) + local,
                "pinned": len(ledger["pins"]),
                "spilled": len(os.listdir(self.spill_dir)) - 1,
            }

    def destroy(self) -> None:
        """Delete the store directory and its spill directory (for tests and node shutdown)."""
        _stores_with_spares.pop(id(self), None)
        self.wait_warm(30.0)
        self._unmap_spent()
        with self._warm_lock:
            warm, self._warm = self._warm, None
            retained, self._retained = list(self._retained.values()), OrderedDict()
        for kept in retained:
            kept.close()
        if warm is not None:
            warm.close()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.spill_dir, ignore_errors=True)
